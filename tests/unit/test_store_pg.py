"""manager.store_pg on a real PostgreSQL server (started once for the module, as the
unprivileged ``nobody`` user, stopped by PID): versioned migrations (fresh database, one
at the previous version, two managers migrating at once, a newer database refused),
NOTIFY reaching another store's ``watch``, the cross-manager change lock and change
intent, all-or-nothing bulk writes, digests recorded once across stores, managers' heartbeat rows
expiring on the database's clock, and the phase and ack rows of the change in progress.
(The behaviours both backends share run in tests/unit/test_store.py.)"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from manager.served_models import models_from_json
from manager.store import RecordedFile
from sluice.local import postgres
from tests.unit.test_store import definition, make_plan

store_pg = pytest.importorskip("manager.store_pg")
PgStore = store_pg.PgStore

#: how long PostgreSQL may take to free a dead connection's session lock (its backend exits
#: after the client's close returns)
LOCK_FREED_WITHIN_S = 10.0


@pytest.fixture
def url(pg_server: postgres.PostgresServer) -> str:
    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def stores(url: str) -> Iterator[list]:
    """Stores opened by the test (closed at the end)."""
    opened: list = []
    yield opened
    for store in opened:
        store.close()


def open_store(url: str, opened: list) -> "PgStore":
    opened.append(PgStore(url))
    return opened[-1]


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_a_fresh_database_gets_every_migration_once(url: str, stores: list) -> None:
    open_store(url, stores)
    assert versions(url) == sorted(store_pg.MIGRATIONS) and store_pg.SCHEMA_VERSION == max(store_pg.MIGRATIONS)
    assert set(store_pg.TABLES) | {"schema_migrations"} <= tables(url)
    open_store(url, stores)  # a second manager (or a restart): nothing applied again
    assert versions(url) == sorted(store_pg.MIGRATIONS)


def test_a_database_at_the_previous_version_is_migrated_and_keeps_its_rows(url: str, stores: list) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        assert store_pg.migrate(conn, target=store_pg.SCHEMA_VERSION - 1) == list(range(1, store_pg.SCHEMA_VERSION))
        conn.execute(
            "INSERT INTO runtimes (name, kind, models, updated_at) VALUES ('scikit', 'oip', '{\"iris\": {}}', 5.0)"
        )
    assert "change_phases" not in tables(url)  # the last migration's table
    store = open_store(url, stores)
    assert versions(url) == sorted(store_pg.MIGRATIONS)
    assert [(r.name, r.kind, r.models) for r in store.runtimes()] == [("scikit", "oip", models_from_json({"iris": {}}))]
    store.begin_change([(definition("a"), make_plan("a", 1))], [])  # the version-2 table works
    assert store.pending_change().names == {"a"}


def test_two_managers_migrating_at_once_apply_each_version_once(url: str) -> None:
    errors: list[BaseException] = []
    applied: list[list[int]] = []

    def run() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                applied.append(store_pg.migrate(conn))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(applied, key=len) == [[], [], [], sorted(store_pg.MIGRATIONS)]
    assert versions(url) == sorted(store_pg.MIGRATIONS)


def test_a_database_newer_than_the_code_is_refused(url: str, stores: list) -> None:
    open_store(url, stores)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (%s, 0)", (store_pg.SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="newer than this manager"):
        PgStore(url)


def test_a_write_through_one_store_is_notified_to_another_stores_watch(url: str, stores: list) -> None:
    writer, watcher = open_store(url, stores), open_store(url, stores)

    async def scenario() -> list[set[str]]:
        seen: list[set[str]] = []
        stream = watcher.watch()
        seen.append(await asyncio.wait_for(anext(stream), 10))  # every table, on connecting
        writer.put_runtime("scikit", "oip", {})
        seen.append(await asyncio.wait_for(anext(stream), 5))
        writer.begin_change([(definition("a"), make_plan("a", 1))], [])
        got: set[str] = set()
        while got != {"pipelines", "pipeline_changes", "change_phases"}:
            got |= await asyncio.wait_for(anext(stream), 5)
        seen.append(got)
        await stream.aclose()
        return seen

    seen = asyncio.run(scenario())
    assert seen == [set(store_pg.TABLES) | set(store_pg.PHASE_TABLES), {"runtimes"}, {"pipelines", "pipeline_changes", "change_phases"}]


def test_the_change_lock_is_held_by_one_manager_and_freed_when_its_connection_dies(url: str, stores: list) -> None:
    first, second = open_store(url, stores), open_store(url, stores)

    async def scenario() -> tuple[bool, bool]:
        async with first.change_lock() as held:
            assert held
            async with second.change_lock(wait=False) as other:
                busy = other
            await first._lock_conn.close()  # the holder dies: PostgreSQL frees its session lock
            # ...when its backend process exits, which happens after the client's close returns:
            # try again until it is free, for at most LOCK_FREED_WITHIN_S
            deadline = time.monotonic() + LOCK_FREED_WITHIN_S
            freed = False
            while not freed and time.monotonic() < deadline:
                async with second.change_lock(wait=False) as other:
                    freed = other
                if not freed:
                    await asyncio.sleep(0.05)
        return busy, freed

    assert asyncio.run(scenario()) == (False, True)


def test_one_change_at_a_time_across_stores(url: str, stores: list) -> None:
    a, b = open_store(url, stores), open_store(url, stores)
    a.begin_change([(definition("x"), make_plan("x", 1))], [])
    with pytest.raises(RuntimeError, match="already under way"):
        b.begin_change([(definition("y"), make_plan("y", 1))], [])
    assert [r.name for r in b.pipelines()] == ["x"] and b.pending_change().names == {"x"}
    b.finish_change()  # any manager may finish it (one whose driver died)
    assert a.pending_change() is None


def test_put_pipelines_is_all_or_nothing_when_postgresql_refuses_an_item(url: str, stores: list) -> None:
    store = open_store(url, stores)
    store.put_pipeline(definition("a"), make_plan("a", 1))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""CREATE FUNCTION refuse_b() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.name = 'b' THEN RAISE EXCEPTION 'refused b'; END IF; RETURN NEW; END $$""")
        conn.execute("CREATE TRIGGER refuse_b BEFORE INSERT ON pipelines FOR EACH ROW EXECUTE FUNCTION refuse_b()")
    with pytest.raises(psycopg.errors.RaiseException, match="refused b"):
        store.put_pipelines([(definition("a"), make_plan("a", 2)), (definition("b"), make_plan("b", 1))])
    assert [(p.name, p.revision) for p in store.pipelines()] == [("a", 1)]
    assert store.health() is None  # the connection is usable after the failed transaction


