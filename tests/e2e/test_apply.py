"""Declarative bulk apply on a real mesh: one change creates, replaces, keeps and (with
prune) deletes exactly the diff; one bad definition changes nothing; a dry run changes
nothing; the typed plan reads the same from the store, the API and the gateway; the
CLI prints the diff first.
"""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from manager.schemas import StageOut
from manager.store import Store
from sluice.cli import app as cli
from tests.e2e.conftest import IRIS_CHAIN

pytestmark = pytest.mark.e2e
RECORD = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]


def chain(name: str) -> dict:
    return {"name": name, "transportType": "http", "chain": IRIS_CHAIN}


def timed(name: str, timeout_ms: int) -> dict:
    return {"name": name, "stages": [{"runtime": "scikit", "model": "iris_scaler", "timeout_ms": timeout_ms},
                                     {"runtime": "scikit", "model": "iris_classifier"}]}


def apply(manager, pipelines: list[dict], prune: bool = False, dry_run: bool = False) -> httpx.Response:
    return manager.post("/api/v1/pipelines:apply", json={"pipelines": pipelines, "prune": prune}, params={"dry_run": dry_run})


def names(manager) -> dict[str, int]:
    return {p["name"]: p["revision"] for p in manager.get("/api/v1/pipelines").json() if p["name"].startswith("bulk-")}


def served(gateway, name: str) -> int:
    return gateway.post(f"/serve/{name}", json=RECORD).status_code


def test_apply_creates_then_applies_exactly_the_diff_with_prune(manager, gateway):
    first = apply(manager, [chain("bulk-a"), chain("bulk-b"), chain("bulk-c")])
    assert first.status_code == 200, first.text
    assert first.json() == {"created": ["bulk-a", "bulk-b", "bulk-c"], "replaced": [], "unchanged": [], "deleted": [], "dry_run": False}
    # answered once live: every pipeline serves at once
    assert [served(gateway, n) for n in ("bulk-a", "bulk-b", "bulk-c")] == [200, 200, 200]

    again = apply(manager, [chain("bulk-a"), chain("bulk-b"), chain("bulk-c")])
    assert again.json()["unchanged"] == ["bulk-a", "bulk-b", "bulk-c"] and names(manager) == {"bulk-a": 1, "bulk-b": 1, "bulk-c": 1}

    diff = apply(manager, [chain("bulk-a"), timed("bulk-b", 3000), chain("bulk-d")], prune=True, dry_run=True)
    assert diff.json() == {"created": ["bulk-d"], "replaced": ["bulk-b"], "unchanged": ["bulk-a"], "deleted": ["bulk-c"], "dry_run": True}
    assert names(manager) == {"bulk-a": 1, "bulk-b": 1, "bulk-c": 1}  # a dry run changes nothing
    assert served(gateway, "bulk-d") == 404

    done = apply(manager, [chain("bulk-a"), timed("bulk-b", 3000), chain("bulk-d")], prune=True)
    assert done.status_code == 200, done.text
    assert {k: done.json()[k] for k in ("created", "replaced", "unchanged")} == {"created": ["bulk-d"], "replaced": ["bulk-b"], "unchanged": ["bulk-a"]}
    # prune deletes every pipeline not listed, those of other tests in this module included
    assert "bulk-c" in done.json()["deleted"]
    assert names(manager) == {"bulk-a": 1, "bulk-b": 2, "bulk-d": 1}
    assert served(gateway, "bulk-c") == 404 and served(gateway, "bulk-d") == 200
    assert manager.get("/api/v1/pipelines/bulk-b").json()["stages"][0]["timeout_ms"] == 3000


def test_one_bad_definition_refuses_the_whole_apply_and_changes_nothing(manager, gateway):
    apply(manager, [chain("bulk-a")])
    before = names(manager)
    bad = apply(manager, [
        chain("bulk-new"),
        {"name": "bulk-x", "chain": ["scikit/iris_classifier", "scikit/iris_scaler"]},  # outputs do not feed inputs
        {"name": "bulk-y", "chain": ["nowhere/iris_scaler"]},
        chain("bulk-new"),
    ], prune=True)
    assert bad.status_code == 422
    error = bad.json()["error"]
    assert error["code"] == "invalid_apply"
    problems = {(p["pipeline"], p["code"]) for p in error["details"]["problems"]}
    assert problems == {("bulk-x", "signature_mismatch"), ("bulk-y", "unknown_runtime"), ("bulk-new", "duplicate")}
    assert names(manager) == before and served(gateway, "bulk-new") == 404 and served(gateway, "bulk-a") == 200


def test_the_plan_reads_the_same_from_store_api_and_gateway(mesh, manager, gateway):
    apply(manager, [timed("bulk-plan", 1500)])
    row = Store(mesh.workdir / "manager.db").pipeline("bulk-plan")
    api = manager.get("/api/v1/pipelines/bulk-plan").json()
    assert api["revision"] == row.revision
    assert api["stages"] == [StageOut.of(s).model_dump() for s in row.plan.stages]
    assert api["definition"] == row.definition
    listing = gateway.get("/api/v1/pipelines").json()
    assert listing["pipelines"]["bulk-plan"] == {"revision": row.revision, "stages": [s.name for s in row.plan.stages]}


def test_cli_apply_prints_the_diff_then_applies(mesh, tmp_path, manager):
    path = tmp_path / "pipelines.yaml"
    path.write_text("pipelines:\n  - name: bulk-cli\n    chain: [scikit/iris_scaler, scikit/iris_classifier]\n")
    runner = CliRunner()
    env = {"SLUICE_MANAGER_URL": mesh.manager_url}
    dry = runner.invoke(cli, ["apply", "-f", str(path), "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "+ bulk-cli" in dry.output and "bulk-cli" not in names(manager)
    done = runner.invoke(cli, ["apply", "-f", str(path)], env=env)
    assert done.exit_code == 0 and "1 created" in done.output and "bulk-cli" in names(manager)
    path.write_text(json.dumps([{"name": "bulk-cli", "chain": ["nowhere/x"]}]))
    refused = runner.invoke(cli, ["apply", "-f", str(path)], env=env)
    assert refused.exit_code == 1 and "unknown_runtime" in refused.output
