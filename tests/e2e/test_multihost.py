"""The mesh over several hosts: Linux network namespaces on one bridge (sluice.local.netns).

Host ``control`` runs the manager and the repository, host ``gateway`` the gateway, hosts
``rt1`` and ``rt2`` one replica each of the scikit runtime; each process with its real
Envoy sidecar on its own host, sidecars talking mTLS across the bridge. Under a steady
load of 8 concurrent clients, rt1's cable is pulled (its link set down): no request is
lost, the other replica takes them, and the manager drops rt1 when its heartbeats stop.
Then the cable goes back: rt1 registers again and takes traffic again.

Needs root (namespaces) and iproute2; the namespaces and links are named per run and
removed by name in the fixture's finalizer, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from bench.load import Load
from sluice.local.mesh import RuntimeSpec
from sluice.local.multihost import RUNTIME_PUBLIC_PORT, MultiHostMesh
from sluice.local.netns import Host, HostNetwork
from tests.conftest import eventually

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2"),
]
RECORD = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]
CLIENTS = 8


@pytest.fixture
def network():
    network = HostNetwork()
    try:
        yield network.create()
    finally:
        left = network.destroy()
        assert left == [], f"not removed: {left}"


@pytest.fixture
def cluster(tmp_path, network, model_store):
    mesh = MultiHostMesh(tmp_path, network, RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier")),
                         replicas=2, env={"SLUICE_MANAGER_HEARTBEAT_TTL_S": "3", "SLUICE_LOG_LEVEL": "INFO"})
    with mesh:
        yield mesh


def served_by(cluster: MultiHostMesh, host: Host) -> int:
    """Stage calls the gateway's Envoy completed on ``host``'s runtime (its per-host stat)."""
    status = cluster.admin("gateway", "/clusters?format=json").json()
    total = 0
    for c in status.get("cluster_statuses", []):
        for h in c.get("host_statuses", []):
            address = h["address"]["socket_address"]
            if address["address"] == host.address and address["port_value"] == RUNTIME_PUBLIC_PORT:
                total += sum(int(s.get("value", 0)) for s in h["stats"] if s["name"] == "rq_success")
    return total


def test_a_runtime_host_cut_off_under_load_loses_no_request_and_comes_back(cluster):
    rt1, rt2 = cluster.runtime_hosts
    assert sorted(cluster.instance_hosts()) == sorted([rt1.address, rt2.address])
    # the two replicas' sidecars share one token for the prefix runtime-scikit-: two nodes
    mesh = httpx.get(f"{cluster.manager_url}/api/v1/mesh", headers=cluster.admin_headers, timeout=10).json()
    assert {n: (v["role"], v["service"], v["connected"]) for n, v in mesh["nodes"].items() if n.startswith("runtime-")} == {
        "runtime-scikit-rt1": ("runtime", "scikit", True), "runtime-scikit-rt2": ("runtime", "scikit", True)}
    headers = cluster.admin_headers
    created = httpx.post(f"{cluster.manager_url}/api/v1/pipelines", headers=headers, timeout=10,
                         json={"name": "iris", "chain": ["scikit/iris_scaler", "scikit/iris_classifier"]})
    assert created.status_code == 201, created.text

    with Load(cluster.gateway_url, "iris", RECORD, lambda r: r.json()[0]["label"] == "virginica",
              clients=CLIENTS, headers=headers, timeout_s=30) as load:
        # both replicas serve, across the bridge, through mTLS between the sidecars
        eventually(lambda: served_by(cluster, rt1) > 0 and served_by(cluster, rt2) > 0, timeout_s=20, interval_s=0.2)
        cluster.network.cut(rt1)
        cut_at = time.monotonic()
        rt2_at_cut = served_by(cluster, rt2)
        # the manager notices missed heartbeats and withdraws rt1; meanwhile rt2 serves everything
        eventually(lambda: cluster.instance_hosts() == [rt2.address], timeout_s=20, interval_s=0.2)
        withdrawn_s = time.monotonic() - cut_at
        load.wait_successes(100, since=cut_at, timeout_s=20)
        assert served_by(cluster, rt2) > rt2_at_cut
        rt1_at_restore = served_by(cluster, rt1)

        cluster.network.restore(rt1)
        restored_at = time.monotonic()
        during_cut = load.window(cut_at, restored_at)
        # rt1 registers again (its heartbeat is refused as unknown) and takes traffic again
        eventually(lambda: sorted(cluster.instance_hosts()) == sorted([rt1.address, rt2.address]), timeout_s=30, interval_s=0.2)
        eventually(lambda: served_by(cluster, rt1) > rt1_at_restore + 20, timeout_s=30, interval_s=0.2)
        back_s = time.monotonic() - restored_at

    answers, failures = load.window(), [a.failure for a in load.failures()]
    print(f"\nmulti-host: {len(answers)} requests by {CLIENTS} clients, statuses {dict(load.statuses())}, "
          f"{len(during_cut)} sent while rt1 was cut off; rt1 withdrawn {withdrawn_s:.1f}s after the cut, "
          f"serving again {back_s:.1f}s after the restore; slowest request {max(a.latency_s for a in answers):.2f}s")
    # the calls in flight on rt1 when its cable went are not lost either: the runtime
    # clusters' HTTP/2 keepalive finds the silent connection within 2 s and resets it, and
    # Envoy retries them on rt2
    assert failures == [], f"{len(failures)} failed requests, e.g. {failures[:3]}"
    assert set(load.statuses()) == {200}