def test_digests_recorded_first_hold_across_stores(url: str, stores: list) -> None:
    a, b = open_store(url, stores), open_store(url, stores)
    first = a.record_model_digests("iris", "1", [RecordedFile("model.joblib", "aa" * 32, 10)])
    second = b.record_model_digests("iris", "1", [RecordedFile("model.joblib", "bb" * 32, 11)])
    assert second.files == first.files == (RecordedFile("model.joblib", "aa" * 32, 10),)
    b.forget_model_digests("iris")
    assert a.model_digests("iris", "1") is None


def test_a_managers_heartbeat_row_expires_after_its_ttl_on_the_databases_clock(url: str, stores: list) -> None:
    one, two = PgStore(url, manager_id="one"), PgStore(url, manager_id="two")
    stores.extend([one, two])
    one.heartbeat(0.3)
    two.heartbeat(30)
    assert one.live_managers() == ["one", "two"]
    deadline = time.monotonic() + 5
    while "one" in two.live_managers():  # no renewal: gone once 0.3 s passed
        assert time.monotonic() < deadline, "an expired heartbeat still counts as live"
        time.sleep(0.05)
    assert two.live_managers() == ["two"]
    two.leave()
    assert two.live_managers() == []


def test_phase_acks_belong_to_the_change_in_progress_and_go_with_it(url: str, stores: list) -> None:
    driver, other = PgStore(url, manager_id="driver"), PgStore(url, manager_id="other")
    stores.extend([driver, other])
    assert driver.current_change() is None
    driver.begin_change([(definition("a"), make_plan("a", 1))], [])
    change = other.current_change()
    assert change is not None and (change.driver, change.phase) == ("driver", store_pg.PHASES[0])
    assert other.settled_pipelines() is None  # a change in progress: its phases say what to do
    refusal = store_pg.PhaseFailure(504, "change_timeout", "silent", {"nodes": ["gw"]})
    other.ack_phase(change.id, "routes_added", refusal)
    driver.ack_phase(change.id, "routes_added")
    acks = driver.phase_acks(change.id, "routes_added")
    assert acks["driver"].ok and not acks["other"].ok and acks["other"].failure == refusal
    driver.set_phase(change.id, "routes_reverted")
    assert other.current_change().phase == "routes_reverted"
    with pytest.raises(ValueError):
        driver.set_phase(change.id, "sideways")
    driver.abort_change()
    assert driver.current_change() is None and driver.phase_acks(change.id, "routes_added") == {}
    other.ack_phase(change.id, "routes_reverted")  # late: the change is gone, nothing is written
    assert driver.phase_acks(change.id, "routes_reverted") == {}
    assert [r.name for r in other.settled_pipelines()] == []
