"""The ``sluice`` command: ``sluice up`` starts the whole mesh locally; ``sluice status``
shows what it serves; ``sluice models``, ``sluice upload`` and ``sluice predict`` bring
a model in and call a pipeline (through the SDK, ``sluice.client``); ``sluice trace``
shows where one request's time went, hop by hop (``sluice.attribution``).

``sluice status``'s per-stage model time vs mesh time comes from recent traces (Zipkin),
not from metrics: the split needs the model's time and the stage call's time *of the
same call*, and metrics only hold each side's histogram, in different processes (the
runtimes' by model, not by pipeline stage), whose p50s do not subtract into the p50 of
the mesh's time. Traces hold both per request; the price is that only sampled requests
count (``SLUICE_TRACE_SAMPLE_RATE``) and nothing shows when tracing is off.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

from sluice import attribution
from sluice.local import zipkin
from sluice.client import Client, SluiceError, default_token
from sluice.local.mesh import LocalMesh, MeshPorts, default_runtimes, workdir_default
from sluice.metrics import histogram_quantiles
from sluice.local.healer import Healer
from sluice.local.procs import StartError
from sluice.trace_query import ZipkinError, fetch_trace, recent_traces

app = typer.Typer(add_completion=False, help="Sluice: a pipeline-serving mesh for ML models.")
console = Console()


@app.command()
def up(
    workdir: Path = typer.Option(None, help="state, logs and Envoy bootstraps (default $SLUICE_HOME, else .sluice/)"),
    secure: bool = typer.Option(False, "--secure", help="tokens on the REST API and the gateway; writes an admin token to <workdir>/admin.token"),
    replicas: int = typer.Option(1, "--replicas", min=1, help="processes of every runtime (each with its own sidecar, one cluster) and of the gateway (behind its one sidecar)"),
) -> None:
    """Start manager, repository, runtimes and gateway, each with its Envoy sidecar; a process
    that dies is restarted (with back-off); Ctrl-C (or SIGTERM) stops all."""
    tracing = zipkin.java() is not None and zipkin.jar_path() is not None
    mesh = LocalMesh(workdir or workdir_default(), default_runtimes(), MeshPorts(), zipkin_port=9411 if tracing else None,
                     secure=secure, replicas=replicas)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (stop.set(), mesh.abort()))  # also ends a ready-check in progress
    try:
        with console.status("starting the mesh..."):
            mesh.start()
    except StartError as exc:
        console.print(f"[red]start-up failed:[/red] {exc}")
        raise typer.Exit(1) from None
    healer = Healer(mesh, report=lambda message: console.print(f"[yellow]{message}[/yellow]", highlight=False))
    try:
        _print_services(mesh)
        auth = ' -H "Authorization: Bearer $(cat ' + str(mesh.admin_token_path) + ')"' if secure else ""
        if secure:
            console.print(f"auth        on: tokens required; admin token in {mesh.admin_token_path} (mode 0600), "
                          "used by the sluice CLI and SDK when no token is given")
        else:
            console.print("auth        off (dev mode): no tokens, so the REST API and the gateway listen on 127.0.0.1 only "
                          "and refuse writes from other web origins; `sluice up --secure` turns tokens on")
        console.print(
            "\nTry:\n"
            f"  curl -X POST {mesh.manager_url}/api/v1/pipelines{auth} -d "
            "'{\"name\":\"iris\",\"transportType\":\"http\",\"chain\":[\"scikit/iris_scaler\",\"scikit/iris_classifier\"]}'\n"
            f"  curl -X POST {mesh.gateway_url}/serve/iris{auth} -d "
            "'[{\"sepal_length\":5.1,\"sepal_width\":3.5,\"petal_length\":1.4,\"petal_width\":0.2}]'\n"
            "\nA process that exits is restarted; Ctrl-C stops everything."
        )
        healer.start()
        while not stop.wait(0.5):
            pass
    finally:
        with console.status("stopping..."):
            healer.stop()  # no restart may start behind the stop below
            mesh.stop()
        console.print("stopped every process.")


def _print_services(mesh: LocalMesh) -> None:
    p = mesh.ports
    console.print(f"manager     REST {mesh.manager_url}/api/v1 (docs {mesh.manager_url}/docs), xDS 127.0.0.1:{p.xds}")
    console.print(f"console     {mesh.manager_url}/ui/ (pipelines, runtimes, models, traces; actions with a deploy token)")
    console.print(f"repository  {mesh.repository_url}/models")
    for key, r in mesh.runtime_instances.items():
        console.print(
            f"runtime     {r.name} ({r.kind}{', ' + key if mesh.replicas > 1 else ''}) OIP gRPC 127.0.0.1:{r.local_port} "
            f"(its sidecar, mTLS: {r.public_port}), models {', '.join(r.models)}, metrics http://127.0.0.1:{r.metrics_port}/metrics"
        )
    console.print(f"gateway     {mesh.gateway_url}/serve/<pipeline> (HTTP and OIP gRPC), metrics {mesh.gateway_url}/metrics")
    if mesh.replicas > 1:
        console.print(f"            {mesh.replicas} gateway processes behind its sidecar: "
                      + ", ".join(f"{key} (127.0.0.1:{g.http}, gRPC {g.grpc})" for key, g in mesh.gateway_instances.items()))
    if mesh.zipkin_port:
        console.print(f"zipkin      {mesh.zipkin_url}/zipkin/ (one trace per request; x-trace-id on every answer)")
    else:
        console.print("zipkin      tracing is off: no Java or no Zipkin jar (./build.sh fetches it)")
    console.print(f"logs        {mesh.supervisor.log_dir}")


@app.command()
def status(
    manager: str = typer.Option("http://127.0.0.1:8080", envvar="SLUICE_MANAGER_URL", help="manager URL"),
    gateway: str = typer.Option("http://127.0.0.1:8083", help="gateway URL (for latency)"),
    token: str = typer.Option(None, envvar="SLUICE_TOKEN", help="API token (Bearer; default: $SLUICE_HOME/admin.token)"),
    zipkin_url: str = typer.Option("http://127.0.0.1:9411", "--zipkin", envvar="SLUICE_ZIPKIN_URL", help="Zipkin URL (per-stage model vs mesh time)"),
    traces: int = typer.Option(100, "--traces", min=1, help="recent traced requests per pipeline for the per-stage times"),
) -> None:
    """Pipelines, their stages and latency; per stage the p50 of model time vs mesh time over
    recent traced requests; runtimes with their health."""
    token = token or default_token(manager)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        with Client(manager, token or "") as client:
            pipelines = client.pipelines()
            runtimes = client.runtimes()
    except (SluiceError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    try:
        response = httpx.get(f"{gateway}/metrics", timeout=5, headers=headers)
        latency = histogram_quantiles(response.text, "sluice_gateway_request_seconds", "pipeline") if response.is_success else {}
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
    _print_stage_times([p["name"] for p in pipelines], zipkin_url, traces)
    table = Table(title="runtimes")
    for column in ("runtime", "kind", "instances", "models"):
        table.add_column(column)
    for r in runtimes:
        table.add_row(r["name"], r["kind"], _instances_health(r["instances"]), ", ".join(m["name"] for m in r["models"]))
    console.print(table)
    _print_sidecars(manager, headers)


def _print_stage_times(pipelines: list[str], zipkin_url: str, limit: int) -> None:
    """Per stage, the p50 of model time and of mesh time over the pipelines' recent traces."""
    found: list[attribution.Attribution] = []
    try:
        for name in pipelines:
            for spans in recent_traces(zipkin_url, name, limit):
                if attribution.complete(spans):  # a request whose hops have all reached Zipkin
                    found.append(attribution.attribute(spans))
    except ZipkinError as exc:
        console.print(f"per-stage model vs mesh time: [yellow]{exc}[/yellow] (is tracing on? --zipkin / SLUICE_ZIPKIN_URL)")
        return
    summaries = attribution.summarize_stages(found)
    table = Table(title=f"stages: p50 model time vs mesh time (last {limit} traced requests per pipeline, from Zipkin)")
    for column in ("pipeline", "stage", "model", "requests", "p50 call ms", "p50 model ms", "p50 mesh ms", "mesh share"):
        table.add_column(column, justify="right" if column.endswith(("ms", "requests", "share")) else "left")
    for s in summaries:
        share = s.mesh_p50_us / s.call_p50_us if s.call_p50_us else 0.0
        table.add_row(s.pipeline, s.stage, s.model, str(s.requests), f"{s.call_p50_us / 1000:.2f}",
                      f"{s.model_p50_us / 1000:.2f}", f"{s.mesh_p50_us / 1000:.2f}", f"{share:.0%}")
    if not summaries:
        table.caption = "no traced requests yet"
    console.print(table)


