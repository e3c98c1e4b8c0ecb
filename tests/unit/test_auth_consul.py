"""Consul with ACLs on (``SLUICE_CONSUL_TOKEN``) and the runtime networks applied to
discovered instances, against the imitation of Consul's HTTP API (py-consul's real client)."""

from __future__ import annotations

import pytest

from manager.auth.networks import RuntimeNetworks
from manager.registry.consul import ConsulRegistry
from runtimes.sdk.consul import ConsulRegistration
from sluice.local.procs import free_port
from tests.unit.fake_consul import FakeConsul
from tests.unit.test_consul_registry import HEALTH, Heard, until

SECRET = "9c1f-acl-token"


@pytest.fixture
async def consul():
    fake = FakeConsul(acl_token=SECRET)
    await fake.start()
    yield fake
    await fake.stop()


async def test_the_manager_sends_its_acl_token_and_without_one_sees_nothing(consul, monkeypatch):
    monkeypatch.delenv("SLUICE_CONSUL_TOKEN", raising=False)
    await consul.add("sk-1", "scikit", "10.0.0.1", 9001)
    refused = ConsulRegistry(consul.address, wait_s=1.0, backoff_min_s=0.02, backoff_max_s=0.05)
    await refused.start()
    try:
        await until(lambda: any(r.status == 403 for r in consul.requests), what="a refused query")
        assert refused.endpoints() == {}
    finally:
        await refused.stop()
    registry = ConsulRegistry(consul.address, wait_s=1.0, token=SECRET)
    await registry.start()
    try:
        await until(lambda: "scikit" in registry.endpoints(), what="discovery with the token")
        assert all(r.token == SECRET for r in consul.seen(HEALTH))
    finally:
        await registry.stop()


async def test_the_token_comes_from_sluice_consul_token(consul, monkeypatch):
    monkeypatch.setenv("SLUICE_CONSUL_TOKEN", SECRET)
    await consul.add("sk-1", "scikit", "10.0.0.1", 9001)
    registry = ConsulRegistry(consul.address, wait_s=1.0)
    await registry.start()
    try:
        await until(lambda: "scikit" in registry.endpoints(), what="discovery with the token from the environment")
    finally:
        await registry.stop()


async def test_a_runtime_registers_with_its_acl_token(consul, monkeypatch):
    monkeypatch.delenv("SLUICE_CONSUL_TOKEN", raising=False)
    registration = ConsulRegistration(consul.address, "scikit", "scikit", "127.0.0.1", free_port(), ["iris"], token=SECRET)
    registration.start()
    try:
        await until(registration.registered.is_set, what="registration")
        assert consul.registered and all(r.token == SECRET for r in consul.seen("/v1/agent/service/register"))
    finally:
        await registration.stop()


async def test_discovered_instances_pass_the_runtime_networks():
    fake = FakeConsul()
    await fake.start()
    await fake.add("sk-in", "scikit", "10.0.0.5", 9001)
    await fake.add("sk-out", "scikit", "8.8.8.8", 9001)
    await fake.add("sk-name", "scikit", "no-such-host.invalid", 9001)
    await fake.add("sk-local", "scikit", "localhost", 9002)
    registry = ConsulRegistry(fake.address, wait_s=1.0, admit=RuntimeNetworks("10.0.0.0/8,127.0.0.0/8,::1/128").admit)
    heard = Heard()
    registry.on_runtime(heard.runtime)
    await registry.start()
    try:
        await until(lambda: len(registry.endpoints().get("scikit", [])) == 2, what="admitted instances")
        endpoints = registry.endpoints()["scikit"]
        hosts = dict(sorted((e.instance_id, e.host) for e in endpoints))
        assert hosts.keys() == {"sk-in", "sk-local"} and hosts["sk-in"] == "10.0.0.5" and hosts["sk-local"] in ("127.0.0.1", "::1")
        await until(lambda: len(heard.runtimes) == 2, what="the manager told of the admitted ones")
        assert sorted(h[2] for h in heard.runtimes) == sorted(hosts.values())  # resolved addresses, never names
    finally:
        await registry.stop()
        await fake.stop()
