"""A model file replaced behind the repository's back is refused by every runtime that
would load it, and serving goes on: on a real mesh (manager, repository, scikit
runtimes and gateway, each with its Envoy sidecar).

The manager records a version's SHA-256 digests when it is deployed (here: uploaded
through the manager) and runtimes check every file against that record, not against
what the repository lists next to the file. After ``model.joblib`` is replaced on the
repository's disk (with another valid pickle, so only the digest check can tell):

* a hot load of that version onto another runtime is refused (422 naming the file and
  both digests) and leaves nothing loaded there;
* a restarted instance of the runtime that serves it (its cache emptied) is refused
  when the manager replays the version onto it, and never joins;
* a runtime that names the version among its start-up models stops with an error
  naming the file and both digests;

while the pipeline on the instance that loaded the good bytes answers 200 throughout.
A file tampered in a runtime's local cache is downloaded again and checked again.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections import Counter
from pathlib import Path

import httpx
import joblib
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from sluice.client import Client, SluiceError
from sluice.local.mesh import ROOT, LocalMesh, MeshPorts, RuntimeSpec
from sluice.local.procs import Proc, free_port, grpc_serving, wait_until
from tests.conftest import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("digests"),
        [
            RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier")),
            RuntimeSpec("spare", "scikit", ()),  # starts with no model at all
        ],
        MeshPorts.ephemeral(),
        env={"SLUICE_MANAGER_HEARTBEAT_TTL_S": "3"},
    )
    with mesh:
        yield mesh


@pytest.fixture(scope="module")
def client(mesh):
    with Client(mesh.manager_url) as c:
        yield c


@pytest.fixture(scope="module")
def cancer():
    data = load_breast_cancer(as_frame=True)
    return data.data.iloc[:, :6], data.target


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Load:
    """Two threads posting one record each to a pipeline, counting every status."""

    def __init__(self, url: str, pipeline: str, record: dict):
        self.url, self.pipeline, self.record = url, pipeline, record
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                try:
                    response = http.post(f"/serve/{self.pipeline}", json=[self.record])
                    self.statuses[response.status_code] += 1
                    if response.status_code != 200:
                        self.errors.append(response.text[:300])
                except httpx.HTTPError as exc:
                    self.statuses[0] += 1
                    self.errors.append(repr(exc))

    def total(self) -> int:
        return sum(self.statuses.values())

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


class Instance:
    """One more instance of a runtime, started by hand: its own process, cache and sidecar
    (a second replica, as a container with its own disk would be)."""

    def __init__(self, mesh: LocalMesh, runtime: str, key: str, models: str):
        self.mesh, self.runtime, self.key, self.models = mesh, runtime, key, models
        self.local, self.public = free_port(), free_port()
        self.cache = mesh.workdir / "cache" / key
        self.proc: Proc | None = None

    def start(self, sidecar: bool = True) -> Proc:
        env = {
            **self.mesh.env,
            "SLUICE_RUNTIME_NAME": self.runtime,
            "SLUICE_RUNTIME_PORT": str(self.local),
            "SLUICE_RUNTIME_PUBLIC_PORT": str(self.public),
            "SLUICE_RUNTIME_MODELS": self.models,
            "SLUICE_RUNTIME_REPOSITORY_URL": self.mesh.repository_url,
            "SLUICE_RUNTIME_MANAGER_URL": self.mesh.manager_url,
            "SLUICE_RUNTIME_CACHE_DIR": str(self.cache),
            "SLUICE_RUNTIME_METRICS_PORT": "0",
        }
        self.proc = self.mesh.supervisor.start_python(self.key, "runtimes.scikit", env, ROOT)
        if sidecar:
            wait_until(grpc_serving(f"127.0.0.1:{self.local}"), 60, self.key, self.proc)
            if f"{self.key}-sidecar" not in self.mesh.procs:
                self.mesh._sidecar(self.key, self.runtime, "runtime", self.public, self.local, protocol="grpc")
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            self.mesh.supervisor.stop(self.proc)  # SIGTERM: it deregisters first
            self.proc = None

    def log(self) -> str:
        return self.mesh.supervisor.log_dir.joinpath(f"{self.key}.log").read_text(errors="replace")


def instance_ports(mesh: LocalMesh, runtime: str) -> set[int]:
    """The (sidecar) ports of the runtime's registered instances."""
    response = httpx.get(f"{mesh.manager_url}/api/v1/runtimes/{runtime}", timeout=5)
    return {i["port"] for i in response.json()["instances"]} if response.status_code == 200 else set()


