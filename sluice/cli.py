"""The ``sluice`` command: ``sluice up`` starts the whole mesh locally; ``sluice status``
shows what it serves.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

from sluice import zipkin
from sluice.mesh import LocalMesh, MeshPorts, default_runtimes, workdir_default
from sluice.metrics import histogram_quantiles
from sluice.procs import StartError

app = typer.Typer(add_completion=False, help="Sluice: a pipeline-serving mesh for ML models.")
console = Console()


@app.command()
def up(
    workdir: Path = typer.Option(None, help="state, logs and Envoy bootstraps (default .sluice/)"),
) -> None:
    """Start manager, repository, runtimes and gateway, each with its Envoy sidecar; Ctrl-C stops all."""
    tracing = zipkin.java() is not None and zipkin.jar_path() is not None
    mesh = LocalMesh(workdir or workdir_default(), default_runtimes(), MeshPorts(), zipkin_port=9411 if tracing else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with console.status("starting the mesh..."):
            mesh.start()
    except StartError as exc:
        console.print(f"[red]start-up failed:[/red] {exc}")
        raise typer.Exit(1) from None
    try:
        _print_services(mesh)
        console.print(
            "\nTry:\n"
            f"  curl -X POST {mesh.manager_url}/api/v1/pipelines -d "
            "'{\"name\":\"iris\",\"transportType\":\"http\",\"chain\":[\"scikit/iris_scaler\",\"scikit/iris_classifier\"]}'\n"
            f"  curl -X POST {mesh.gateway_url}/serve/iris -d "
            "'[{\"sepal_length\":5.1,\"sepal_width\":3.5,\"petal_length\":1.4,\"petal_width\":0.2}]'\n"
            "\nCtrl-C stops everything."
        )
        while not stop.wait(0.5):
            dead = [p.name for p in mesh.procs.values() if not p.alive()]
            if dead:
                console.print(f"[red]{', '.join(dead)} exited; logs in {mesh.supervisor.log_dir}[/red]")
                break
    finally:
        with console.status("stopping..."):
            mesh.stop()
        console.print("stopped every process.")


def _print_services(mesh: LocalMesh) -> None:
    p = mesh.ports
    console.print(f"manager     REST {mesh.manager_url}/api/v1 (docs {mesh.manager_url}/docs), xDS 127.0.0.1:{p.xds}")
    console.print(f"repository  {mesh.repository_url}/models")
    for r in mesh.runtimes:
        console.print(
            f"runtime     {r.name} ({r.kind}) OIP gRPC 127.0.0.1:{r.public_port}, models {', '.join(r.models)}, "
            f"metrics http://127.0.0.1:{r.metrics_port}/metrics"
        )
    console.print(f"gateway     {mesh.gateway_url}/serve/<pipeline> (HTTP and OIP gRPC), metrics {mesh.gateway_url}/metrics")
    if mesh.zipkin_port:
        console.print(f"zipkin      {mesh.zipkin_url}/zipkin/ (one trace per request; x-trace-id on every answer)")
    else:
        console.print("zipkin      tracing is off: no Java or no Zipkin jar (./build.sh fetches it)")
    console.print(f"logs        {mesh.supervisor.log_dir}")


@app.command()
def status(
    manager: str = typer.Option("http://127.0.0.1:8080", help="manager URL"),
    gateway: str = typer.Option("http://127.0.0.1:8083", help="gateway URL (for latency)"),
) -> None:
    """Pipelines, their stages and latency; runtimes with their health."""
    try:
        pipelines = httpx.get(f"{manager}/api/v1/pipelines", timeout=5).json()
        runtimes = httpx.get(f"{manager}/api/v1/runtimes", timeout=5).json()
    except httpx.HTTPError as exc:
        console.print(f"[red]cannot reach the manager at {manager}: {exc}[/red]")
        raise typer.Exit(1) from None
    try:
        latency = histogram_quantiles(httpx.get(f"{gateway}/metrics", timeout=5).text, "sluice_gateway_request_seconds", "pipeline")
    except httpx.HTTPError:
        latency = {}
    table = Table(title="pipelines")
    for column in ("pipeline", "revision", "stages", "p50 ms", "p99 ms"):
        table.add_column(column)
    for p in pipelines:
        q = latency.get(p["name"])
        p50, p99 = (f"{q[0.5] * 1000:.2f}", f"{q[0.99] * 1000:.2f}") if q else ("-", "-")
        table.add_row(p["name"], str(p["revision"]), " -> ".join(s["name"] for s in p["stages"]), p50, p99)
    console.print(table)
    table = Table(title="runtimes")
    for column in ("runtime", "kind", "instances", "models"):
        table.add_column(column)
    for r in runtimes:
        healthy = sum(1 for i in r["instances"] if i["healthy"])
        table.add_row(r["name"], r["kind"], f"{healthy} healthy" if healthy else "[red]none[/red]", ", ".join(m["name"] for m in r["models"]))
    console.print(table)


if __name__ == "__main__":
    app()
