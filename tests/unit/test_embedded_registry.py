"""manager.registry.embedded: register, heartbeat, expiry, deregister, restart grace; with a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from manager.registry.base import Endpoint
from manager.registry.embedded import EmbeddedRegistry
from manager.store import Store

TTL = 10.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> Store:
    s = Store(":memory:")
    yield s
    s.close()


def _registry(store: Store, clock: Clock) -> tuple[EmbeddedRegistry, Changes]:
    registry = EmbeddedRegistry(store, TTL, clock=clock)
    changes = Changes()
    registry.on_change(changes)
    return registry, changes


def test_register_adds_an_endpoint_and_persists_it(store: Store, clock: Clock) -> None:
    registry, changes = _registry(store, clock)
    assert registry.endpoints() == {}
    registry.register("sk-1", "scikit", "10.0.0.1", 9001)
    assert registry.endpoints() == {"scikit": [Endpoint("scikit", "10.0.0.1", 9001, "sk-1")]}
    assert changes.count == 1
    (row,) = store.instances()
    assert (row.id, row.runtime, row.host, row.port) == ("sk-1", "scikit", "10.0.0.1", 9001)


def test_endpoints_are_grouped_and_sorted(store: Store, clock: Clock) -> None:
    registry, _ = _registry(store, clock)
    registry.register("b", "scikit", "10.0.0.2", 9001)
    registry.register("s", "spark", "10.0.0.9", 9100)
    registry.register("a", "scikit", "10.0.0.1", 9002)
    registry.register("c", "scikit", "10.0.0.1", 9001)
    assert registry.endpoints() == {
        "scikit": [
            Endpoint("scikit", "10.0.0.1", 9001, "c"),
            Endpoint("scikit", "10.0.0.1", 9002, "a"),
            Endpoint("scikit", "10.0.0.2", 9001, "b"),
        ],
        "spark": [Endpoint("spark", "10.0.0.9", 9100, "s")],
    }


def test_re_registering_notifies_only_on_real_changes(store: Store, clock: Clock) -> None:
    registry, changes = _registry(store, clock)
    registry.register("sk-1", "scikit", "10.0.0.1", 9001)
    registry.register("sk-1", "scikit", "10.0.0.1", 9001)  # a runtime restarted with the same address
    assert changes.count == 1
    registry.register("sk-1", "scikit", "10.0.0.1", 9005)  # new port
    assert changes.count == 2
    registry.register("sk-1", "scikit-v2", "10.0.0.1", 9005)  # moved to another runtime name
    assert changes.count == 3
    assert registry.endpoints() == {"scikit-v2": [Endpoint("scikit-v2", "10.0.0.1", 9005, "sk-1")]}
    assert len(store.instances()) == 1


def test_heartbeats_keep_an_instance_alive(store: Store, clock: Clock) -> None:
    registry, changes = _registry(store, clock)
    registry.register("sk-1", "scikit", "10.0.0.1", 9001)
    for _ in range(5):
        clock.advance(TTL - 1)
        assert registry.heartbeat("sk-1") is True
        assert registry.sweep() == []
    assert changes.count == 1  # heartbeats are not changes
    assert "scikit" in registry.endpoints()


def test_missed_heartbeats_expire_the_instance(store: Store, clock: Clock) -> None:
    registry, changes = _registry(store, clock)
    registry.register("sk-1", "scikit", "10.0.0.1", 9001)
    registry.register("sk-2", "scikit", "10.0.0.2", 9001)
    clock.advance(TTL / 2)
    registry.heartbeat("sk-2")
    clock.advance(TTL / 2)
    assert registry.sweep() == []  # exactly at the deadline: still alive
    clock.advance(0.001)
    assert registry.sweep() == ["sk-1"]
    assert changes.count == 3  # two registrations, one expiry
    assert registry.endpoints() == {"scikit": [Endpoint("scikit", "10.0.0.2", 9001, "sk-2")]}
    assert [r.id for r in store.instances()] == ["sk-2"]
    assert registry.heartbeat("sk-1") is False  # expired: it must register again
    assert registry.sweep() == []
    assert changes.count == 3  # a sweep that removes nothing is not a change


def test_heartbeat_of_an_unknown_instance(store: Store, clock: Clock) -> None:
    registry, changes = _registry(store, clock)
    assert registry.heartbeat("ghost") is False
    assert registry.endpoints() == {} and changes.count == 0


def test_deregister(store: Store, clock: Clock) -> None:
    registry, changes = _registry(store, clock)
    registry.register("sk-1", "scikit", "10.0.0.1", 9001)
    assert registry.deregister("sk-1") is True
    assert registry.endpoints() == {} and store.instances() == []
    assert changes.count == 2
    assert registry.deregister("sk-1") is False
    assert changes.count == 2
    clock.advance(TTL * 2)
    assert registry.sweep() == []  # nothing left to expire


def test_persisted_instances_get_one_ttl_of_grace_after_restart(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "manager.db"
    first_store = Store(path)
    first, _ = _registry(first_store, clock)
    first.register("sk-1", "scikit", "10.0.0.1", 9001)
    first.register("sk-2", "scikit", "10.0.0.2", 9001)
    first_store.close()

    clock.advance(3600)  # the manager was down for an hour
    store = Store(path)
    restarted, changes = _registry(store, clock)
    assert [e.instance_id for e in restarted.endpoints()["scikit"]] == ["sk-1", "sk-2"]
    assert restarted.sweep() == []  # not expired by the downtime itself

    clock.advance(TTL / 2)
    assert restarted.heartbeat("sk-2") is True  # sk-2's heartbeats found the new manager
    clock.advance(TTL / 2 + 0.001)
    assert restarted.sweep() == ["sk-1"]
    assert changes.count == 1
    assert [r.id for r in store.instances()] == ["sk-2"]
    store.close()


async def test_the_sweeper_task_expires_instances(store: Store, clock: Clock) -> None:
    registry = EmbeddedRegistry(store, 0.02, clock=clock)  # sweeps every 5 ms
    changed = asyncio.Event()
    registry.on_change(changed.set)
    registry.register("sk-1", "scikit", "10.0.0.1", 9001)
    changed.clear()
    await registry.start()
    try:
        clock.advance(1)
        await asyncio.wait_for(changed.wait(), 2)
        assert registry.endpoints() == {}
    finally:
        await registry.stop()
    await registry.stop()  # stopping twice is harmless
