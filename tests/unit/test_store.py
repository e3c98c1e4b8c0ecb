"""manager.store and manager.store_pg: pipelines (definition + resolved plan), runtimes,
instances and loaded models, across reopenings of the same database, on both backends
(``open_store`` runs each such test on SQLite and on a real PostgreSQL server started
once for the module); bulk writes in one transaction; the change intent; SQLite's
migration from schema version 0 (stages as JSON dicts) to version 1 (plans).
PostgreSQL's own migrations and notifications: tests/unit/test_store_pg.py."""

from __future__ import annotations

import json
import sqlite3
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import manager.store_sql as store_module
from manager.served_models import models_from_json
from manager.store import SCHEMA_VERSION, InstanceRow, LoadedModel, PipelineRow, Store
from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.tensors import TensorSpec
from sluice.wire import route_key

SCIKIT = "serving-customscikit"
SPARK = "serving-localml-spark"
FEATURES = TensorSpec("features", "FP32", (-1, 4))
SCALED = TensorSpec("scaled", "FP32", (-1, 4))
LABEL = TensorSpec("label", "INT64", (-1,))
TITLE = TensorSpec("Title1", "BYTES", (-1, -1))


def make_plan(name: str = "endpointML", revision: int = 1, timeout_ms: int = 3000) -> PipelinePlan:
    """Two stages: a versioned scikit stage, then an unversioned spark stage bound by name."""
    return PipelinePlan(
        name=name,
        revision=revision,
        transport="http",
        stages=(
            StagePlan(f"{SCIKIT}/pm_scikit:2", SCIKIT, "pm_scikit", "2", route_key(name, revision, 0), timeout_ms, (FEATURES, TITLE), (SCALED,)),
            StagePlan(
                "classify", SPARK, "pm_spark", "", route_key(name, revision, 1), 250, (SCALED,), (LABEL,),
                (Binding("scaled", "scaled"),),
            ),
        ),
    )


def definition(name: str = "endpointML", chain: tuple[str, ...] = (f"{SCIKIT}/pm_scikit:2", f"{SPARK}/pm_spark")) -> dict:
    return {"name": name, "transportType": "http", "chain": list(chain)}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "manager.db"  # parents are created


#: opens the test's database (the same one at every call): a Store or a PgStore
Opener = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, db: Path) -> Iterator[Opener]:
    """SQLite: the file ``db``; PostgreSQL: a fresh database of ``pg_server``."""
    opened: list = []
    if request.param == "sqlite":
        def opener():
            opened.append(Store(db))
            return opened[-1]
        opener.target = f"Store({str(db)!r})"

        def raw(sql: str) -> list[tuple]:
            with sqlite3.connect(db) as conn:
                return conn.execute(sql).fetchall()
    else:
        from manager.store_pg import PgStore

        url = request.getfixturevalue("pg_server").create_database(f"t_{uuid.uuid4().hex[:12]}")

        def opener():
            opened.append(PgStore(url))
            return opened[-1]
        opener.target = f"__import__('manager.store_pg').store_pg.PgStore({url!r})"

        def raw(sql: str) -> list[tuple]:
            import psycopg

            with psycopg.connect(url) as conn:
                return conn.execute(sql).fetchall()
    opener.backend = request.param
    opener.raw = raw  # the database read around the store
    yield opener
    for store in opened:
        store.close()


