"""Profile: where one request of bench/three_stage.py's pipeline spends its time, per process.

Starts the same mesh as ``bench/three_stage.py`` (its ``train`` and ``STAGES``: the
3-stage breast_cancer pipeline on one scikit runtime; no MLServer), then for each way
(OIP gRPC to the gateway, HTTP ``POST /serve/bc``) and each client count, drives the
pipeline for ``--seconds`` while

* reading every process's CPU time (``/proc/<pid>/stat``, and per thread
  ``/proc/<pid>/task/*/stat``) before and after: gateway, runtime and each Envoy;
  divided by the requests answered, that is CPU ms per request per process, and per
  thread name (``event_engine``, ``grpc_global_tim``...: gRPC's own C threads);
* sampling the gateway and the runtime with ``py-spy record`` (``--nonblocking``: the
  processes are not paused), and putting each sample in one category by the innermost
  frame that says what the work is for: gRPC server, gRPC client, gRPC C core / Cython,
  asyncio loop, FastAPI/Starlette/uvicorn, middleware, front-door handlers (api.py,
  oip.py...), pipeline runner (executor, graph), JSON/codec, tracing, metrics
  (prometheus), served_by, runtime server, model compute, thread-pool hand-off, logging,
  other. A category's share of the samples times the CPU per request of the threads
  py-spy sees (the Python ones) is its CPU ms per request; the C-only threads' CPU is
  its own row, so a table sums to the process's CPU.

Library frames (numpy, the standard library's threading, contextlib, functools...) are
see-through: a numpy call made by scikit-learn is model compute, one made by the codec
is codec. Cython code (grpc's ``cygrpc``, uvloop, uvicorn's httptools parser) makes no
Python frames: its time lands on the Python frame that called it (e.g. a stage call's
``UnaryUnaryCall._invoke``: gRPC client), or, when the loop called it (a gRPC server
call being handled, a completion being delivered, bytes read from a socket), on the loop:
"asyncio loop" holds most of gRPC's and uvloop's C work in that process. A thread whose
only Python frame is ``Thread.run`` runs a Cython target: grpc.aio's completion-queue
poller ("gRPC C core / Cython").

py-spy attaches with ptrace; where that is refused (a container without
``CAP_SYS_PTRACE``), the CPU table is still printed and the categories are skipped.

Run by hand: ``.venv/bin/python bench/profile_request.py [--seconds 10] [--clients 1,8]
[--ways grpc,http] [--rate 250] [--keep DIR]`` (``--keep``: py-spy's raw profiles, one
collapsed stack per line, for flame graphs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.three_stage import define_pipeline, gateway_calls, sluice_mesh, trained  # noqa: E402
from sluice.serving import install_uvloop  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
#: the processes measured: name shown -> the mesh's process key
PROCESSES = {
    "gateway": "gateway",
    "runtime (scikit)": "runtime-scikit",
    "gateway Envoy": "gateway-sidecar",
    "runtime Envoy": "runtime-scikit-sidecar",
}
PROFILED = ("gateway", "runtime (scikit)")
#: this process, the clients (counted apart: not the mesh's cost)
CLIENT = "client (this process)"

# --- categories: (category, pattern on a frame's file, py-spy's short path, or its function), first match wins
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("tracing", r"^sluice/tracing\.py|^opentelemetry/"),
    ("metrics (prometheus)", r"^prometheus_client/|^gateway/metrics\.py|^sluice/metrics\.py"),
    ("served_by", r"^gateway/served_by\.py"),
    ("middleware", r"^sluice/limits\.py|^sluice/jsonbody\.py|^starlette/middleware/|^fastapi/middleware/"),
    ("JSON/codec", r"^gateway/codec\.py|^sluice/tensors\.py|^orjson|^json/|^google/protobuf/|_message\.|upb|protobuf"),
    ("front-door handlers", r"^gateway/api\.py|^gateway/oip\.py|^gateway/oip_models\.py|^gateway/v2\.py"),
    ("pipeline runner", r"^gateway/executor\.py|^gateway/graph\.py|^gateway/pipelines\.py|^gateway/app\.py|^gateway/batching\.py|^sluice/fusion\.py"),
    ("gRPC client", r"^grpc/aio/_call\.py|^grpc/aio/_channel\.py|^grpc/aio/_interceptor\.py|^grpc/aio/_base_call|^grpc/aio/_metadata|^grpc/_channel\.py"),
    ("gRPC server", r"^grpc/aio/_server\.py|^grpc/_server\.py|^grpc_health/|^grpc/_utilities"),
    ("model compute", r"^sklearn/|^scipy/|^joblib/|^threadpoolctl|^narwhals/|^runtimes/scikit/|^runtimes/sdk/model\.py|openblas|libgomp|_multiarray|numpy"),
    ("runtime server", r"^runtimes/sdk/"),
    ("FastAPI/Starlette/uvicorn", r"^fastapi/|^starlette/|^uvicorn/|^anyio/|^pydantic|^h11/|^httptools|^httpx/"),
    ("logging", r"^logging/|^sluice/logs\.py"),
    ("gRPC C core / Cython", r"cygrpc|grpc_core|libgrpc|grpc_|absl|_cython"),
    ("asyncio loop", r"uvloop|uv__|^asyncio/|^selectors\.py|epoll"),
)
#: frames that do not say what the work is for: look at their caller
SEE_THROUGH = (r"^numpy/|^threading\.py|^concurrent/futures/|^contextlib\.py|^functools\.py|^typing\.py|^abc\.py|^enum\.py"
               r"|^copy\.py|^dataclasses\.py|^re/|^collections/|^contextvars|^_weakrefset|^weakref|^queue\.py|^inspect\.py|^warnings\.py"
               r"|\.so|\.c$|\.h$|^0x|libc|libpython|^<")
#: what a sample made only of see-through frames is, by its innermost Python frame
FALLBACK: tuple[tuple[str, str], ...] = (
    ("thread-pool hand-off", r"^threading\.py|^concurrent/futures/|^queue\.py"),
    ("JSON/codec", r"^numpy/"),
)
ORDER = ("gRPC server", "gRPC client", "gRPC C core / Cython", "asyncio loop", "FastAPI/Starlette/uvicorn", "middleware",
         "front-door handlers", "pipeline runner", "JSON/codec", "tracing", "metrics (prometheus)", "served_by",
         "runtime server", "model compute", "thread-pool hand-off", "logging", "other")
_COMPILED = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]
_SEE_THROUGH = re.compile(SEE_THROUGH)
_FALLBACK = [(name, re.compile(pattern)) for name, pattern in FALLBACK]
_FRAME = re.compile(r"^(.*) \((.+?)(?::\d+)?\)$")


def _parts(frame: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame ``function (file:line)``."""
    match = _FRAME.match(frame)
    return (match.group(1), match.group(2)) if match else (frame, "")


