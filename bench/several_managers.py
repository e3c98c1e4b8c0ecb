"""Change propagation across managers: the time from a write through manager 2 (a
replace, ``PUT /api/v1/pipelines/<name>``) until the gateway's sidecar Envoy, connected
to manager 1, holds the new revision's routes (its config_dump: what it ACKed), and until
the gateway serves the new revision; p50/p99 over N changes. Also the API call's own
time: it answers only once every live manager confirmed every phase of the change
(``ControlPlane._everywhere``), so once answered, the other manager's Envoy has the routes.
``--apart``: the gateway's sidecar follows manager 2 while the gateway process follows
manager 1 (the phases keep make-before-break across the two).

Real PostgreSQL (``sluice.local.postgres``), two managers, real Envoys and processes
(``sluice.local.managers.two_manager_mesh``). Run by hand:

    .venv/bin/python -m bench.several_managers --changes 200 [--apart]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.load import p99
from sluice.local.managers import two_manager_mesh
from sluice.local.mesh import RuntimeSpec

CHAIN = ["scikit/iris_scaler", "scikit/iris_classifier"]


def routes_of(admin_url: str, name: str) -> set[str]:
    dump = httpx.get(f"{admin_url}/config_dump?resource=dynamic_scoped_route_configs", timeout=5).json()
    return {
        r["name"] for c in dump["configs"] for s in c.get("scoped_route_configs", []) if s["name"] == f"egress.{name}"
        for vh in s["route_configuration"]["virtual_hosts"] for r in vh["routes"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--apart", action="store_true", help="the gateway's sidecar on manager 2, the gateway on manager 1")
    args = parser.parse_args()
    on_second = ("runtime-scikit", "gateway") if args.apart else "runtime-scikit"
    with tempfile.TemporaryDirectory(prefix="sluice-bench-managers-") as tmp:
        runtimes = [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))]
        with two_manager_mesh(Path(tmp), runtimes, on_second) as (mesh, second, _):
            admin = mesh.admin_url("gateway")
            with httpx.Client(base_url=second.url, timeout=30) as m2:
                assert m2.post("/api/v1/pipelines", json={"name": "bench", "chain": CHAIN}).status_code == 201
                routed_s: list[float] = []
                answer_s: list[float] = []
                after_answer_s: list[float] = []
                for i in range(args.changes):
                    revision = i + 2
                    started = time.monotonic()
                    answer = m2.put("/api/v1/pipelines/bench", json={"name": "bench", "chain": CHAIN})
                    answered = time.monotonic()
                    assert answer.status_code == 200 and answer.json()["revision"] == revision, answer.text
                    deadline = started + 10
                    while f"bench.r{revision}.s0" not in routes_of(admin, "bench"):
                        if time.monotonic() > deadline:
                            raise SystemExit(f"change {revision} did not reach manager 1's gateway sidecar in 10 s")
                        time.sleep(0.002)
                    now = time.monotonic()
                    routed_s.append(now - started)
                    answer_s.append(answered - started)
                    after_answer_s.append(max(0.0, now - answered))
    where = "manager 2 (gateway process on manager 1)" if args.apart else "manager 1"
    print(f"{args.changes} replaces through manager 2, seen ACKed by the gateway sidecar on {where}:")
    print(f"  the API call (every phase confirmed by both managers): p50 {statistics.median(answer_s) * 1000:.1f} ms, "
          f"p99 {p99(answer_s) * 1000:.1f} ms")
    print(f"  write -> the gateway's sidecar shows the routes (config_dump polls): p50 {statistics.median(routed_s) * 1000:.1f} ms, "
          f"p99 {p99(routed_s) * 1000:.1f} ms, max {max(routed_s) * 1000:.1f} ms")
    print(f"  manager 2's answer -> seen in config_dump (incl. the config_dump request): p50 {statistics.median(after_answer_s) * 1000:.1f} ms, "
          f"p99 {p99(after_answer_s) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
