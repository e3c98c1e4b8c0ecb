"""The multi-host fault run as a table: a runtime host's cable pulled under load.

Four "hosts" (network namespaces on one bridge, ``sluice.local.netns``): the manager and
the repository on one, the gateway on one, one scikit runtime replica on each of two
(``sluice.local.multihost``). 8 client threads send the iris record through the
gateway throughout; the run is cut into phases: both replicas up, rt1's link down, rt1's
link up again. One row per phase: requests sent, failed (and their statuses), p50, p99
and slowest latency, and requests served by each replica (the gateway Envoy's per-host
``rq_success``). Needs root and iproute2.

    sudo .venv/bin/python -m bench.multihost [--phase-s 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.load import Load, p99
from sluice.local.mesh import RuntimeSpec
from sluice.local.multihost import RUNTIME_PUBLIC_PORT, MultiHostMesh
from sluice.local.netns import Host, HostNetwork

RECORDS = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]


def served(mesh: MultiHostMesh, host: Host) -> int:
    status = mesh.admin("gateway", "/clusters?format=json").json()
    return sum(int(s.get("value", 0)) for c in status.get("cluster_statuses", []) for h in c.get("host_statuses", [])
               if (h["address"]["socket_address"]["address"], h["address"]["socket_address"]["port_value"]) == (host.address, RUNTIME_PUBLIC_PORT)
               for s in h["stats"] if s["name"] == "rq_success")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=15.0, help="seconds per phase (default %(default)s)")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-multihost-") as tmp, HostNetwork() as network:
        mesh = MultiHostMesh(Path(tmp), network, RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier")),
                             replicas=2, env={"SLUICE_MANAGER_HEARTBEAT_TTL_S": "3", "SLUICE_LOG_LEVEL": "WARNING"})
        with mesh:
            rt1, rt2 = mesh.runtime_hosts
            created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", headers=mesh.admin_headers, timeout=10,
                                 json={"name": "iris", "chain": ["scikit/iris_scaler", "scikit/iris_classifier"]})
            created.raise_for_status()
            phases, counts = [], []
            with Load(mesh.gateway_url, "iris", RECORDS, lambda r: r.json()[0]["label"] == "virginica",
                      clients=args.clients, headers=mesh.admin_headers, timeout_s=30) as load:
                load.wait_successes(50, timeout_s=30)
                for phase, act in (("both replicas", None), ("rt1 cut off", network.cut), ("rt1 back", network.restore)):
                    if act is not None:
                        act(rt1)
                    phases.append((phase, time.monotonic()))
                    counts.append((served(mesh, rt1), served(mesh, rt2)))
                    time.sleep(args.phase_s)
                phases.append(("", time.monotonic()))
                counts.append((served(mesh, rt1), served(mesh, rt2)))
            # after the load stopped: a request is in its phase by when it was sent, also
            # one that hung past the phase's end
            rows = []
            for (phase, start), (_, end), before, after in zip(phases, phases[1:], counts, counts[1:]):
                answers = load.window(start, end)
                latencies = [a.latency_s for a in answers]
                failed = [a for a in answers if not a.ok]
                # a host's counters go with it when it leaves the cluster (EDS): "-" then
                on1, on2 = (str(a - b) if a >= b else "-" for a, b in zip(after, before))
                rows.append((phase, len(answers), len(failed), sorted({a.status for a in failed}),
                             statistics.median(latencies) if latencies else 0.0, p99(latencies), max(latencies, default=0.0), on1, on2))
    print(f"\nmulti-host fault run: {args.clients} clients, {args.phase_s:g}s per phase (requests by when they were sent)\n")
    print("| phase | requests | failed | failed statuses | p50 ms | p99 ms | slowest ms | stage calls on rt1 | on rt2 |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for phase, n, failed, statuses, p50, p99_, slowest, on1, on2 in rows:
        print(f"| {phase} | {n} | {failed} | {statuses or ''} | {p50 * 1000:.1f} | {p99_ * 1000:.1f} | {slowest * 1000:.0f} | {on1} | {on2} |")


if __name__ == "__main__":
    main()