def categorize(frames: list[str]) -> str:
    """The category of one sample (its frames root first): the innermost frame that
    says what the work is for; a Python frame of the event loop's run (uvloop and the
    gRPC completions it runs are Cython: no frames) is the loop."""
    for frame in reversed(frames):
        function, path = _parts(frame)
        for name, pattern in _COMPILED:
            if pattern.search(path) or (not path.endswith(".py") and pattern.search(function)):
                return name
        if not _SEE_THROUGH.search(path):
            return "other"
    python = [f for f in frames if _parts(f)[1].endswith(".py")]
    if python and python[-1].startswith("Thread.run (threading.py"):
        # a thread whose target is Cython: grpc.aio's completion-queue poller
        return "gRPC C core / Cython"
    leaf = _parts(python[-1])[1] if python else ""
    return next((name for name, pattern in _FALLBACK if pattern.search(leaf)), "other")


@dataclass
class Profile:
    samples: Counter  # category -> samples
    functions: Counter  # innermost frame -> samples

    @property
    def total(self) -> int:
        return sum(self.samples.values())


def read_profile(path: Path) -> Profile:
    """py-spy's raw (collapsed) output: ``frame;frame;... count`` per line."""
    samples: Counter = Counter()
    functions: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        samples[categorize(frames)] += int(count)
        functions[_short(frames[-1]) if frames else "?"] += int(count)
    return Profile(samples, functions)


