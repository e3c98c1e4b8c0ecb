"""Per-hop attribution arithmetic (``sluice.attribution``) on recorded and hand-made span
lists, and the timing tags the processes put on their spans (``sluice.tracing``).

``recorded_trace_iris.json`` is a real trace from Zipkin: one request through the
two-stage iris chain on a local mesh (front Envoy, gateway, and per stage the gateway's
call, the egress Envoy, the runtime's sidecar and the runtime), tags trimmed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sluice.attribution import Hop, Role, Span, TraceError, attribute, complete, summarize_stages
from sluice.tracing import COMPUTE_MS_TAG, ENCODE_MS_TAG, PARSE_MS_TAG, QUEUE_MS_TAG, RUNTIME_TRACED_TAG, Tracing, stage_work, tag_model_time

RECORDED = Path(__file__).with_name("recorded_trace_iris.json")


def recorded() -> list[Span]:
    return [Span.from_zipkin(s) for s in json.loads(RECORDED.read_text())]


def span(id: str, parent: str | None, start: int, duration: int, service: str = "svc", kind: str | None = "SERVER", **tags: str) -> Span:
    return Span("t", id, parent, service, id, kind, start, duration, {k.replace("__", "."): v for k, v in tags.items()})


def envoy(id: str, parent: str | None, start: int, duration: int, direction: str, **tags: str) -> Span:
    return span(id, parent, start, duration, "sidecar", "SERVER", component="proxy", sluice__direction=direction, **tags)


def call(id: str, parent: str, start: int, duration: int, stage: str, model: str) -> Span:
    return span(id, parent, start, duration, "gateway", "CLIENT", sluice__stage=stage, sluice__model=model)


# --- a recorded trace of a chain


def test_recorded_chain_hops_add_up_to_the_front_door_span():
    spans = recorded()
    a = attribute(spans)
    root = next(s for s in spans if s.parent_id is None)
    assert a.total_us == root.duration_us == 6385
    assert a.attributed_us == a.total_us
    assert sum(a.hops().values()) == a.total_us
    assert a.model_us + a.mesh_us == a.total_us


def test_recorded_chain_own_time_is_duration_minus_children():
    """In a chain no children overlap: each span's own time is its duration minus its
    children's durations (computed here directly from the raw spans)."""
    spans = recorded()
    children: dict[str, int] = {}
    for s in spans:
        if s.parent_id:
            children[s.parent_id] = children.get(s.parent_id, 0) + s.duration_us
    a = attribute(spans)
    assert len(a.rows) == len(spans) and a.detached == 0
    for row in a.rows:
        assert row.critical
        assert row.own_us == row.span.duration_us - children.get(row.span.id, 0), row.span.name
        assert sum(us for _, us in row.parts) == row.own_us


def test_recorded_chain_roles_and_hops():
    a = attribute(recorded())
    assert [r.role for r in a.rows] == [
        Role.FRONT_ENVOY, Role.GATEWAY,
        Role.GATEWAY_CALL, Role.EGRESS_ENVOY, Role.RUNTIME_ENVOY, Role.RUNTIME,
        Role.GATEWAY_CALL, Role.EGRESS_ENVOY, Role.RUNTIME_ENVOY, Role.RUNTIME,
    ]
    hops = a.hops()
    # by hand from the recorded spans: the gateway's own 5928 - 2804 - 2222 = 902 us, of
    # which it tagged parse 0.523 ms and encode 0.115 ms; the runtimes tagged compute
    # 0.409 + 0.473 ms and queue 0.064 + 0.040 ms of their 651 + 678 us
    assert hops[Hop.FRONT_ENVOY] == 6385 - 5928
    assert (hops[Hop.GATEWAY_PARSE], hops[Hop.GATEWAY_ENCODE], hops[Hop.GATEWAY_QUEUE]) == (523, 115, 902 - 523 - 115)
    assert hops[Hop.GATEWAY_CALL] == (2804 - 2104) + (2222 - 1743)
    assert hops[Hop.EGRESS_ENVOY] == (2104 - 1789) + (1743 - 1398)
    assert hops[Hop.RUNTIME_ENVOY] == (1789 - 651) + (1398 - 678)
    assert (hops[Hop.MODEL_COMPUTE], hops[Hop.RUNTIME_QUEUE]) == (409 + 473, 64 + 40)
    assert hops[Hop.RUNTIME_CODEC] == 651 + 678 - 882 - 104
    assert a.model_us == 882
    assert a.mesh_share == pytest.approx((6385 - 882) / 6385)
    assert a.envoy_us == hops[Hop.FRONT_ENVOY] + hops[Hop.EGRESS_ENVOY] + hops[Hop.RUNTIME_ENVOY]


