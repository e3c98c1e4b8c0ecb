"""Benchmark: bring your own model, timed step by step on a real local mesh.

Starts a mesh (manager, repository, a scikit, a spark and a triton runtime, gateway,
each with its Envoy sidecar) on free ports, then with the SDK (``sluice.client``):

* per artifact kind (a scikit-learn Pipeline, a saved Spark PipelineModel, an ONNX
  file): package, upload, load on the runtime, pipeline create, first prediction;
* upload and load of a large artifact (a k-NN model holding about --mb MB of rows);
* serving latency of a pipeline (p50/p99 at 4 clients) before and while a second
  version of its model is uploaded and hot-loaded, with the count of non-200s.

Run by hand: ``.venv/bin/python bench/model_upload.py [--mb 50]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sklearn.datasets import load_breast_cancer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from sluice.client import Client  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402
from sluice.packaging import package  # noqa: E402

STORE = ROOT / "models" / "store"
TRITON = ROOT / "models" / "triton"


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - start) * 1000


def steps(client: Client, label: str, model, name: str, runtime: str, record: dict) -> list[str]:
    with package(model, name) as pkg, tempfile.TemporaryDirectory() as tmp:
        archive, pack_ms = timed(lambda: pkg.archive(Path(tmp) / "m.tar.gz"))
        size = archive.stat().st_size
        uploaded, upload_ms = timed(lambda: client.upload_archive(name, archive))
    _, load_ms = timed(lambda: client.load(runtime, name, uploaded["version"]))
    _, create_ms = timed(lambda: client.create_pipeline(name.replace("_", "-"), [f"{runtime}/{name}:{uploaded['version']}"]))
    _, first_ms = timed(lambda: client.predict(name.replace("_", "-"), [record]))
    return [label, f"{size / 1e6:.2f}", f"{pack_ms:.0f}", f"{upload_ms:.0f}", f"{load_ms:.0f}", f"{create_ms:.0f}", f"{first_ms:.1f}"]


def latency_while(gateway: str, pipeline: str, record: dict, during) -> tuple[list[float], list[float], int]:
    """Latencies before and during ``during()``, from 4 clients; and the non-200 count."""
    before, while_, failures = [], [], 0
    phase = {"now": before}
    stop = threading.Event()

    def run() -> None:
        nonlocal failures
        with httpx.Client(base_url=gateway, timeout=10) as http:
            while not stop.is_set():
                start = time.perf_counter()
                response = http.post(f"/serve/{pipeline}", json=[record])
                phase["now"].append((time.perf_counter() - start) * 1000)
                failures += response.status_code != 200

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    phase["now"] = while_
    during()
    stop.set()
    for t in threads:
        t.join()
    return before, while_, failures


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50, help="size of the large artifact (MB, about)")
    args = parser.parse_args()
    console = Console()
    data = load_breast_cancer(as_frame=True)
    X, y = data.data, data.target
    record = X.iloc[0].to_dict()
    runtimes = [RuntimeSpec("scikit", "scikit", ()), RuntimeSpec("spark", "spark", ()), RuntimeSpec("triton", "triton", ())]
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as workdir, LocalMesh(Path(workdir), runtimes, MeshPorts.ephemeral()) as mesh:
        client = Client(mesh.manager_url)
        table = Table(title="bring your own model: each step, ms")
        for column in ("artifact", "MB", "package", "upload", "load", "pipeline", "first predict"):
            table.add_column(column)
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
        table.add_row(*steps(client, "scikit-learn Pipeline", lr, "bc_lr", "scikit", record))
        width = json.loads((STORE / "pm_spark" / "1" / "model.json").read_text())["inputs"][0]["shape"][1]
        features = {"features": [0.5] * width}
        table.add_row(*steps(client, "Spark PipelineModel dir", STORE / "pm_spark" / "1" / "pipeline", "pm_byo", "spark", features))
        table.add_row(*steps(client, "ONNX file (Triton layout)", TRITON / "mlp" / "1" / "model.onnx", "mlp_byo", "triton", {"input": [0.1, 0.2, 0.3, 0.4]}))
        # nearest neighbours keep their training data: random rows do not compress, so the artifact is --mb MB
        rows = args.mb * 1_000_000 // (8 * X.shape[1])
        noisy = pd.DataFrame(np.random.default_rng(0).normal(0, 1, (rows, X.shape[1])) * X.std().to_numpy() + X.mean().to_numpy(), columns=X.columns)
        knn = KNeighborsClassifier(n_neighbors=5).fit(noisy, np.random.default_rng(1).integers(0, 2, rows))
        table.add_row(*steps(client, f"k-NN over {rows:,} rows", knn, "bc_knn", "scikit", record))
        console.print(table)

        def second_version() -> None:
            client.upload(make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500)).fit(X, y), "bc_lr", runtime="scikit")

        client.create_pipeline("bc", ["scikit/bc_lr"])
        before, during, failures = latency_while(mesh.gateway_url, "bc", record, second_version)
        table = Table(title="serving while version 2 is uploaded and hot-loaded (4 clients)")
        for column in ("phase", "requests", "p50 ms", "p99 ms", "non-200"):
            table.add_column(column)
        table.add_row("before", str(len(before)), f"{pct(before, 50):.2f}", f"{pct(before, 99):.2f}", "")
        table.add_row("during upload + load", str(len(during)), f"{pct(during, 50):.2f}", f"{pct(during, 99):.2f}", str(failures))
        console.print(table)
        client.close()


if __name__ == "__main__":
    main()
