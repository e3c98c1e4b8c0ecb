"""Benchmark: the control plane at 10,000 pipelines.

Starts a real local mesh (manager, repository, one scikit runtime with the iris
models, gateway, each with its Envoy sidecar; Envoys on delta xDS) on free ports and
measures, through the REST API:

* a single create (create then delete a probe pipeline, each answered once live:
  routes ACKed by the gateway's Envoy, the gateway serving it), p50/p99, with 0,
  1,000 and 10,000 pipelines present;
* a bulk apply of 1,000 pipelines and of 9,000 more (to 10,000), until answered (live);
* xDS bytes sent for one create at each size (the manager's ``/api/v1/mesh`` counter);
* resident memory of the manager, the gateway and the gateway's Envoy, and per pipeline.

Run by hand: ``.venv/bin/python bench/control_plane_scale.py [--probes 30] [--max 10000]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402

CHAIN = ["scikit/iris_scaler", "scikit/iris_classifier"]
RECORD = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def probe_creates(http: httpx.Client, gateway: httpx.Client, probes: int) -> tuple[float, float, int]:
    """p50/p99 ms of single creates (each answered live, checked by serving it), and xDS bytes per create."""
    times = []
    before = http.get("/api/v1/mesh").json()["bytes_sent"]
    for i in range(probes):
        start = time.perf_counter()
        response = http.post("/api/v1/pipelines", json={"name": f"probe-{i}", "chain": CHAIN})
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 201, response.text
        assert gateway.post(f"/serve/probe-{i}", json=RECORD).status_code == 200
    created_bytes = (http.get("/api/v1/mesh").json()["bytes_sent"] - before) // probes
    for i in range(probes):
        assert http.delete(f"/api/v1/pipelines/probe-{i}").status_code == 204
    q = statistics.quantiles(times, n=100)
    return q[49], q[98], created_bytes


def bulk(http: httpx.Client, start: int, stop: int) -> float:
    """Seconds for one apply that adds pipelines start..stop-1 (keeping those before)."""
    definitions = [{"name": f"p{i}", "chain": CHAIN} for i in range(stop)]
    began = time.perf_counter()
    response = http.post("/api/v1/pipelines:apply", json={"pipelines": definitions})
    elapsed = time.perf_counter() - began
    assert response.status_code == 200, response.text[:500]
    assert len(response.json()["created"]) == stop - start, response.json()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--max", type=int, default=10_000)
    args = parser.parse_args()
    console = Console()
    sizes = [0, 1_000, args.max]
    runtimes = [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))]
    rows, memory, applies = [], [], []
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as workdir, LocalMesh(Path(workdir), runtimes, MeshPorts.ephemeral()) as mesh:
        pids = {
            "manager": mesh.procs["manager"].pid,
            "gateway": mesh.procs["gateway"].pid,
            "gateway's Envoy": mesh.procs["gateway-sidecar"].pid,
        }
        with httpx.Client(base_url=mesh.manager_url, timeout=600) as http, httpx.Client(base_url=mesh.gateway_url, timeout=30) as gateway:
            present = 0
            for size in sizes:
                if size > present:
                    seconds = bulk(http, present, size)
                    applies.append((size - present, size, seconds))
                    present = size
                    assert gateway.post(f"/serve/p{size - 1}", json=RECORD).status_code == 200
                memory.append((size, {name: rss_mb(pid) for name, pid in pids.items()}))
                p50, p99, sent = probe_creates(http, gateway, args.probes)
                rows.append((size, p50, p99, sent))

    table = Table(title="single create, answered live (routes ACKed, gateway serving)")
    for column in ("pipelines present", "p50 ms", "p99 ms", "xDS bytes sent"):
        table.add_column(column)
    for size, p50, p99, sent in rows:
        table.add_row(f"{size:,}", f"{p50:.1f}", f"{p99:.1f}", f"{sent:,}")
    console.print(table)
    table = Table(title="bulk apply, until answered live")
    for column in ("pipelines applied", "pipelines after", "seconds", "per pipeline ms"):
        table.add_column(column)
    for added, total, seconds in applies:
        table.add_row(f"{added:,}", f"{total:,}", f"{seconds:.2f}", f"{seconds * 1000 / added:.2f}")
    console.print(table)
    table = Table(title="resident memory, MB (per pipeline: KB)")
    table.add_column("process")
    for size, _ in memory:
        table.add_column(f"{size:,} pipelines")
    table.add_column(f"KB per pipeline (0 -> {sizes[-1]:,})")
    for name in pids:
        first, last = memory[0][1][name], memory[-1][1][name]
        table.add_row(name, *(f"{m[name]:.1f}" for _, m in memory), f"{(last - first) * 1024 / max(sizes[-1], 1):.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