def test_recorded_chain_the_way_back_is_each_hop_after_its_last_child():
    spans = recorded()
    by_id = {s.id: s for s in spans}
    last_child_end: dict[str, int] = {}
    for s in spans:
        if s.parent_id:
            last_child_end[s.parent_id] = max(last_child_end.get(s.parent_id, 0), s.end_us)
    expected = sum(by_id[p].end_us - end for p, end in last_child_end.items())
    assert attribute(spans).back_us == expected > 0


def test_recorded_chain_stage_calls_split_into_model_and_mesh():
    a = attribute(recorded())
    assert [(s.stage, s.model, s.call_us, s.model_us) for s in a.stages] == [
        ("0", "iris_scaler", 2804, 409), ("1", "iris_classifier", 2222, 473),
    ]
    assert [s.mesh_us for s in a.stages] == [2804 - 409, 2222 - 473]
    assert a.pipeline == "iris"
    assert {r.stage for r in a.rows[2:6]} == {"0 iris_scaler"} and {r.stage for r in a.rows[6:]} == {"1 iris_classifier"}


def test_recorded_trace_is_complete_and_not_without_a_hop():
    spans = recorded()
    assert complete(spans)
    runtime_sidecar = {s.id for s in spans if s.service == "scikit-sidecar"}
    # the runtime sidecar's spans not sent yet: the egress spans have no child
    assert not complete([s for s in spans if s.id not in runtime_sidecar and s.parent_id not in runtime_sidecar])
    # one runtime span not sent yet, the other one is: that runtime traces, so wait
    runtime = [s for s in spans if s.service == "scikit"]
    assert not complete([s for s in spans if s.id != runtime[0].id])
    # no runtime span at all (a runtime that does not join the trace): whole
    assert complete([s for s in spans if s.service != "scikit"])
    # the gateway sidecar's not sent yet: no root
    assert not complete([s for s in spans if s.service != "gateway-sidecar"])
    assert not complete([])


def test_a_call_whose_runtime_answered_that_it_traced_waits_for_that_runtimes_spans():
    """Both runtime spans missing looks like a runtime that never joins the trace, unless
    the gateway's call span says the runtime answered ``sluice.traced`` (then not whole)."""
    spans = [
        replace(s, tags={**s.tags, RUNTIME_TRACED_TAG: "true"}) if s.kind == "CLIENT" and "sluice.stage" in s.tags else s
        for s in recorded()
    ]
    assert complete(spans)
    without_runtime = [s for s in spans if s.service != "scikit"]
    assert not complete(without_runtime)
    # the tag is on the call: one runtime span in, the other call's not yet, still not whole
    first_runtime = next(s for s in spans if s.service == "scikit")
    assert not complete([*without_runtime, first_runtime])


# --- hand-made traces: concurrency, skew, mirrors, missing parts


def dag() -> list[Span]:
    """A DAG: scale, then lr and tree at once (tree finishes last), then vote."""
    return [
        envoy("front", None, 0, 100, "ingress"),
        span("gw", "front", 5, 90, "gateway"),
        call("scale", "gw", 10, 20, "scale", "iris_scaler"),
        call("lr", "gw", 32, 28, "lr", "iris_classifier"),
        call("tree", "gw", 32, 48, "tree", "iris_tree"),
        call("vote", "gw", 82, 8, "vote", "iris_vote"),
    ]


