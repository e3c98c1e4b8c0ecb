"""manager.follow: two control planes (``ControlPlane``, each with its own ``PgStore`` and
embedded registry) on one real PostgreSQL database, in one process, no Envoy connected
(each step confirms at once): what one writes, the other follows; changes through both
at once are serialised without a lost update; a change left half-way by a dead manager
is finished by a live one; runtime instances registered and renewed through one are
endpoints of the other and expire on both; each phase of a change waits for every live
manager, a refusal or a silent live manager rolls it back on every manager (502/504
naming that manager), and a dead manager holds changes back no longer than its
heartbeat TTL. (Real Envoys and gateways: the e2e test
tests/e2e/test_several_managers.py.)"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from manager.control import ControlPlane
from manager.registry.embedded import EmbeddedRegistry
from manager.schemas import PipelineSpec
from manager.served_models import models_from_json
from manager.settings import ManagerSettings
from sluice.errors import ApiError
from sluice.local import postgres
from tests.unit.test_store import definition, make_plan

store_pg = pytest.importorskip("manager.store_pg")

MODELS = models_from_json({
    "scaler": {"versions": ["1"], "platform": "test", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]},
})


@pytest.fixture
def url(pg_server: postgres.PostgresServer) -> str:
    return pg_server.create_database(f"f_{uuid.uuid4().hex[:12]}")


def plane(url: str, port: int, ttl_s: float = 6.0, **settings) -> ControlPlane:
    """A control plane named ``<host>:<port>`` in the store's manager rows."""
    store = store_pg.PgStore(url)
    defaults = {"ack_timeout_s": 1.0, "recovery_timeout_s": 0.5, "peer_ttl_s": 1.0}
    return ControlPlane(ManagerSettings(port=port, **{**defaults, **settings}), store, EmbeddedRegistry(store, ttl_s))


@pytest.fixture
async def planes(url: str) -> AsyncIterator[tuple[ControlPlane, ControlPlane]]:
    a, b = plane(url, 9001, ttl_s=1.0), plane(url, 9002, ttl_s=1.0)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        for p in (a, b):
            await p.stop()
            p.store.close()