class Clock:
    """A stand-in for manager.store_sql's ``time`` module (both backends' clock): time moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(store_module, "time", types.SimpleNamespace(time=clock.time))
    return clock


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as raw:
        return raw.execute("PRAGMA user_version").fetchone()[0]


# --- pipelines ------------------------------------------------------------------------------


def test_definition_and_plan_survive_reopening(open_store: Opener, clock: Clock) -> None:
    store = open_store()
    written = store.put_pipeline(definition(), make_plan(revision=3))
    assert isinstance(written, PipelineRow)
    assert (written.name, written.revision) == ("endpointML", 3)
    assert written.created_at == written.updated_at == 1000.0
    store.close()

    reopened = open_store()
    row = reopened.pipeline("endpointML")
    assert row == written
    assert row.plan == make_plan(revision=3)  # every field of every stage, as typed values
    assert row.definition == definition()
    assert isinstance(row.plan.stages, tuple) and isinstance(row.plan.stages[0].inputs[0].shape, tuple)
    assert row.plan.stages[1].bindings == (Binding("scaled", "scaled"),)
    reopened.close()


def test_replace_keeps_created_at_and_moves_updated_at(open_store: Opener, clock: Clock) -> None:
    store = open_store()
    first = store.put_pipeline(definition(), make_plan(revision=1))
    clock.now = 2000.0
    new_definition = definition(chain=(f"{SCIKIT}/pm_scikit",))
    new_plan = make_plan(revision=2, timeout_ms=111)
    second = store.put_pipeline(new_definition, new_plan)
    assert (second.revision, second.definition, second.plan) == (2, new_definition, new_plan)
    assert second.created_at == first.created_at == 1000.0
    assert second.updated_at == 2000.0
    store.close()
    reopened = open_store()
    assert reopened.pipeline("endpointML") == second
    assert [p.name for p in reopened.pipelines()] == ["endpointML"]  # replaced, not added


def test_pipelines_are_listed_by_name(open_store: Opener) -> None:
    store = open_store()
    for name in ("zeta", "alpha", "mid"):
        store.put_pipeline(definition(name), make_plan(name))
    assert [p.name for p in store.pipelines()] == ["alpha", "mid", "zeta"]
    assert [p.plan.stages[0].route for p in store.pipelines()] == ["alpha.r1.s0", "mid.r1.s0", "zeta.r1.s0"]


def test_put_pipelines_writes_all_in_one_call(open_store: Opener, clock: Clock) -> None:
    store = open_store()
    store.put_pipeline(definition("old"), make_plan("old", 1))
    clock.now = 1500.0
    rows = store.put_pipelines([(definition("new"), make_plan("new", 1)), (definition("old"), make_plan("old", 2))])
    assert [(r.name, r.revision, r.created_at, r.updated_at) for r in rows] == [("new", 1, 1500.0, 1500.0), ("old", 2, 1000.0, 1500.0)]
    store.close()
    assert open_store().pipelines() == sorted(rows, key=lambda r: r.name)
    assert open_store().put_pipelines([]) == []


def test_put_pipelines_writes_nothing_when_an_item_cannot_be_encoded(open_store: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store()
    store.put_pipeline(definition("a"), make_plan("a", 1))
    encode = store_module.to_bytes
    calls = []

    def failing_on_the_second(plan: PipelinePlan) -> bytes:
        calls.append(plan.name)
        if len(calls) == 2:
            raise RuntimeError("encoding failed")
        return encode(plan)

    monkeypatch.setattr(store_module, "to_bytes", failing_on_the_second)
    with pytest.raises(RuntimeError, match="encoding failed"):
        store.put_pipelines([(definition("a"), make_plan("a", 2)), (definition("b"), make_plan("b", 1))])
    assert calls == ["a", "b"]
    store.close()
    reopened = open_store()
    assert [(p.name, p.revision) for p in reopened.pipelines()] == [("a", 1)]


def test_put_pipelines_is_all_or_nothing_when_the_database_refuses_an_item(db: Path) -> None:
    """The second row fails inside SQLite (a trigger aborts its insert): the first row of
    the same call, written just before, must be rolled back with it."""
    store = Store(db)
    store.put_pipeline(definition("a"), make_plan("a", 1))
    with sqlite3.connect(db) as other:
        other.execute(
            "CREATE TRIGGER refuse_b BEFORE INSERT ON pipelines WHEN NEW.name = 'b' "
            "BEGIN SELECT RAISE(ABORT, 'refused b'); END"
        )
    with pytest.raises(sqlite3.DatabaseError, match="refused b"):
        store.put_pipelines([(definition("a"), make_plan("a", 2)), (definition("b"), make_plan("b", 1))])
    assert [(p.name, p.revision) for p in store.pipelines()] == [("a", 1)]
    store.close()
    assert [(p.name, p.revision) for p in Store(db).pipelines()] == [("a", 1)]


def test_delete_pipelines(open_store: Opener) -> None:
    store = open_store()
    for name in ("keep", "gone1", "gone2"):
        store.put_pipeline(definition(name), make_plan(name))
    assert store.delete_pipelines(["gone1", "never-existed", "gone2"]) == 2
    assert store.pipeline("gone1") is None and store.pipeline("gone2") is None
    assert store.delete_pipelines(["gone1"]) == 0
    assert store.delete_pipelines([]) == 0
    assert store.delete_pipeline("keep") is True
    assert store.delete_pipeline("keep") is False
    store.put_pipeline(definition("keep"), make_plan("keep"))
    store.close()
    assert [p.name for p in open_store().pipelines()] == ["keep"]


def test_unicode_and_nested_definition_round_trip(open_store: Opener) -> None:
    store = open_store()
    nested = {"name": "p", "note": "ünïcødé ✓", "nested": {"list": [1, 2.5, None, True]}}
    store.put_pipeline(nested, make_plan("p"))
    store.close()
    assert open_store().pipeline("p").definition == nested


def test_memory_store_is_empty_and_separate() -> None:
    a, b = Store(":memory:"), Store(":memory:")
    a.put_pipeline(definition("p"), make_plan("p", 4))
    assert b.pipeline("p") is None and b.pipelines() == []
    assert a.pipeline("p").revision == 4


def test_a_new_file_is_at_the_current_schema_version(db: Path) -> None:
    Store(db).close()
    assert user_version(db) == SCHEMA_VERSION


# --- runtimes, instances, loaded models ----------------------------------------------------


def test_runtimes_round_trip_and_replace(open_store: Opener) -> None:
    store = open_store()
    models = models_from_json({"iris": {"versions": ["1", "2"], "platform": "sklearn",
                                        "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 4]}], "outputs": [],
                                        "by_version": {"1": {"inputs": [], "outputs": []}}}})
    store.put_runtime("scikit", "oip", models)
    store.put_runtime("spark", "oip", {})
    store.close()
    store = open_store()
    assert {r.name: (r.kind, r.models) for r in store.runtimes()} == {"scikit": ("oip", models), "spark": ("oip", {})}
    store.put_runtime("scikit", "triton", {})  # re-registration replaces
    store.close()
    runtimes = {r.name: r for r in open_store().runtimes()}
    assert list(runtimes) == ["scikit", "spark"]
    assert (runtimes["scikit"].kind, runtimes["scikit"].models) == ("triton", {})


def test_instances_put_replace_delete(open_store: Opener) -> None:
    store = open_store()
    store.put_instance(InstanceRow("i1", "scikit", "10.0.0.1", 9001, 1.0))
    store.put_instance(InstanceRow("i1", "scikit", "10.0.0.1", 9002, 2.0))
    store.put_instance(InstanceRow("i2", "spark", "10.0.0.2", 9003, 3.0))
    store.delete_instance("i2")
    store.delete_instance("missing")  # no error
    store.close()
    assert open_store().instances() == [InstanceRow("i1", "scikit", "10.0.0.1", 9002, 2.0)]


def test_loaded_models_put_list_delete(open_store: Opener) -> None:
    store = open_store()
    store.put_loaded_model(LoadedModel("spark", "pm_spark", "1"))
    store.put_loaded_model(LoadedModel("scikit", "pm_scikit", "2"))
    store.put_loaded_model(LoadedModel("scikit", "pm_scikit", "1"))
    store.put_loaded_model(LoadedModel("scikit", "pm_scikit", "1"))  # twice: kept once
    store.close()
    store = open_store()
    assert store.loaded_models() == [
        LoadedModel("scikit", "pm_scikit", "1"), LoadedModel("scikit", "pm_scikit", "2"), LoadedModel("spark", "pm_spark", "1"),
    ]
    assert store.loaded_models("spark") == [LoadedModel("spark", "pm_spark", "1")]
    assert store.loaded_models("nobody") == []
    store.delete_loaded_model(LoadedModel("scikit", "pm_scikit", "1"))
    store.delete_loaded_model(LoadedModel("scikit", "pm_scikit", "9"))  # absent: no error
    store.close()
    assert open_store().loaded_models("scikit") == [LoadedModel("scikit", "pm_scikit", "2")]


# --- migration from schema version 0 --------------------------------------------------------

V0_PIPELINES = """CREATE TABLE pipelines (name TEXT PRIMARY KEY, revision INTEGER NOT NULL, definition TEXT NOT NULL,
    stages TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)"""
V0_RUNTIMES = "CREATE TABLE runtimes (name TEXT PRIMARY KEY, kind TEXT NOT NULL, models TEXT NOT NULL, updated_at REAL NOT NULL)"


def _t(spec: TensorSpec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def v0_stages(name: str, revision: int) -> list[dict]:
    """What the version-0 resolver stored: JSON dicts, ``version`` None when unset, bindings a dict."""
    return [
        {
            "name": f"{SCIKIT}/pm_scikit:2", "runtime": SCIKIT, "model": "pm_scikit", "version": "2",
            "route": route_key(name, revision, 0), "timeout_ms": 3000,
            "inputs": [_t(FEATURES), _t(TITLE)], "outputs": [_t(SCALED)], "bindings": {},
        },
        {
            "name": "classify", "runtime": SPARK, "model": "pm_spark", "version": None,
            "route": route_key(name, revision, 1), "timeout_ms": 250,
            "inputs": [_t(SCALED)], "outputs": [_t(LABEL)], "bindings": {"scaled": "scaled"},
        },
    ]


def write_v0(path: Path, rows: list[tuple[str, int, dict, list[dict], float, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as raw:
        raw.execute(V0_PIPELINES)
        raw.execute(V0_RUNTIMES)
        raw.execute("INSERT INTO runtimes VALUES (?, ?, ?, ?)", ("scikit", "oip", json.dumps({"iris": {"versions": ["1"]}}), 5.0))
        raw.executemany(
            "INSERT INTO pipelines VALUES (?, ?, ?, ?, ?, ?)",
            [(n, r, json.dumps(d), json.dumps(s), c, u) for n, r, d, s, c, u in rows],
        )
    assert user_version(path) == 0


def test_version_0_database_is_migrated_to_plans(db: Path) -> None:
    grpc_definition = {"name": "other", "transportType": "grpc", "chain": [f"{SCIKIT}/pm_scikit:2", f"{SPARK}/pm_spark"]}
    write_v0(
        db,
        [
            ("endpointML", 3, definition(), v0_stages("endpointML", 3), 10.0, 20.0),
            ("other", 1, grpc_definition, v0_stages("other", 1), 30.0, 40.0),
        ],
    )
    store = Store(db)
    assert user_version(db) == SCHEMA_VERSION
    rows = {p.name: p for p in store.pipelines()}
    assert list(rows) == ["endpointML", "other"]
    endpoint = rows["endpointML"]
    assert endpoint.plan == make_plan("endpointML", 3)  # what v0_stages stand for
    assert endpoint.definition == definition()
    assert (endpoint.created_at, endpoint.updated_at) == (10.0, 20.0)
    assert endpoint.plan.stages[1].version == ""  # None in version 0: the runtime's default
    assert rows["other"].plan.transport == "grpc"  # from the definition's transportType
    assert rows["other"].plan.stages[0].route == "other.r1.s0"
    # the other tables are untouched
    assert [(r.name, r.kind, r.models) for r in store.runtimes()] == [("scikit", "oip", models_from_json({"iris": {"versions": ["1"]}}))]
    store.close()

    # reopened: already at version 1, nothing migrated twice, same plans
    reopened = Store(db)
    assert {p.name: p for p in reopened.pipelines()} == rows
    assert user_version(db) == SCHEMA_VERSION
    with sqlite3.connect(db) as raw:
        columns = [r[1] for r in raw.execute("PRAGMA table_info(pipelines)")]
    assert "stages" not in columns and "plan" in columns


def test_migrated_pipeline_can_be_replaced_afterwards(db: Path, clock: Clock) -> None:
    write_v0(db, [("endpointML", 1, definition(), v0_stages("endpointML", 1), 10.0, 20.0)])
    store = Store(db)
    row = store.put_pipeline(definition(), make_plan(revision=2))
    assert (row.revision, row.created_at, row.updated_at) == (2, 10.0, 1000.0)
    assert store.pipeline("endpointML").plan == make_plan(revision=2)


def test_an_empty_version_0_database_is_migrated(db: Path) -> None:
    write_v0(db, [])
    store = Store(db)
    assert store.pipelines() == []
    store.put_pipeline(definition(), make_plan())
    assert store.pipeline("endpointML").plan == make_plan()
    assert user_version(db) == SCHEMA_VERSION


def test_a_failed_migration_leaves_the_version_0_data_in_place(db: Path) -> None:
    """A version-0 row that cannot be converted (here: a stage without ``route``) stops the
    migration; the old table and every row of it must still be there afterwards, not
    dropped with only some rows copied."""
    broken = v0_stages("bad", 1)
    del broken[0]["route"]
    write_v0(
        db,
        [
            ("a-good", 1, definition("a-good"), v0_stages("a-good", 1), 1.0, 1.0),
            ("bad", 1, definition("bad"), broken, 2.0, 2.0),
        ],
    )
    with pytest.raises(KeyError):
        Store(db)
    with sqlite3.connect(db) as raw:
        columns = [r[1] for r in raw.execute("PRAGMA table_info(pipelines)")]
        names = [r[0] for r in raw.execute("SELECT name FROM pipelines ORDER BY name")]
    assert "stages" in columns
    assert names == ["a-good", "bad"]
    assert user_version(db) == 0


def test_health_is_none_while_the_database_answers_and_names_the_error_after(open_store: Opener) -> None:
    store = open_store()
    assert store.health() is None
    store.close()  # a closed connection stands for a database that stopped answering
    expected = {"sqlite": "ProgrammingError", "postgres": "OperationalError"}[open_store.backend]
    assert expected in (store.health() or "")


# --- crash ordering of pipeline changes (begin -> steps -> finish or abort)
ROOT = Path(__file__).resolve().parents[2]

_KILLED_CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
from manager.store import Store
from tests.unit.test_store import definition, make_plan
store = {target}
store.begin_change([(definition("a"), make_plan("a", 1)), (definition("b"), make_plan("b", 1))], [])
store.finish_change()
if {inside!r}:
    # killed inside begin_change's transaction, after the intent rows, before the new rows
    type(store)._put = lambda self, items: os.kill(os.getpid(), signal.SIGKILL)
store.begin_change([(definition("a", ("x/y",)), make_plan("a", 2)), (definition("c"), make_plan("c", 1))], ["b"])
os.kill(os.getpid(), signal.SIGKILL)  # killed after begin_change, before any later step
"""