def test_a_cached_file_tampered_on_the_runtimes_disk_is_downloaded_again(mesh, client, cancer):
    X, y = cancer
    estimator = DecisionTreeClassifier(max_depth=3, random_state=0).fit(X, y)
    client.upload(estimator, "cache_check", runtime="spare")
    cached = mesh.workdir / "cache" / "spare" / "cache_check" / "1" / "model.joblib"
    recorded = httpx.get(f"{mesh.manager_url}/api/v1/models/cache_check/versions/1/digests", timeout=5).json()
    digests = {f["path"]: f["sha256"] for f in recorded["files"]}
    assert sha256(cached) == digests["model.joblib"]

    client.unload("spare", "cache_check")
    joblib.dump(DecisionTreeClassifier(max_depth=1).fit(X, 1 - y), cached)  # a valid pickle, other bytes
    assert sha256(cached) != digests["model.joblib"]
    client.load("spare", "cache_check", "1")
    assert sha256(cached) == digests["model.joblib"]  # downloaded again from the intact repository
    log = mesh.procs["runtime-spare"].log_tail(200)
    assert "cached file 'model.joblib' has sha256" in log and "downloading it again" in log
    client.unload("spare", "cache_check")


def test_a_model_file_replaced_behind_the_repositorys_back_is_refused_and_serving_goes_on(mesh, client, cancer):
    X, y = cancer
    good = LogisticRegression(max_iter=500).fit(X, y)
    ref = client.upload(good, "cancer_lr", runtime="scikit")
    assert ref.version == "1"
    client.create_pipeline("cancer", [ref])
    record = X.iloc[0].to_dict()
    expected_label = int(good.predict(X.iloc[:1])[0])
    assert client.predict("cancer", [record])[0]["label"] == expected_label

    # a second instance of the runtime joins: the manager replays cancer_lr 1 onto it (good bytes)
    second = Instance(mesh, "scikit", "runtime-scikit-2", "iris_scaler,iris_classifier")
    second.start()
    eventually(lambda: second.public in instance_ports(mesh, "scikit"), timeout_s=30)
    second.stop()
    eventually(lambda: instance_ports(mesh, "scikit") == {mesh.runtime("scikit").public_port}, timeout_s=15)

    recorded = httpx.get(f"{mesh.manager_url}/api/v1/models/cancer_lr/versions/1/digests", timeout=5)
    assert recorded.status_code == 200, recorded.text
    good_digest = {f["path"]: f["sha256"] for f in recorded.json()["files"]}["model.joblib"]

    # replaced on the repository's disk, behind its back, with another valid estimator
    stored = mesh.workdir / "models" / "cancer_lr" / "1" / "model.joblib"
    assert sha256(stored) == good_digest
    joblib.dump(LogisticRegression(max_iter=500).fit(X, 1 - y), stored)
    bad_digest = sha256(stored)
    listed = {f["path"]: f["sha256"] for f in client.model("cancer_lr")["versions"][0]["files"]}
    assert listed["model.joblib"] == bad_digest  # the repository lists the new bytes' digest...
    again = httpx.get(f"{mesh.manager_url}/api/v1/models/cancer_lr/versions/1/digests", timeout=5).json()
    assert {f["path"]: f["sha256"] for f in again["files"]}["model.joblib"] == good_digest  # ...the record holds

    with Load(mesh.gateway_url, "cancer", record) as load:
        eventually(lambda: load.total() > 20, timeout_s=10)

        # (a) a hot load of that version onto another runtime
        with pytest.raises(SluiceError) as refused:
            client.load("spare", "cancer_lr", "1")
        error = refused.value
        assert error.status == 422 and error.code == "model_load_failed", error
        assert "FAILED_PRECONDITION" in error.message and "'model.joblib'" in error.message
        assert good_digest in error.message and bad_digest in error.message
        spare = httpx.get(f"{mesh.manager_url}/api/v1/runtimes/spare", timeout=5).json()
        assert "cancer_lr" not in {m["name"] for m in spare["models"]}
        assert not (mesh.workdir / "cache" / "spare" / "cancer_lr" / "1" / "model.joblib").exists()

        # (b) the second instance restarts with an empty cache: the replay is refused, it never joins
        shutil.rmtree(second.cache)
        second.start()
        eventually(lambda: "refused before loading" in second.log(), timeout_s=30)
        log = second.log()
        assert "'model.joblib'" in log and good_digest in log and bad_digest in log
        assert "registration refused (503)" in log or "could not load its recorded models" in log
        assert second.proc.alive()  # still running, still retrying: it just never takes traffic
        assert instance_ports(mesh, "scikit") == {mesh.runtime("scikit").public_port}
        manager_log = mesh.procs["manager"].log_tail(400)
        assert "did not load cancer_lr version 1: FAILED_PRECONDITION" in manager_log
        second.stop()

        # (c) a runtime that starts with that version among its models stops, saying why
        boot = Instance(mesh, "scikit", "runtime-scikit-boot", "cancer_lr:1")
        proc = boot.start(sidecar=False)
        proc.popen.wait(60)
        assert proc.popen.returncode == 1
        log = boot.log()
        assert "cannot start: model 'cancer_lr:1'" in log and good_digest in log and bad_digest in log

        seen = load.total()
        eventually(lambda: load.total() > seen + 20, timeout_s=10)

    assert set(load.statuses) == {200}, (load.statuses, load.errors[:3])
    assert client.predict("cancer", [record])[0]["label"] == expected_label  # still the good bytes