def _short(frame: str) -> str:
    """``fn (/long/path/site-packages/pkg/mod.py:12)`` -> ``fn (pkg/mod.py)``."""
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    for marker in ("site-packages/", "/lib/python3", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{function} ({path})"


# --- CPU time from /proc


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread of ``pid``, keyed ``<name>/<tid>``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) * TICK_S
    return out


def by_thread_name(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds spent between the two readings, per thread name (threads of one name summed)."""
    spent: dict[str, float] = defaultdict(float)
    for key, value in after.items():
        spent[key.rsplit("/", 1)[0]] += value - before.get(key, 0.0)
    return dict(spent)


# --- load


async def drive(call, clients: int, seconds: float) -> tuple[int, float]:
    """Run ``call`` from ``clients`` tasks for ``seconds``: (requests answered, p50 ms)."""
    stop = time.perf_counter() + seconds
    latencies: list[float] = []

    async def client() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(client() for _ in range(clients)))
    return len(latencies), float(np.median(latencies) * 1000) if latencies else 0.0


@dataclass
class Cell:
    way: str
    clients: int
    requests: int
    seconds: float
    p50_ms: float
    cpu_ms: dict[str, float]  # process -> CPU ms per request
    threads: dict[str, dict[str, float]]  # process -> thread name -> CPU ms per request
    profiles: dict[str, Profile]
    #: process -> CPU ms per request of its Python threads (those named as its main thread)
    python_ms: dict[str, float]


async def measure(way: str, call, clients: int, seconds: float, pids: dict[str, int], rate: int, workdir: Path,
                  spy: bool) -> Cell:
    for _ in range(200):  # warm: connections, caches, the first requests' imports
        await call()
    spies = {}
    if spy:
        for name in PROFILED:
            out = workdir / (re.sub(r"\W+", "-", f"{name}-{way}-{clients}").strip("-") + ".txt")
            spies[name] = (out, subprocess.Popen(
                [str(PY_SPY), "record", "--pid", str(pids[name]), "--duration", str(int(seconds) + 1), "--rate", str(rate),
                 "--nonblocking", "--format", "raw", "-o", str(out)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        await asyncio.sleep(0.5)  # py-spy attaches
    before = {n: (cpu_s(p), thread_cpu_s(p)) for n, p in pids.items()}
    started = time.perf_counter()
    requests, p50 = await drive(call, clients, seconds)
    elapsed = time.perf_counter() - started
    after = {n: (cpu_s(p), thread_cpu_s(p)) for n, p in pids.items()}
    profiles = {}
    for name, (out, proc) in spies.items():
        try:
            output = proc.communicate(timeout=seconds + 30)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0].decode(errors="replace")
        if proc.returncode == 0 and out.exists():
            profiles[name] = read_profile(out)
        else:
            print(f"py-spy on {name} failed (ptrace refused?): {output.strip()[-400:]}", file=sys.stderr)
    per = 1000 / max(requests, 1)
    threads = {n: {t: s * per for t, s in by_thread_name(before[n][1], after[n][1]).items()} for n in pids}
    main_names = {n: Path(f"/proc/{p}/comm").read_text().strip() for n, p in pids.items()}
    return Cell(
        way, clients, requests, elapsed, p50,
        {n: (after[n][0] - before[n][0]) * per for n in pids},
        threads, profiles,
        {n: threads[n].get(main_names[n], 0.0) for n in pids},
    )


def report(console: Console, cell: Cell, top: int) -> None:
    rps = cell.requests / cell.seconds
    table = Table(title=f"{cell.way}, {cell.clients} client{'s' if cell.clients > 1 else ''}: {cell.requests} requests in "
                        f"{cell.seconds:.1f} s ({rps:,.0f} req/s, p50 {cell.p50_ms:.2f} ms): CPU ms per request")
    table.add_column("process")
    table.add_column("CPU ms/req", justify="right")
    table.add_column("threads (CPU ms/req)")
    for name, ms in cell.cpu_ms.items():
        threads = sorted(cell.threads[name].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{t} {v:.2f}" for t, v in threads if v >= 0.005) or "-"
        table.add_row(name, f"{ms:.2f}", shown)
    table.add_row("all (the mesh)", f"{sum(v for k, v in cell.cpu_ms.items() if k != CLIENT):.2f}", "")
    console.print(table)
    for name, profile in cell.profiles.items():
        if not profile.total:
            continue
        cpu, python = cell.cpu_ms[name], cell.python_ms[name]
        breakdown = Table(title=f"{name} ({cell.way}, {cell.clients} clients): {cpu:.2f} CPU ms/req by category "
                                f"({profile.total} py-spy samples of its Python threads)")
        breakdown.add_column("category")
        breakdown.add_column("share", justify="right")
        breakdown.add_column("CPU ms/req", justify="right")
        for category in ORDER:
            n = profile.samples.get(category, 0)
            if n:
                breakdown.add_row(category, f"{python * n / profile.total / cpu:.0%}", f"{python * n / profile.total:.3f}")
        breakdown.add_row("C-only threads (gRPC event engine, timers)", f"{(cpu - python) / cpu:.0%}", f"{cpu - python:.3f}")
        console.print(breakdown)
        functions = Table(title=f"{name} ({cell.way}, {cell.clients} clients): top {top} innermost Python frames")
        functions.add_column("function")
        functions.add_column("share", justify="right")
        for function, n in profile.functions.most_common(top):
            functions.add_row(function, f"{n / profile.total:.1%}")
        console.print(functions)


async def run(args: argparse.Namespace) -> None:
    console = Console(width=160)
    with trained() as (work, row, _):
        mesh = sluice_mesh(work)
        with mesh:
            define_pipeline(mesh)
            pids = {name: mesh.procs[key].pid for name, key in PROCESSES.items()}
            pids[CLIENT] = os.getpid()  # the load itself (httpx / grpc.aio clients), for comparison
            via_grpc, via_http, close = gateway_calls(mesh, row)
            calls = {"grpc": ("OIP gRPC", via_grpc), "http": ("HTTP /serve", via_http)}
            spy = PY_SPY.exists() and not args.no_spy
            keep = Path(args.keep) if args.keep else None
            if keep:
                keep.mkdir(parents=True, exist_ok=True)
            if not spy:
                console.print("py-spy not found (or --no-spy): CPU per process only")
            cells = []
            for clients in args.clients:
                for way in args.ways:
                    label, call = calls[way]
                    cell = await measure(label, call, clients, args.seconds, pids, args.rate, keep or work, spy)
                    report(console, cell, args.top)
                    cells.append(cell)
            await close()
    summary(console, cells)


def summary(console: Console, cells: list[Cell]) -> None:
    """One row per way and client count: CPU ms per request of each process."""
    sampled = any(cell.profiles for cell in cells)
    table = Table(title=f"CPU ms per request, per process (py-spy sampling {'on' if sampled else 'off'}; the box's other load included)")
    for column in ("way", "clients", "req/s", "p50 ms", *PROCESSES, "the mesh", CLIENT):
        table.add_column(column, justify="left" if column == "way" else "right")
    for cell in cells:
        table.add_row(cell.way, str(cell.clients), f"{cell.requests / cell.seconds:,.0f}", f"{cell.p50_ms:.2f}",
                      *(f"{cell.cpu_ms[name]:.2f}" for name in PROCESSES),
                      f"{sum(cell.cpu_ms[name] for name in PROCESSES):.2f}", f"{cell.cpu_ms[CLIENT]:.2f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8])
    parser.add_argument("--ways", type=lambda s: s.split(","), default=["grpc", "http"])
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=12, help="innermost frames listed per process")
    parser.add_argument("--no-spy", action="store_true", help="CPU per process only")
    parser.add_argument("--keep", default="", help="a folder to keep py-spy's raw profiles in")
    args = parser.parse_args()
    install_uvloop()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