def _run_killed(open_store: Opener, inside: bool) -> None:
    import signal
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD.format(root=str(ROOT), target=open_store.target, inside=inside)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr


def test_writes_are_synchronous_full(db: Path) -> None:
    store = Store(db)
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync'd at every commit
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_manager_killed_after_begin_change_finds_the_new_state_and_the_intent(open_store: Opener) -> None:
    _run_killed(open_store, inside=False)
    store = open_store()
    # the new state is what the store serves: a replaced, c created, b (being deleted) hidden
    assert [(r.name, r.revision, r.definition["chain"]) for r in store.pipelines()] == [
        ("a", 2, ["x/y"]), ("c", 1, definition()["chain"])]
    assert store.pipeline("b") is None
    pending = store.pending_change()
    assert pending is not None and pending.names == {"a", "b", "c"}
    puts = {p.new.name: p for p in pending.puts}
    assert puts["a"].old.revision == 1 and puts["a"].new.revision == 2 and puts["a"].old.definition == definition("a")
    assert puts["c"].old is None and puts["c"].new.plan == make_plan("c", 1)
    assert [r.plan for r in pending.deletes] == [make_plan("b", 1)]
    with pytest.raises(RuntimeError, match="already under way"):
        store.begin_change([(definition("d"), make_plan("d", 1))], [])
    store.finish_change()  # what the restarted manager does once every step is done
    assert store.pending_change() is None
    assert [r.name for r in store.pipelines()] == ["a", "c"]
    assert open_store.raw("SELECT name FROM pipelines ORDER BY name") == [("a",), ("c",)]


