"""``x-sluice-served-by`` and the forwarded traffic headers at the gateway's front doors,
in one process: the real app and executor with only the egress stub faked (it answers
as Envoy would, naming the runtime that served a call in ``x-sluice-served-runtime``
and picking the runtime by the forwarded ``x-sluice-variant``).

* OIP gRPC ``ModelInfer`` on a real in-process grpc.aio server: the answer's initial
  metadata names what served the stage, and the call's metadata pin and sticky header
  reach the stage call;
* ``ModelStreamInfer``: each streamed answer carries its own ``sluice.served_by``
  parameter (the stream's metadata pin applies to each request);
* ``POST /serve/<p>`` with an NDJSON body: the request's served list stops growing once
  the answer has started (it was appended to for every line before), and the answer
  carries no ``x-sluice-served-by``;
* a plain JSON answer still carries it.

What runs over real Envoys is ``tests/e2e/test_traffic.py``."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway import served_by
from gateway.app import create
from gateway.settings import GatewaySettings
from sluice.plan import PipelinePlan, StagePlan
from sluice.plan_proto import to_proto
from sluice.tensors import TensorSpec
from sluice.traffic import SERVED_BY_HEADER, SERVED_RUNTIME_HEADER, VARIANT_HEADER, StageTraffic
from sluice.v1 import pipeline_pb2
from tests.gateway_oip_server import oip_stub

STICKY = "x-user"


def plan() -> PipelinePlan:
    stage = StagePlan("rt/double", "rt", "double", "", "", 1000,
                      inputs=(TensorSpec("x", "FP64", (-1,)),), outputs=(TensorSpec("y", "FP64", (-1,)),),
                      traffic=StageTraffic(sticky=STICKY))
    return PipelinePlan("p", 0, "http", (stage,)).at_revision(1)


class FakeCall:
    """A unary call's answer as grpc.aio gives it: awaitable, with initial metadata."""

    def __init__(self, response: pb.ModelInferResponse, runtime: str):
        self.response, self.runtime = response, runtime

    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        return self.response

    async def initial_metadata(self):
        return ((SERVED_RUNTIME_HEADER, self.runtime),)


class Egress:
    """The egress Envoy, faked: y = 2x, served by the runtime the call's
    ``x-sluice-variant`` names (else "main") at version "7"; keeps every call's metadata."""

    def __init__(self):
        self.metadata: list[dict[str, str]] = []

    def ModelInfer(self, request, metadata=(), timeout=None):
        sent = dict(metadata)
        self.metadata.append(sent)
        x = np.frombuffer(request.raw_input_contents[0], "<f8")
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="7")
        response.outputs.add(name="y", datatype="FP64", shape=[len(x)])
        response.raw_output_contents.append((x * 2).astype("<f8").tobytes())
        return FakeCall(response, sent.get(VARIANT_HEADER, "main"))


@pytest.fixture
async def app(tmp_path):
    (tmp_path / "ca.pem").write_bytes(b"unused: the watch is never started here")
    settings = GatewaySettings(grpc_port=0, xds_token="t", xds_ca_file=str(tmp_path / "ca.pem"))
    app, _ = create(settings)
    app.state.table.apply(pipeline_pb2.PipelineSet(version="1", full=True, pipelines=[to_proto(plan())]), 0)
    app.state.egress = Egress()
    app.state.executor.stub = app.state.egress
    yield app
    await app.state.executor.close()


@pytest.fixture
async def stub(app):
    async with oip_stub(app, 4) as stub:
        yield stub


def infer_request(x: float, model: str = "p") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=f"r{x}")
    request.inputs.add(name="x", datatype="FP64", shape=[1])
    request.raw_input_contents.append(np.array([x], "<f8").tobytes())
    return request


# --- OIP gRPC