def test_parallel_branches_count_once_along_the_critical_path():
    a = attribute(dag())
    rows = {r.span.id: r for r in a.rows}
    assert not rows["lr"].critical and rows["tree"].critical and rows["scale"].critical and rows["vote"].critical
    # the gateway's own time: what scale, tree and vote (the path) leave of its 90
    assert rows["gw"].own_us == 90 - 20 - 48 - 8
    assert rows["gw"].back_us == 95 - 90
    assert a.attributed_us == a.total_us == 100
    assert [(s.stage, s.critical) for s in a.stages] == [("scale", True), ("tree", True), ("lr", False), ("vote", True)]
    # a plain sum of own times would count lr's 28 us on top of the request's 100
    assert sum(r.own_us for r in a.rows) == 128


def test_children_sticking_out_by_clock_skew_are_clipped():
    spans = [
        envoy("front", None, 1000, 100, "ingress"),
        span("gw", "front", 990, 115, "gateway"),  # starts 10 us before its parent, ends 5 us after
    ]
    a = attribute(spans)
    rows = {r.span.id: r for r in a.rows}
    assert rows["gw"].critical and rows["gw"].offset_us == 0
    assert rows["front"].own_us == 0
    assert a.attributed_us == a.total_us == 100


def test_a_mirrored_call_is_never_counted():
    spans = [
        envoy("front", None, 0, 1000, "ingress"),
        span("gw", "front", 10, 980, "gateway"),
        call("c", "gw", 20, 900, "0", "m"),
        envoy("egress", "c", 30, 880, "egress"),
        envoy("main", "egress", 40, 800, "ingress", grpc__authority="127.0.0.1:9000"),
        # the mirror finishes after the main call, inside the egress span: only its
        # -shadow authority tells it from the main call
        envoy("mirror", "egress", 40, 850, "ingress", grpc__authority="127.0.0.1-shadow:9000"),
        span("rt", "main", 50, 700, "runtime", sluice__runtime="r", sluice__compute_ms="0.6"),
        # a fire-and-forget child that outlives its parent by far is detached too
        span("late", "gw", 900, 5000, "other", kind=None),
    ]
    a = attribute(spans)
    rows = {r.span.id: r for r in a.rows}
    assert not rows["mirror"].critical and not rows["late"].critical
    assert rows["egress"].own_us == 880 - 800
    assert a.attributed_us == a.total_us == 1000
    assert a.model_us == 600
    assert a.hops()[Hop.RUNTIME_CODEC] == 100


def test_spans_without_tags_keep_their_own_time_whole():
    spans = [
        envoy("front", None, 0, 100, "ingress"),
        span("gw", "front", 5, 90, "gateway"),
        call("c", "gw", 10, 80, "0", "triton_model"),
        envoy("egress", "c", 12, 76, "egress"),
        envoy("rt-sidecar", "egress", 14, 70, "ingress"),  # a runtime that does not join the trace
    ]
    a = attribute(spans)
    assert a.hops() == {Hop.FRONT_ENVOY: 10, Hop.GATEWAY: 10, Hop.GATEWAY_CALL: 4, Hop.EGRESS_ENVOY: 6, Hop.RUNTIME: 70}
    # the untraced runtime counts as model time: the mesh share is a lower bound
    assert a.model_us == 70 and a.stages[0].model_us == 70


def test_tags_larger_than_the_own_time_are_capped():
    spans = [span("rt", None, 0, 500, "runtime", sluice__runtime="r", sluice__queue_ms="0.3", sluice__compute_ms="0.4")]
    assert attribute(spans).rows[0].parts == ((Hop.RUNTIME_QUEUE, 300), (Hop.MODEL_COMPUTE, 200), (Hop.RUNTIME_CODEC, 0))


