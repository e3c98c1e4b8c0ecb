"""manager.store: pipelines, runtimes and instances in SQLite, across reopenings of the same file."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager.store import InstanceRow, Store

DEFINITION = {"name": "endpointML", "transportType": "http", "chain": ["rt/a", "rt/b"]}
STAGES = [{"name": "rt/a", "route": "endpointML.r1.s0", "bindings": {}}, {"name": "rt/b", "route": "endpointML.r1.s1", "bindings": {"x": "y"}}]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "manager.db"  # parents are created


def test_pipeline_survives_reopening(db: Path) -> None:
    store = Store(db)
    written = store.put_pipeline("endpointML", 1, DEFINITION, STAGES)
    store.close()

    reopened = Store(db)
    row = reopened.pipeline("endpointML")
    assert row == written
    assert (row.revision, row.definition, row.stages) == (1, DEFINITION, STAGES)
    assert row.created_at == row.updated_at
    reopened.close()


def test_replace_updates_revision_and_keeps_created_at(db: Path) -> None:
    store = Store(db)
    first = store.put_pipeline("p", 1, DEFINITION, STAGES)
    new_definition = {**DEFINITION, "chain": ["rt/c"]}
    second = store.put_pipeline("p", 2, new_definition, STAGES[:1])
    assert second.revision == 2
    assert second.definition == new_definition and second.stages == STAGES[:1]
    assert second.created_at == first.created_at
    assert second.updated_at >= first.updated_at
    store.close()
    assert Store(db).pipeline("p") == second


def test_pipelines_are_listed_by_name(db: Path) -> None:
    store = Store(db)
    for name in ("zeta", "alpha", "mid"):
        store.put_pipeline(name, 1, {"name": name}, [])
    assert [p.name for p in store.pipelines()] == ["alpha", "mid", "zeta"]


def test_delete(db: Path) -> None:
    store = Store(db)
    store.put_pipeline("keep", 1, DEFINITION, STAGES)
    store.put_pipeline("gone", 1, DEFINITION, STAGES)
    assert store.delete_pipeline("gone") is True
    assert store.pipeline("gone") is None
    assert store.delete_pipeline("gone") is False
    assert store.delete_pipeline("never-existed") is False
    store.close()
    reopened = Store(db)
    assert [p.name for p in reopened.pipelines()] == ["keep"]


def test_unicode_and_nested_json_round_trip(db: Path) -> None:
    store = Store(db)
    definition = {"name": "p", "note": "ünïcødé ✓", "nested": {"list": [1, 2.5, None, True]}}
    store.put_pipeline("p", 1, definition, [])
    store.close()
    assert Store(db).pipeline("p").definition == definition


def test_runtimes_round_trip_and_replace(db: Path) -> None:
    store = Store(db)
    models = {"iris": {"versions": ["1"], "platform": "sklearn", "inputs": [], "outputs": []}}
    store.put_runtime("scikit", "oip", models)
    store.put_runtime("spark", "oip", {})
    store.put_runtime("scikit", "triton", {})  # re-registration replaces
    store.close()
    runtimes = {r.name: r for r in Store(db).runtimes()}
    assert list(runtimes) == ["scikit", "spark"]
    assert (runtimes["scikit"].kind, runtimes["scikit"].models) == ("triton", {})


def test_instances_put_replace_delete(db: Path) -> None:
    store = Store(db)
    store.put_instance(InstanceRow("i1", "scikit", "10.0.0.1", 9001, 1.0))
    store.put_instance(InstanceRow("i1", "scikit", "10.0.0.1", 9002, 2.0))
    store.put_instance(InstanceRow("i2", "spark", "10.0.0.2", 9003, 3.0))
    store.delete_instance("i2")
    store.delete_instance("missing")  # no error
    store.close()
    assert Store(db).instances() == [InstanceRow("i1", "scikit", "10.0.0.1", 9002, 2.0)]


def test_memory_store_is_empty_and_separate() -> None:
    a, b = Store(":memory:"), Store(":memory:")
    a.put_pipeline("p", 1, {}, [])
    assert b.pipeline("p") is None and b.pipelines() == []
    assert a.pipeline("p").revision == 1