@app.command()
def trace(
    trace_id: str = typer.Argument(..., help="the trace id (every answer's x-trace-id header)"),
    zipkin_url: str = typer.Option("http://127.0.0.1:9411", "--zipkin", envvar="SLUICE_ZIPKIN_URL", help="Zipkin URL"),
    wait: float = typer.Option(10.0, "--wait", min=0, help="seconds to wait for every hop's spans (each Envoy sends its spans every 5 s)"),
    as_json: bool = typer.Option(False, "--json", help="print the attribution as JSON"),
) -> None:
    """One request as a waterfall: each hop's own time (gateway parse/queue/encode, Envoy hops,
    runtime queue, model compute, the way back), and the mesh's share of the request's time."""
    try:
        spans = fetch_trace(zipkin_url, trace_id, wait_s=wait)
        result = attribution.attribute(spans)
    except (ZipkinError, attribution.TraceError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(result.to_json()))
        return
    if not attribution.complete(spans):
        console.print(f"[yellow]the trace is not whole yet (waited {wait:g} s): some hops' spans have not reached Zipkin[/yellow]")
    _print_waterfall(result)


#: characters of a waterfall bar
BAR_WIDTH = 32


def _bar(offset_us: int, duration_us: int, total_us: int) -> str:
    total = max(total_us, 1)
    start = min(BAR_WIDTH - 1, offset_us * BAR_WIDTH // total)
    length = max(1, min(BAR_WIDTH - start, round(duration_us * BAR_WIDTH / total)))
    return " " * start + "█" * length + " " * (BAR_WIDTH - start - length)


def _print_waterfall(a: attribution.Attribution) -> None:
    total = a.total_us
    table = Table(title=f"trace {a.trace_id}" + (f" ({a.pipeline})" if a.pipeline else "") + f": {total / 1000:.2f} ms at the front door")
    for column in ("span", "hop (own ms)", "start ms", "ms", "own ms", "back ms", "waterfall"):
        table.add_column(column, justify="right" if column in ("start ms", "ms", "own ms", "back ms") else "left", no_wrap=column == "waterfall")
    for row in a.rows:
        parts = ", ".join(f"{hop.value} {us / 1000:.2f}" for hop, us in row.parts if us or len(row.parts) == 1)
        label = "  " * row.depth + f"{row.span.service}: {row.span.name}"
        style = None if row.critical else "dim"
        table.add_row(label, parts + ("" if row.critical else " (in parallel: not counted)"),
                      f"{row.offset_us / 1000:.2f}", f"{row.span.duration_us / 1000:.2f}", f"{row.own_us / 1000:.2f}",
                      f"{row.back_us / 1000:.2f}" if row.back_us else "", _bar(row.offset_us, row.span.duration_us, total),
                      style=style)
    console.print(table)
    hops = Table(title="own time per hop (critical path)")
    for column in ("hop", "ms", "share"):
        hops.add_column(column, justify="left" if column == "hop" else "right")
    attributed = max(a.attributed_us, 1)
    for hop, us in a.hops().items():
        hops.add_row(hop.value, f"{us / 1000:.2f}", f"{us / attributed:.1%}")
    hops.add_section()
    hops.add_row("the way back (part of the above)", f"{a.back_us / 1000:.2f}", f"{a.back_us / attributed:.1%}")
    hops.add_row("[bold]model[/bold]", f"{a.model_us / 1000:.2f}", f"{a.model_us / attributed:.1%}")
    hops.add_row("[bold]mesh[/bold] (everything else)", f"{a.mesh_us / 1000:.2f}", f"{a.mesh_share:.1%}")
    hops.add_row("  of which Envoy", f"{a.envoy_us / 1000:.2f}", f"{a.envoy_us / attributed:.1%}")
    hops.add_row("total", f"{a.attributed_us / 1000:.2f}", "100.0%")
    console.print(hops)
    if a.stages:
        stages = Table(title="stage calls")
        for column in ("stage", "model", "call ms", "model ms", "mesh ms"):
            stages.add_column(column, justify="right" if column.endswith("ms") else "left")
        for s in a.stages:
            stages.add_row(s.stage, s.model + ("" if s.critical else " (in parallel)"), f"{s.call_us / 1000:.2f}",
                           f"{s.model_us / 1000:.2f}", f"{s.mesh_us / 1000:.2f}")
        console.print(stages)
    if a.detached:
        console.print(f"[yellow]{a.detached} span(s) of this trace hang under no span of the request (their parents are missing) and are not counted[/yellow]")


def _print_sidecars(manager: str, headers: dict[str, str]) -> None:
    """Every Envoy sidecar the manager knows (connected to its xDS server or not, NACKs) and
    how many gateway processes follow its pipeline feed (``/api/v1/mesh``)."""
    try:
        response = httpx.get(f"{manager}/api/v1/mesh", timeout=5, headers=headers)
    except httpx.HTTPError:
        return
    if not response.is_success:
        return
    mesh = response.json()
    table = Table(title="sidecars")
    for column in ("node", "role", "service", "xDS", "NACKs"):
        table.add_column(column)
    for node_id, node in mesh["nodes"].items():
        table.add_row(node_id, node["role"], node["service"],
                      "connected" if node["connected"] else "[red]disconnected[/red]", str(node["nacks"]))
    console.print(table)
    gateways = mesh["gateways"]
    console.print(f"gateway processes following the pipeline feed: {gateways if gateways else '[red]none[/red]'}")


def _instances_health(instances: list[dict]) -> str:
    """``2 healthy``, or the unhealthy ones in red by id: the manager health-checks each
    instance live (gRPC health through its sidecar) when it lists them."""
    if not instances:
        return "[red]none registered[/red]"
    healthy = sum(1 for i in instances if i["healthy"])
    sick = [f"{i['id']} ({i['host']}:{i['port']})" for i in instances if not i["healthy"]]
    text = f"{healthy} healthy" if healthy else "[red]0 healthy[/red]"
    if sick:
        text += f", [red]{len(sick)} unhealthy: {', '.join(sick)}[/red]"
    return text


MANAGER = typer.Option("http://127.0.0.1:8080", envvar="SLUICE_MANAGER_URL", help="manager URL")
TOKEN = typer.Option(None, envvar="SLUICE_TOKEN", help="API token (Bearer; default: $SLUICE_HOME/admin.token for a local manager)")
#: uploads at least this large get a progress bar
PROGRESS_BYTES = 4 << 20


def _fail(exc: SluiceError | httpx.HTTPError) -> typer.Exit:
    if isinstance(exc, SluiceError):
        console.print(f"[red]{exc.status} {exc.code}:[/red] {exc.message}")
        if exc.details:
            console.print_json(data=exc.details)
    else:
        console.print(f"[red]cannot reach the mesh: {exc}[/red]")
    return typer.Exit(1)


@app.command()
def models(manager: str = MANAGER, token: str = TOKEN) -> None:
    """Models in the repository: versions, signatures, and which runtimes serve them."""
    try:
        with Client(manager, token) as client:
            listing = client.models()
    except (SluiceError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    table = Table(title="models")
    for column in ("model", "version", "framework", "inputs", "outputs", "served by"):
        table.add_column(column)
    for model in listing:
        for v in model["versions"]:
            table.add_row(
                model["name"], v["version"], v["framework"],
                ", ".join(f"{t['name']} {t['datatype']}{t['shape']}" for t in v["inputs"]),
                ", ".join(f"{t['name']} {t['datatype']}{t['shape']}" for t in v["outputs"]),
                ", ".join(f"{s['runtime']} ({s['instances']})" for s in v["served_by"]) or "-",
            )
    console.print(table)


@app.command()
def upload(
    path: Path = typer.Argument(..., help="a .joblib/.pkl estimator, an .onnx file, a saved Spark PipelineModel, or a model directory"),
    name: str = typer.Option(..., "--name", help="the model's name in the repository"),
    runtime: str = typer.Option(None, "--runtime", help="runtime to load it on (default: scikit, serving-localml-spark or triton by kind)"),
    load: bool = typer.Option(True, help="load the new version on the runtime"),
    manager: str = MANAGER,
    token: str = TOKEN,
) -> None:
    """Upload a model as a new version and load it on a runtime, with no restart."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console, transient=True) as bar:
        task = None

        def progress(sent: int, total: int) -> None:
            nonlocal task
            if total < PROGRESS_BYTES:
                return
            if task is None:
                task = bar.add_task(f"uploading {name}", total=total)
            bar.update(task, completed=sent)

        try:
            with Client(manager, token) as client:
                ref = client.upload(path, name, runtime, load=load, progress=progress)
        except (SluiceError, httpx.HTTPError) as exc:
            raise _fail(exc) from None
        except ValueError as exc:  # the model could not be packaged
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    where = f", loaded on {ref.runtime}; use it as {ref}" if load else ""
    console.print(f"uploaded {ref.name} version {ref.version}{where}")


@app.command()
def predict(
    pipeline: str = typer.Argument(..., help="pipeline name"),
    file: Path = typer.Option(None, "-f", "--file", help="JSON records (a list or one object); default: stdin"),
    manager: str = MANAGER,
    gateway: str = typer.Option(None, envvar="SLUICE_GATEWAY_URL", help="gateway URL (default: the manager's /api/v1/info)"),
    token: str = TOKEN,
) -> None:
    """Send records through a pipeline and print the answer as JSON."""
    text = file.read_text() if file else sys.stdin.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        console.print(f"[red]the records are not JSON: {exc}[/red]")
        raise typer.Exit(1) from None
    try:
        with Client(manager, token, gateway_url=gateway) as client:
            answer = client.predict(pipeline, records)
    except (SluiceError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    print(json.dumps(answer))


@app.command()
def apply(
    file: Path = typer.Option(..., "-f", "--file", help="pipelines as YAML or JSON: a list of definitions, or {pipelines: [...]}"),
    prune: bool = typer.Option(False, help="also delete every pipeline the file does not list"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the diff, change nothing"),
    manager: str = MANAGER,
    token: str = TOKEN,
) -> None:
    """Make the mesh's pipelines what the file says, in one change: prints the diff, then applies it."""
    import yaml

    try:
        loaded = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        console.print(f"[red]cannot read {file}: {exc}[/red]")
        raise typer.Exit(1) from None
    definitions = loaded.get("pipelines") if isinstance(loaded, dict) else loaded
    if not isinstance(definitions, list):
        console.print(f"[red]{file}: expected a list of pipeline definitions, or a mapping with 'pipelines'[/red]")
        raise typer.Exit(1)
    try:
        with Client(manager, token) as client:
            diff = client.apply(definitions, prune=prune, dry_run=True)
            _print_diff(diff)
            if dry_run or not (diff["created"] or diff["replaced"] or diff["deleted"]):
                return
            done = client.apply(definitions, prune=prune)
    except (SluiceError, httpx.HTTPError) as exc:
        if isinstance(exc, SluiceError) and exc.code == "invalid_apply":
            console.print(f"[red]{exc.message}[/red]")
            for problem in exc.details.get("problems", []):
                console.print(f"  {problem['pipeline']}: {problem['code']}: {problem['message']}")
            raise typer.Exit(1) from None
        raise _fail(exc) from None
    console.print(f"applied: {len(done['created'])} created, {len(done['replaced'])} replaced, "
                  f"{len(done['deleted'])} deleted, {len(done['unchanged'])} unchanged; live now")


token_app = typer.Typer(help="API tokens (secure mode; needs an admin token).")
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    scope: list[str] = typer.Option(..., "--scope", help="admin, deploy, runtime:<runtime>, serve:<pipeline> or serve:* (repeatable)"),
    ttl: float = typer.Option(None, "--ttl", help="seconds until it expires (default: the manager's)"),
    manager: str = MANAGER,
    token: str = TOKEN,
) -> None:
    """Issue a token and print it (the only time it is shown)."""
    try:
        with Client(manager, token) as client:
            issued = client.create_token(scope, ttl)
    except (SluiceError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    console.print(f"id {issued['id']}, scopes {', '.join(issued['scopes'])}, expires at {issued['expires_at']:.0f}", highlight=False)
    print(issued["token"])


@token_app.command("list")
def token_list(manager: str = MANAGER, token: str = TOKEN) -> None:
    """Every token issued: id, scopes, status (never the token itself)."""
    try:
        with Client(manager, token) as client:
            listing = client.tokens()
    except (SluiceError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    table = Table(title="tokens")
    for column in ("id", "scopes", "status", "expires at"):
        table.add_column(column)
    for t in listing:
        table.add_row(t["id"], ", ".join(t["scopes"]), t["status"], f"{t['expires_at']:.0f}")
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., help="the token's id"), manager: str = MANAGER, token: str = TOKEN) -> None:
    """Revoke a token: refused mesh-wide once this returns."""
    try:
        with Client(manager, token) as client:
            client.revoke_token(token_id)
    except (SluiceError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    console.print(f"revoked {token_id}")


def _print_diff(diff: dict) -> None:
    for sign, key, colour in (("+", "created", "green"), ("~", "replaced", "yellow"), ("-", "deleted", "red")):
        for name in diff[key]:
            console.print(f"[{colour}]{sign} {name}[/{colour}]")
    console.print(f"{len(diff['unchanged'])} unchanged")


if __name__ == "__main__":
    app()
