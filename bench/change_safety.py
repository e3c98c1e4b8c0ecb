"""Benchmark: how safe pipeline changes are on a real mesh (issue #11), by hand.

Starts the mesh of ``tests/e2e/test_change_safety.py`` (iris on scikit, two 0.8 s
``sleeper`` stages, a 1 s manager ACK timeout) on free ports and runs:

  slow replaces   pipeline ``slow`` (1.6 s a request) replaced ``--replaces`` times
                  while ``--clients`` clients keep requests in flight: requests sent,
                  failed, p99, and how long the replaces took (they wait for drains)
  manager kills   ``--kills`` SIGKILLs of the manager at random moments of create,
                  replace and delete calls; after each restart, the time until the store,
                  the gateway sidecar's routes and the gateway agree, and any disagreement

Run: ``.venv/bin/python bench/change_safety.py [--replaces 20] [--clients 8] [--kills 50]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import p99  # noqa: E402
from tests.e2e.test_change_safety import kill_manager_during_churn, make_mesh, replace_under_slow_load  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replaces", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--workdir", type=Path, help="keep the mesh's files (logs) here instead of a temporary folder")
    args = parser.parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sluice-change-safety-") as tmp:
        tmp = args.workdir or tmp
        started = time.monotonic()
        with make_mesh(Path(tmp)) as mesh:
            print(f"mesh up in {time.monotonic() - started:.1f}s")
            load, took, wrong = replace_under_slow_load(mesh, args.replaces, args.clients)
            print(f"slow replaces: {args.replaces} done ({len(wrong)} not answered 200) with {args.clients} clients of 1.6 s requests in flight")
            print(f"  requests sent {len(load.answers)}, failed {len(load.failures())}, p99 {p99([a.latency_s for a in load.answers]):.2f}s")
            print(f"  replace took p50 {statistics.median(took):.2f}s, max {max(took):.2f}s (ACK timeout 1.0s)")
            started = time.monotonic()
            stats = kill_manager_during_churn(mesh, args.kills)
            print(f"manager kills: {stats.kills} done in {time.monotonic() - started:.0f}s, "
                  f"{stats.changes_confirmed} of the killed changes had answered before the kill, "
                  f"{stats.recoveries} restarts finished a change cut short")
            print(f"  restart (SIGKILL to ready) p50 {pct(stats.restart_s, 0.5):.2f}s, p99 {pct(stats.restart_s, 0.99):.2f}s")
            print(f"  agreement after restart p50 {pct(stats.settle_s, 0.5):.2f}s, p99 {pct(stats.settle_s, 0.99):.2f}s")
            print(f"  disagreements found: {len(stats.disagreements)}; half-made pipelines served: {len(stats.half_made)}")
            for line in [*stats.disagreements, *stats.half_made]:
                print(f"    {line}")


if __name__ == "__main__":
    main()