async def test_grpc_model_infer_answers_served_by_in_the_answer_and_trailers_and_forwards_pin_and_sticky(stub, app):
    call = stub.ModelInfer(infer_request(3), metadata=((VARIANT_HEADER, "canary"), (STICKY, "u1"), ("x-other", "no")))
    response = await call
    assert np.frombuffer(response.raw_output_contents[0], "<f8").tolist() == [6.0]
    assert response.parameters[served_by.ANSWER_PARAMETER].string_param == "0=canary/double:7"
    assert dict(await call.trailing_metadata())[SERVED_BY_HEADER] == "0=canary/double:7"
    # nothing ahead of the answer: Envoy may still retry the call until the answer leaves
    assert SERVED_BY_HEADER not in dict(await call.initial_metadata() or ())
    sent = app.state.egress.metadata[-1]
    assert sent[VARIANT_HEADER] == "canary" and sent[STICKY] == "u1"
    assert "x-other" not in sent  # only the pin and the stage's sticky header are forwarded
    assert served_by.STICKY_MARKER not in sent and served_by.STAGE_ID_MARKER not in sent

    plain = stub.ModelInfer(infer_request(1))  # no pin: the weights' (here the fake's default) runtime
    await plain
    assert dict(await plain.trailing_metadata())[SERVED_BY_HEADER] == "0=main/double:7"
    assert VARIANT_HEADER not in app.state.egress.metadata[-1]


async def test_grpc_model_infer_that_fails_before_any_stage_sends_no_served_by(stub):
    call = stub.ModelInfer(infer_request(1, model="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert SERVED_BY_HEADER not in dict(await call.initial_metadata() or ())
    assert SERVED_BY_HEADER not in dict(await call.trailing_metadata() or ())


async def test_grpc_stream_answers_each_carry_their_own_served_by_parameter(stub):
    async def sent():
        for x in range(5):
            yield infer_request(x)
        yield infer_request(9, model="nope")

    call = stub.ModelStreamInfer(sent(), metadata=((VARIANT_HEADER, "canary"),))
    answers = [a async for a in call]
    assert len(answers) == 6
    for answer in answers[:5]:
        assert not answer.error_message
        # one entry each: a request's list is its own, not the stream's
        assert answer.infer_response.parameters[served_by.ANSWER_PARAMETER].string_param == "0=canary/double:7"
    assert "no pipeline 'nope'" in answers[5].error_message
    assert served_by.ANSWER_PARAMETER not in answers[5].infer_response.parameters
    assert SERVED_BY_HEADER not in dict(await call.initial_metadata() or ())


# --- HTTP


async def test_json_answer_carries_served_by(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        answer = await client.post("/serve/p", json={"x": 1.0}, headers={VARIANT_HEADER: "canary"})
    assert answer.status_code == 200 and answer.json() == {"y": 2.0}
    assert answer.headers[SERVED_BY_HEADER] == "0=canary/double:7"


async def test_ndjson_stream_served_list_does_not_grow_with_its_lines(app, monkeypatch):
    traffics: list[served_by.RequestTraffic] = []
    real = served_by.RequestTraffic

    def kept(headers):  # the middleware's RequestTraffic, kept to look at after the stream
        traffics.append(real(headers))
        return traffics[-1]

    monkeypatch.setattr(served_by, "RequestTraffic", kept)
    lines = 50
    body = b"".join(orjson.dumps({"x": float(i)}) + b"\n" for i in range(lines))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        answer = await client.post("/serve/p", content=body,
                                   headers={"content-type": "application/x-ndjson", VARIANT_HEADER: "canary"})
    assert answer.status_code == 200
    assert [orjson.loads(line) for line in answer.content.splitlines()] == [{"y": 2.0 * i} for i in range(lines)]
    assert SERVED_BY_HEADER not in answer.headers  # the answer started before any line ran
    assert len(traffics) == 1
    assert traffics[0].served == [] and not traffics[0].collecting  # 50 lines ran, none was held
    assert len(app.state.egress.metadata) == lines
    assert {m[VARIANT_HEADER] for m in app.state.egress.metadata} == {"canary"}  # each line still forwards the pin
