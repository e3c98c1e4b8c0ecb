"""Benchmark: a 3-stage scikit-learn pipeline on Sluice beside MLServer serving the same
three models, in one run (issue #13's yardstick).

The pipeline: StandardScaler -> PCA(10) -> LogisticRegression.predict_proba on the
breast_cancer data, one row per request, each stage a separately served model, all
three on one runtime. Trained here, deterministically, into a temporary model store
(Sluice's layout) and a temporary MLServer repository (model-settings.json).

Measured, at 1, 8 and 32 concurrent clients (asyncio), p50/p99 and req/s:

  in-process            the three estimators called in this Python process (the floor)
  runtime direct        three OIP ModelInfer calls chained by the client, straight to
                        Sluice's scikit runtime process (no Envoy, no gateway)
  runtime direct fused  one ModelInfer to the runtime running the three as one fused
                        call (``sluice.fusion``), what the gateway sends it
  MLServer chain        the same three calls to MLServer 1.7 (from .venv-mlserver, made
                        by tests/integration/test_mlserver_stage.py when missing)
  Sluice gRPC           one OIP ModelInfer to the gateway (through its sidecar): the
                        three stages run fused, one call to the runtime
  Sluice gRPC apart     the same pipeline with a retry policy of its own on each stage,
                        which fusion never crosses: three calls through the mesh
  Sluice HTTP           POST /serve/bc with one JSON record (fused)

and prints the aims of issue #13 beside the numbers: Sluice's p50 at 1 client over
MLServer's, Sluice's req/s at 8 clients over MLServer's, and the mesh's own cost per
stage at p50: (Sluice gRPC apart - runtime direct) / 3 for stages called one by one,
and (Sluice gRPC - runtime direct fused) for the fused call (the mesh's cost per call).
Run by hand: ``.venv/bin/python bench/three_stage.py [--requests 2000] [--replicas N]
[--env KEY=VALUE ...]``: ``--replicas`` runs N gateway processes behind the gateway's
sidecar and N runtime processes (``sluice up --replicas``); ``--env`` sets a setting
of the mesh's processes, e.g. ``SLUICE_GATEWAY_FUSE_STAGES=false``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import joblib
import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_breast_cancer
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mesh_latency import measure  # noqa: E402
from sluice.serving import install_uvloop  # noqa: E402
from models.manifest import tensor, version_dir, write_manifest  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402
from sluice.local.procs import free_port, wait_until  # noqa: E402
from sluice.fusion import FUSED_PARAMETER, FusedStep, encode_steps  # noqa: E402
from sluice.tensors import raw_outputs  # noqa: E402

PIPELINE = "bc"
#: (model, its input, its output, the sklearn method, output width)
STAGES = (
    ("bc_scaler", "features", "scaled", "transform", 30),
    ("bc_pca", "scaled", "components", "transform", 10),
    ("bc_classifier", "components", "probabilities", "predict_proba", 2),
)
#: MLServer's sklearn runtime names an output after the method it calls
MLSERVER_OUTPUT = {"transform": "transform", "predict_proba": "predict_proba"}
CLIENTS = (1, 8, 32)
WAYS = ("in-process", "runtime direct", "runtime direct fused", "MLServer chain", "Sluice gRPC", "Sluice gRPC apart", "Sluice HTTP")
#: each stage's own retry policy in ``bc-apart`` (Envoy's retries cost nothing on success)
APART_RETRIES = {"attempts": 2, "on": ["unavailable", "reset", "connect-failure", "refused-stream"]}


@contextlib.contextmanager
def trained(mlserver_grpc_port: int = 0) -> Iterator[tuple[Path, np.ndarray, list]]:
    """A temporary folder holding the three models in Sluice's layout (``store``) and
    MLServer's (``mlserver``, gRPC on ``mlserver_grpc_port``, else a free port), the
    one-row request every benchmark of this pipeline sends, and the fitted estimators."""
    X, y = load_breast_cancer(return_X_y=True)
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        estimators = train(X, y, work / "store", work / "mlserver", mlserver_grpc_port or free_port())
        yield work, X[:1].astype(np.float64), estimators


def train(X: np.ndarray, y: np.ndarray, store: Path, mlserver_root: Path, grpc_port: int) -> list:
    """Fit the three estimators; write them in Sluice's layout and MLServer's."""
    scaler = StandardScaler().fit(X)
    pca = PCA(10, random_state=0).fit(scaler.transform(X))
    classifier = LogisticRegression(max_iter=1000).fit(pca.transform(scaler.transform(X)), y)
    estimators = [scaler, pca, classifier]
    widths = {"features": 30}
    for (name, given, output, method, width), estimator in zip(STAGES, estimators):
        path = version_dir(store, name)
        joblib.dump(estimator, path / "model.joblib")
        write_manifest(path, "sklearn", inputs=[tensor(given, "FP64", [-1, widths[given]])],
                       outputs=[tensor(output, "FP64", [-1, width], method=method)], artifact="model.joblib")
        widths[output] = width
        folder = mlserver_root / name
        folder.mkdir(parents=True)
        joblib.dump(estimator, folder / "model.joblib")
        (folder / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib", "version": "1"},
        }))
    (mlserver_root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": free_port(), "grpc_port": grpc_port,
        "metrics_endpoint": None, "parallel_workers": 0, "debug": False,
    }))
    return estimators


def chained(stub, output_names: dict[str, str], row: np.ndarray):
    """Three ModelInfer calls, each answer's only output fed to the next model."""
    async def call() -> np.ndarray:
        datatype, shape, data = "FP64", [1, row.size], row.astype("<f8").tobytes()
        for name, given, output, method, _ in STAGES:
            request = pb.ModelInferRequest(model_name=name)
            request.inputs.add(name=given, datatype=datatype, shape=shape)
            request.raw_input_contents.append(data)
            request.outputs.add(name=output_names[method] if output_names else output)
            answer = await stub.ModelInfer(request)
            datatype, shape, data = next(iter(raw_outputs(answer).values()))
        return np.frombuffer(data, "<f8").reshape(shape)

    return call