def test_a_manager_killed_inside_begin_change_leaves_the_old_state_and_no_intent(open_store: Opener) -> None:
    _run_killed(open_store, inside=True)
    store = open_store()
    assert store.pending_change() is None
    assert [(r.name, r.revision) for r in store.pipelines()] == [("a", 1), ("b", 1)]


def test_abort_change_restores_every_previous_row(open_store: Opener, clock: Clock) -> None:
    store = open_store()
    store.begin_change([(definition("a"), make_plan("a", 1)), (definition("b"), make_plan("b", 1))], [])
    store.finish_change()
    before = store.pipelines()
    clock.now += 60
    store.begin_change([(definition("a", ("x/y",)), make_plan("a", 2)), (definition("c"), make_plan("c", 1))], ["b"])
    assert [r.name for r in store.pipelines()] == ["a", "c"]
    store.abort_change()
    assert store.pending_change() is None
    assert store.pipelines() == before  # definitions, plans, created_at and updated_at
    assert open_store().pipelines() == before
    assert open_store.raw("SELECT name, revision FROM pipelines ORDER BY name") == [("a", 1), ("b", 1)]


def test_begin_change_refuses_a_pipeline_both_put_and_deleted_and_writes_nothing(open_store: Opener) -> None:
    store = open_store()
    with pytest.raises(ValueError, match="both put and deleted"):
        store.begin_change([(definition("a"), make_plan("a", 1))], ["a"])
    assert store.pending_change() is None and store.pipelines() == []
