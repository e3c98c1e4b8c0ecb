"""Zipkin down and Consul down under a steady load of 8 clients: serving is unaffected.

One mesh (bench/dependencies_down.py's: real processes and Envoys, the real Zipkin
server, discovery through Consul, here the Consul imitation as a process of its own
whose catalog survives a crash in its data file, tests/e2e/consul_server.py):

* Zipkin gets SIGKILL: zero failed requests; Envoy's span flush really hit the dead
  collector; no request took long (a tracer blocking on the dead collector would show
  as requests of seconds). p50/p99 before and during are printed.
* Consul gets SIGKILL: zero failed requests; the manager's ``/healthz`` turns 503 and
  names the failing registry (Consul) while the manager keeps the endpoints Consul last
  gave it; Consul started again on its port: ``/healthz`` is 200 again, still zero failures.

The bench module prints the same runs as a table (``python -m bench.dependencies_down``).
"""

from __future__ import annotations

import pytest

from bench.dependencies_down import consul_killed, dependency_mesh, zipkin_killed
from sluice.local import zipkin

pytestmark = pytest.mark.e2e

#: a request slower than this means a tracer or the registry blocked the serving path
HANG_MS = 2000.0


@pytest.fixture(scope="module")
def deps(tmp_path_factory, model_store):
    if zipkin.jar_path() is None or zipkin.java() is None:
        pytest.skip("the Zipkin server needs Java and its jar (./build.sh fetches it)")
    with dependency_mesh(tmp_path_factory.mktemp("deps")) as (mesh, consul):
        yield mesh, consul


def _failures(run) -> list[str]:
    return [f"{a.status} {a.failure[:200]}" for a in run.failed][:5]


def test_zipkin_sigkill_under_load_fails_no_request(deps) -> None:
    mesh, _ = deps
    run = zipkin_killed(mesh)
    (b50, b99), (d50, d99) = run.before, run.during
    print(f"\nZipkin SIGKILL: {len(run.load.answers)} requests, {len(run.failed)} failed; "
          f"p50/p99 before {b50:.1f}/{b99:.1f} ms, during {d50:.1f}/{d99:.1f} ms; slowest {run.slowest_ms:.0f} ms; {run.notes}")
    assert not run.failed, _failures(run)
    assert run.notes["envoy_collector_connect_failures_before"] == 0, "Envoy could not reach Zipkin before the fault"
    assert run.notes["envoy_collector_connect_failures"] > 0, "Envoy's span flush never met the dead collector"
    assert run.slowest_ms < HANG_MS


def test_consul_sigkill_under_load_keeps_endpoints_reports_and_recovers(deps) -> None:
    mesh, consul = deps
    run = consul_killed(mesh, consul)
    (b50, b99), (d50, d99) = run.before, run.during
    print(f"\nConsul SIGKILL: {len(run.load.answers)} requests, {len(run.failed)} failed; "
          f"p50/p99 before {b50:.1f}/{b99:.1f} ms, during {d50:.1f}/{d99:.1f} ms; slowest {run.slowest_ms:.0f} ms; {run.notes}")
    assert not run.failed, _failures(run)
    before, during = run.endpoints
    assert before and during == before, "the manager must keep the last endpoints Consul gave it"
    error = run.report["error"]
    assert error["code"] == "unhealthy" and "registry" in error["details"]["checks"]
    assert "consul" in error["details"]["checks"]["registry"].lower()
    assert run.slowest_ms < HANG_MS