async def until(check, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def spec(name: str) -> PipelineSpec:
    return PipelineSpec(name=name, chain=["rt/scaler"])


async def test_a_change_through_one_control_plane_is_followed_by_the_other(planes) -> None:
    a, b = planes
    await a.learn_runtime("rt", "oip", MODELS)
    await until(lambda: "rt" in b.runtimes, 1.0, "B learns the runtime A learnt")
    await a.create_pipeline(spec("p"))
    await until(lambda: "p" in b.served, 1.0, "B serves what A created")
    assert b.routed["p"] == [a.served["p"].plan]
    await b.replace_pipeline("p", spec("p"))  # through B this time
    await until(lambda: a.served["p"].revision == 2, 1.0, "A follows B's replace")
    assert a.routed["p"] == [b.served["p"].plan]  # the old revision's routes withdrawn on A too
    await a.delete_pipeline("p")
    await until(lambda: "p" not in b.served and "p" not in b.routed, 1.0, "B follows A's delete")


async def test_changes_through_both_at_once_are_serialised_without_a_lost_update(planes) -> None:
    a, b = planes
    await a.learn_runtime("rt", "oip", MODELS)
    await until(lambda: "rt" in b.runtimes, 1.0, "B learns the runtime")
    await asyncio.gather(a.create_pipeline(spec("x")), b.create_pipeline(spec("y")))
    await a.create_pipeline(spec("shared"))
    rows = await asyncio.gather(*(p.replace_pipeline("shared", spec("shared")) for p in (a, b, a, b)))
    assert sorted(r.revision for r in rows) == [2, 3, 4, 5]  # each replace saw the one before it
    for p in (a, b):
        await until(lambda p=p: {n: r.revision for n, r in p.served.items()} == {"x": 1, "y": 1, "shared": 5}, 1.0, "both agree")
    assert a.store.pending_change() is None


async def test_a_change_left_by_a_dead_manager_is_finished_by_a_live_one(planes, url: str) -> None:
    a, b = planes
    dead = store_pg.PgStore(url)  # a manager that wrote its change's intent and died
    dead.begin_change([(definition("left"), make_plan("left", 1))], [])
    dead.close()
    # the first phase (routes_added) was announced: both route the new pipeline at once ...
    await until(lambda: "left" in a.routed and "left" in b.routed, 1.0, "both add the new routes at once")
    assert "left" not in a.served and "left" not in b.served  # ... but no gateway switches before the next phase
    took = await until(lambda: a.store.pending_change() is None, 3 * 2.0, "a live manager finishes the change")
    print(f"orphaned change finished after {took:.2f}s")
    await until(lambda: "left" in a.served and "left" in b.served, 1.0, "both serve the finished change")
    assert [r.name for r in a.store.pipelines()] == ["left"]


async def test_instances_registered_through_one_manager_are_endpoints_of_the_other_until_they_expire(planes) -> None:
    a, b = planes
    a.registry.register("i1", "rt", "127.0.0.1", 9001)
    await until(lambda: [e.port for e in b.registry.endpoints().get("rt", [])] == [9001], 1.0, "B routes to A's instance")
    for _ in range(8):  # 2 s of heartbeats through A, twice B's 1 s TTL
        assert a.registry.heartbeat("i1")
        await asyncio.sleep(0.25)
        b.registry.sweep()
        assert "rt" in b.registry.endpoints(), "B expired an instance whose heartbeats reach A"
    await until(lambda: "rt" not in b.registry.endpoints() and "rt" not in a.registry.endpoints(), 3.0,
                "the instance expires on both once heartbeats stop")


# --- each phase confirmed by every live manager (no Envoy here: a manager's own steps
# confirm at once; a "peer" below is a third manager's store rows, written by the test)

def peer(url: str, name: str, ttl_s: float) -> "store_pg.PgStore":
    """A third manager that is alive (a heartbeat row for ``ttl_s``) and acks nothing by itself."""
    store = store_pg.PgStore(url, manager_id=name)
    store.heartbeat(ttl_s)
    return store


async def ack_phases(store, refuse: dict[str, store_pg.PhaseFailure]) -> list[str]:
    """Ack every phase of every change as it is announced (refusing those in ``refuse``);
    the phases seen, in order (until cancelled)."""
    seen: list[str] = []
    try:
        while True:
            change = store.current_change()
            if change is not None and (not seen or seen[-1] != change.phase):
                seen.append(change.phase)
                store.ack_phase(change.id, change.phase, refuse.get(change.phase))
            await asyncio.sleep(0.005)
    except asyncio.CancelledError:
        return seen


async def test_every_phase_waits_for_every_live_manager_in_order(planes, url: str) -> None:
    a, b = planes
    await a.learn_runtime("rt", "oip", MODELS)
    third = peer(url, "third", ttl_s=30)
    acking = asyncio.create_task(ack_phases(third, {}))
    try:
        await a.create_pipeline(spec("p"))
        await a.replace_pipeline("p", spec("p"))
    finally:
        acking.cancel()
        seen = await acking
        third.close()
    assert seen[-3:] == list(store_pg.PHASES)  # the replace: each phase announced once the one before was acked
    assert b.served["p"].revision == 2 and b.routed["p"] == [b.served["p"].plan]  # B did every phase too
    assert a.store.current_change() is None and a.store.pending_change() is None


async def test_a_refusal_on_another_manager_rolls_the_change_back_on_every_manager(planes, url: str) -> None:
    a, b = planes
    await a.learn_runtime("rt", "oip", MODELS)
    await a.create_pipeline(spec("p"))
    third = peer(url, "third", ttl_s=30)
    refusal = store_pg.PhaseFailure(502, "change_rejected", "Envoy on node 'gw-3' rejected the change", {"node": "gw-3"})
    acking = asyncio.create_task(ack_phases(third, {"routes_added": refusal}))
    try:
        with pytest.raises(ApiError) as raised:
            await a.replace_pipeline("p", spec("p"))
    finally:
        acking.cancel()
        seen = await acking
        third.close()
    error = raised.value
    assert (error.status, error.code) == (502, "change_rejected")
    assert error.details["manager"] == "third" and error.details["node"] == "gw-3" and error.details["phase"] == "routes_added"
    assert "on manager third" in error.message
    # refused before any gateway was told to switch: straight to routes_reverted
    assert seen[-2:] == ["routes_added", "routes_reverted"]
    for p in (a, b):  # rolled back everywhere: revision 1 served and routed alone
        assert p.served["p"].revision == 1 and p.routed["p"] == [p.served["p"].plan]
    assert a.store.pipeline("p").revision == 1 and a.store.current_change() is None


async def test_a_live_manager_that_never_acks_times_out_the_change_naming_it(planes, url: str) -> None:
    a, b = planes
    await a.learn_runtime("rt", "oip", MODELS)
    silent = peer(url, "silent", ttl_s=60)
    try:
        started = time.monotonic()
        with pytest.raises(ApiError) as raised:
            await a.create_pipeline(spec("p"))
        took = time.monotonic() - started
    finally:
        silent.close()
    error = raised.value
    assert (error.status, error.code) == (504, "change_timeout")
    assert error.details["manager"] == "silent" and error.details["phase"] == "routes_added"
    print(f"504 after {took:.1f}s (ACK timeout 1s + peer TTL 1s + 1s)")
    assert "p" not in a.served and "p" not in b.served and "p" not in b.routed  # rolled back on B too
    assert a.store.pipeline("p") is None


async def test_a_dead_manager_holds_a_change_back_no_longer_than_its_heartbeat_ttl(planes, url: str) -> None:
    a, b = planes
    await a.learn_runtime("rt", "oip", MODELS)
    dead = peer(url, "dead", ttl_s=1.0)  # one heartbeat, then it was killed
    dead.close()
    started = time.monotonic()
    await a.create_pipeline(spec("p"))  # would be a 504 if it waited for "dead" past its expiry
    took = time.monotonic() - started
    print(f"change answered after {took:.2f}s with a dead manager whose heartbeat lasts 1s")
    assert "dead" not in a.store.live_managers()
    assert "p" in b.served


async def test_each_manager_has_a_heartbeat_row_until_it_stops(url: str) -> None:
    a = plane(url, 9011)
    await a.start()
    try:
        assert a.store.manager_id in a.store.live_managers()
    finally:
        await a.stop()
    assert a.store.manager_id not in a.store.live_managers()  # a clean stop leaves at once
    a.store.close()