def sluice_mesh(work: Path, folder: str = "mesh", env: dict[str, str] | None = None, replicas: int = 1) -> LocalMesh:
    """This benchmark's mesh (not started): one scikit runtime serving the three models
    ``train`` wrote to ``work / "store"``."""
    return LocalMesh(work / folder, [RuntimeSpec("scikit", "scikit", tuple(s[0] for s in STAGES))], MeshPorts.ephemeral(),
                     env={"SLUICE_REPOSITORY_ROOTS": str(work / "store"), **(env or {})}, replicas=replicas)


def define_pipeline(mesh: LocalMesh) -> None:
    """Define ``PIPELINE``: the three stages as a chain."""
    httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": PIPELINE, "chain": [f"scikit/{s[0]}" for s in STAGES]},
               timeout=10).raise_for_status()


def gateway_calls(mesh: LocalMesh, row: np.ndarray, pipeline: str = PIPELINE):
    """One OIP ModelInfer of ``row`` to the gateway (through its sidecar) and one ``POST
    /serve`` of it as a JSON record, each a coroutine function answering the gateway's
    answer (a non-200 is an error); and ``close`` for their channel and client."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.ports.gateway}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name=pipeline)
    request.inputs.add(name="features", datatype="FP64", shape=[1, row.size])
    request.raw_input_contents.append(row.astype("<f8").tobytes())
    http = httpx.AsyncClient(base_url=mesh.gateway_url, timeout=30, limits=httpx.Limits(max_keepalive_connections=64))
    body = json.dumps([{"features": row[0].tolist()}]).encode()

    async def grpc_call():
        return await stub.ModelInfer(request)

    async def http_call():
        response = await http.post(f"/serve/{pipeline}", content=body, headers={"content-type": "application/json"})
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text}")
        return response

    async def close():
        await http.aclose()
        await channel.close()

    return grpc_call, http_call, close


def mlserver_binary() -> Path:
    from tests.integration.test_mlserver_stage import mlserver_binary as make

    return make()


async def run(requests: int, replicas: int = 1, env: dict[str, str] | None = None) -> None:
    console = Console(width=140)
    results: dict[tuple[str, int], tuple[float, float, float]] = {}
    mlserver_grpc = free_port()
    with trained(mlserver_grpc) as (work, row, (scaler, pca, classifier)):
        expected = classifier.predict_proba(pca.transform(scaler.transform(row)))
        mesh = sluice_mesh(work, env=env, replicas=replicas)
        with mesh:
            proc = mesh.supervisor.start("mlserver", [str(mlserver_binary()), "start", str(work / "mlserver")], cwd=work / "mlserver")

            def mlserver_ready() -> bool:
                import tritonclient.grpc as triton

                client = triton.InferenceServerClient(f"127.0.0.1:{mlserver_grpc}")
                try:
                    return client.is_server_ready() and all(client.is_model_ready(s[0]) for s in STAGES)
                finally:
                    client.close()

            wait_until(mlserver_ready, 120, "MLServer to load the three models", proc)
            define_pipeline(mesh)
            apart = [{"runtime": "scikit", "model": s[0], "retries": APART_RETRIES} for s in STAGES]
            httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": f"{PIPELINE}-apart", "stages": apart}, timeout=10).raise_for_status()

            async def in_process():
                classifier.predict_proba(pca.transform(scaler.transform(row)))

            channels = {
                "runtime direct": grpc.aio.insecure_channel(f"127.0.0.1:{mesh.runtime('scikit').local_port}"),
                "MLServer chain": grpc.aio.insecure_channel(f"127.0.0.1:{mlserver_grpc}"),
                "Sluice gRPC apart": grpc.aio.insecure_channel(f"127.0.0.1:{mesh.ports.gateway}"),
            }
            direct = chained(pb_grpc.GRPCInferenceServiceStub(channels["runtime direct"]), {}, row)
            mlserver = chained(pb_grpc.GRPCInferenceServiceStub(channels["MLServer chain"]), MLSERVER_OUTPUT, row)
            sluice_grpc, sluice_http, close_gateway = gateway_calls(mesh, row)
            gateway = pb_grpc.GRPCInferenceServiceStub(channels["Sluice gRPC apart"])
            runtime = pb_grpc.GRPCInferenceServiceStub(channels["runtime direct"])
            apart_request = pb.ModelInferRequest(model_name=f"{PIPELINE}-apart")
            apart_request.inputs.add(name="features", datatype="FP64", shape=[1, 30])
            apart_request.raw_input_contents.append(row.astype("<f8").tobytes())
            fused_request = pb.ModelInferRequest()
            fused_request.CopyFrom(apart_request)
            fused_request.model_name = STAGES[0][0]
            # what the gateway sends: the first model, then each later one on the output before
            fused_request.parameters[FUSED_PARAMETER].string_param = encode_steps(tuple(
                FusedStep(i, name, "", ((given, given),)) for i, (name, given, *_) in enumerate(STAGES) if i))
            async def sluice_grpc_apart():
                return await gateway.ModelInfer(apart_request)

            async def direct_fused():
                return await runtime.ModelInfer(fused_request)

            # every way answers the same probabilities before anything is timed
            answer = await sluice_grpc()
            np.testing.assert_allclose(np.frombuffer(raw_outputs(answer)["probabilities"][2], "<f8").reshape(1, 2), expected, rtol=1e-9)
            np.testing.assert_allclose((await sluice_http()).json()[0]["probabilities"], expected[0], rtol=1e-9)
            np.testing.assert_allclose(await direct(), expected, rtol=1e-9)
            for call in (sluice_grpc_apart, direct_fused):
                np.testing.assert_allclose(np.frombuffer(raw_outputs(await call())["probabilities"][2], "<f8").reshape(1, 2), expected, rtol=1e-9)
            np.testing.assert_allclose(await mlserver(), expected, rtol=1e-9)

            calls = {"in-process": in_process, "runtime direct": direct, "runtime direct fused": direct_fused,
                     "MLServer chain": mlserver, "Sluice gRPC": sluice_grpc, "Sluice gRPC apart": sluice_grpc_apart,
                     "Sluice HTTP": sluice_http}
            for clients in CLIENTS:
                for way in WAYS:
                    results[(way, clients)] = await measure(calls[way], clients, requests)
            await close_gateway()
            for channel in channels.values():
                await channel.close()

    setup = f", {replicas} gateway and runtime processes" if replicas > 1 else ""
    setup += "".join(f", {k}={v}" for k, v in (env or {}).items())
    table = Table(title=f"3-stage breast_cancer pipeline (scaler -> PCA(10) -> LR), 1 row, {requests} requests a cell{setup}")
    for column in ("way", *(f"{c} client{'s' if c > 1 else ''} {what}" for c in CLIENTS for what in (("p50 ms", "p99 ms") if c == 1 else ("req/s",)))):
        table.add_column(column, justify="left" if column == "way" else "right")
    for way in WAYS:
        cells = []
        for clients in CLIENTS:
            p50, p99, rps = results[(way, clients)]
            cells += [f"{p50:.2f}", f"{p99:.2f}"] if clients == 1 else [f"{rps:,.0f}"]
        table.add_row(way, *cells)
    console.print(table)
    ml_p50, sl_p50 = results[("MLServer chain", 1)][0], results[("Sluice gRPC", 1)][0]
    ml_rps, sl_rps = results[("MLServer chain", 8)][2], results[("Sluice gRPC", 8)][2]
    per_stage = (results[("Sluice gRPC apart", 1)][0] - results[("runtime direct", 1)][0]) / len(STAGES)
    per_call = sl_p50 - results[("runtime direct fused", 1)][0]
    console.print(f"Sluice gRPC p50 / MLServer chain p50 at 1 client: {sl_p50 / ml_p50:.2f} (aim <= 0.5)")
    console.print(f"Sluice gRPC req/s / MLServer chain req/s at 8 clients: {sl_rps / ml_rps:.2f} (aim >= 3)")
    console.print(f"the mesh's own cost per stage, p50 over calling the runtime directly, stages apart: {per_stage:.2f} ms (aim <= 0.8)")
    console.print(f"the mesh's own cost of the fused call (all three stages), p50 over calling the runtime directly: {per_call:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    install_uvloop()
    asyncio.run(run(args.requests, args.replicas, env))


if __name__ == "__main__":
    main()