def test_orphans_are_reported_not_attributed():
    spans = [*dag(), span("orphan", "missing-parent", 0, 10, "x")]
    a = attribute(spans)
    assert a.detached == 1 and a.total_us == 100 and a.attributed_us == 100
    with pytest.raises(TraceError):
        attribute([])


def test_stage_p50s_over_several_requests():
    def request(model_us: int, call_us: int) -> list[Span]:
        return [
            span("gw", None, 0, call_us + 10, "gateway", sluice__pipeline="p"),
            call("c", "gw", 5, call_us, "0", "m"),
            span("rt", "c", 6, model_us + 2, "runtime", sluice__runtime="r", sluice__compute_ms=str(model_us / 1000)),
        ]

    # the p50 of mesh time is over each request's own split (40, 50, 900), not p50(call) - p50(model)
    summaries = summarize_stages(attribute(request(m, c)) for m, c in ((100, 140), (200, 250), (10, 910)))
    assert len(summaries) == 1
    s = summaries[0]
    assert (s.pipeline, s.stage, s.model, s.requests) == ("p", "0", "m", 3)
    assert (s.model_p50_us, s.mesh_p50_us, s.call_p50_us) == (100, 50, 250)


# --- the tags the processes write


@pytest.fixture
def tracing():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing("test", provider.get_tracer("test")), exporter
    provider.shutdown()


def test_server_span_tags_parse_and_encode_around_stage_work(tracing):
    tracer, exporter = tracing
    with tracer.server_span("request", {}):
        time.sleep(0.005)  # parsing
        with stage_work():
            pass
        time.sleep(0.005)  # encoding
        Tracing.response_started()
        time.sleep(0.005)  # sending the body: neither
    (finished,) = exporter.get_finished_spans()
    parse, encode = finished.attributes[PARSE_MS_TAG], finished.attributes[ENCODE_MS_TAG]
    duration_ms = (finished.end_time - finished.start_time) / 1e6
    assert 5 <= parse < duration_ms and 5 <= encode < duration_ms
    assert parse + encode <= duration_ms - 5


def test_stage_work_counts_from_the_first_start_to_the_last_end(tracing):
    tracer, exporter = tracing
    with tracer.server_span("stream", {}):
        with stage_work():
            pass
        time.sleep(0.01)  # between two records of a stream: not encoding
        with stage_work():
            pass
    (finished,) = exporter.get_finished_spans()
    assert finished.attributes[ENCODE_MS_TAG] < 10


def test_no_tags_without_stage_work_or_a_recording_span(tracing):
    tracer, exporter = tracing
    with stage_work():  # no server span: nothing to tag, no error
        tag_model_time(0.1, 0.2)
    with tracer.server_span("health", {}):
        pass
    (finished,) = exporter.get_finished_spans()
    assert not {PARSE_MS_TAG, ENCODE_MS_TAG, QUEUE_MS_TAG, COMPUTE_MS_TAG} & set(finished.attributes)


def test_predict_pool_tags_queue_and_compute_on_the_runtime_span(tracing):
    from runtimes.sdk.server import PredictPool

    class Blocking:
        async def predict(self, inputs):
            time.sleep(0.02)
            return {"y": inputs["x"]}

    tracer, exporter = tracing
    pool = PredictPool(1)

    async def two_at_once():
        async def one():
            with tracer.server_span("infer", {}):
                return await pool.predict(Blocking(), {"x": 1})

        return await asyncio.gather(one(), one())

    try:
        assert asyncio.run(two_at_once()) == [{"y": 1}, {"y": 1}]
    finally:
        pool.close()
    tags = sorted((s.attributes[QUEUE_MS_TAG], s.attributes[COMPUTE_MS_TAG]) for s in exporter.get_finished_spans())
    # one thread: the second call waited for the first one's 20 ms
    assert tags[0][0] < 20 <= tags[1][0]
    assert all(compute >= 20 for _, compute in tags)
