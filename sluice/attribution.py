"""Per-hop overhead of one request, computed from the spans of its trace.

A request's trace is a tree: the gateway sidecar's ingress span (the front door, the
root), the gateway's server span, and per stage the gateway's call span, the egress
Envoy's span, the runtime sidecar's ingress span and the runtime's inference span.
Each span's **own time** is its duration minus the time its children cover: that is
the hop's own overhead (the front Envoy's own time is its processing and the hop to
the gateway process, both ways; the egress Envoy's includes the mTLS hop to the
runtime's sidecar; the runtime Envoy's includes the hop into the runtime process).
A hop's own time thus runs until the next process's span starts: when that process is
busy (its event loop or gRPC server behind on other calls), the wait shows in the hop
before it, e.g. under load most of a slow runtime's backlog is in ``runtime Envoy``.

Children that run at once (a DAG's parallel branches, a mirror) would be counted
twice by a plain sum, so own time is taken along the **critical path** (as Jaeger
computes it): from a span's end, walk back to the child that finished last, then to
the one that finished before that child started, and so on; a span's own time is what
no child on that walk covers. Children off the walk (a branch that finished earlier,
a mirrored call) keep their own times in the waterfall but are not counted in the
total. Children are clipped to their parent first (clocks of two processes may differ
by microseconds); a child that ends well after its parent (a fire-and-forget mirror)
or a mirrored call (Envoy's ``-shadow`` authority) is never on the walk. So the own
times of the spans on the path add up exactly to the root span's duration: the
request's time at the front door, from its first byte in to its last byte out.

Own time is split further where a process tagged what it knows (``sluice.tracing``):
the gateway's into parse, encode and the rest (``gateway queue``: waiting for its
event loop, the framework, the time between stage calls); the runtime's into queue
(waiting for a predict thread), model compute and the rest (``runtime codec``:
reading and checking the tensors, writing the answer, the gRPC server). A span without
those tags keeps its own time whole (``gateway`` / ``runtime``, counted as model time
for a runtime: a mesh share from such a trace is a lower bound). **The way back** is
the part of each hop's own time after its last child answered (the response passing
back through it).

The **mesh** is everything that is not model compute: ``mesh = total - model``.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sluice.tracing import COMPUTE_MS_TAG, ENCODE_MS_TAG, PARSE_MS_TAG, QUEUE_MS_TAG, RUNTIME_TRACED_TAG

#: the tag Envoy puts on its spans (``component: proxy``)
ENVOY_COMPONENT = "proxy"
#: the tag the manager's xDS gives every Envoy span: ``ingress`` or ``egress``
DIRECTION_TAG = "sluice.direction"
#: tags the gateway and the runtimes put on their spans
STAGE_TAG = "sluice.stage"
MODEL_TAG = "sluice.model"
PIPELINE_TAG = "sluice.pipeline"
RUNTIME_TAG = "sluice.runtime"
#: a child that ends more than this after its parent is detached (fire-and-forget), not skew
DETACHED_AFTER_US = 1000


class Role(enum.Enum):
    """What a span is on the request's path."""

    FRONT_ENVOY = "front Envoy"
    GATEWAY = "gateway"
    GATEWAY_CALL = "gateway call"
    EGRESS_ENVOY = "egress Envoy"
    RUNTIME_ENVOY = "runtime Envoy"
    RUNTIME = "runtime"
    OTHER = "other"


class Hop(enum.Enum):
    """A named part of a request's time; a span's own time is one or several of these."""

    FRONT_ENVOY = "front Envoy"
    GATEWAY_PARSE = "gateway parse"
    GATEWAY_QUEUE = "gateway queue"
    GATEWAY_ENCODE = "gateway encode"
    GATEWAY = "gateway (no breakdown)"
    GATEWAY_CALL = "gateway call"
    EGRESS_ENVOY = "egress Envoy"
    RUNTIME_ENVOY = "runtime Envoy"
    RUNTIME_QUEUE = "runtime queue"
    MODEL_COMPUTE = "model compute"
    RUNTIME_CODEC = "runtime codec"
    RUNTIME = "runtime (no breakdown)"
    OTHER = "other"


#: hops whose time is the model's, not the mesh's
MODEL_HOPS = frozenset({Hop.MODEL_COMPUTE, Hop.RUNTIME})
ENVOY_HOPS = frozenset({Hop.FRONT_ENVOY, Hop.EGRESS_ENVOY, Hop.RUNTIME_ENVOY})


@dataclass(frozen=True)
class Span:
    """One span of a trace, as Zipkin's v2 API gives it (times in microseconds)."""

    trace_id: str
    id: str
    parent_id: str | None
    service: str
    name: str
    kind: str | None
    start_us: int
    duration_us: int
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def end_us(self) -> int:
        return self.start_us + self.duration_us

    @classmethod
    def from_zipkin(cls, raw: Mapping[str, Any]) -> Span:
        return cls(
            trace_id=str(raw.get("traceId", "")),
            id=str(raw["id"]),
            parent_id=raw.get("parentId"),
            service=str(raw.get("localEndpoint", {}).get("serviceName", "?")),
            name=str(raw.get("name", "")),
            kind=raw.get("kind"),
            start_us=int(raw.get("timestamp", 0)),
            duration_us=int(raw.get("duration", 0)),
            tags={str(k): str(v) for k, v in (raw.get("tags") or {}).items()},
        )

    def tag_us(self, key: str) -> int | None:
        """A millisecond tag (``sluice.tracing``) in microseconds; None when absent or not a number."""
        try:
            return max(0, round(float(self.tags[key]) * 1000))
        except (KeyError, ValueError):
            return None

    @property
    def shadow(self) -> bool:
        """A mirrored call: Envoy sends it to the ``<host>-shadow`` authority."""
        authority = self.tags.get("grpc.authority", "")
        url = self.tags.get("http.url", "")
        if not authority and "://" in url:
            authority = url.split("://", 1)[1].split("/", 1)[0]
        return authority.endswith("-shadow") or authority.rsplit(":", 1)[0].endswith("-shadow")


@dataclass(frozen=True)
class SpanTime:
    """One span of the waterfall: its own time and how that splits into hops."""

    span: Span
    role: Role
    depth: int
    offset_us: int  # from the root's start
    stage: str | None  # "<stage> <model>" of the gateway call this span is under
    critical: bool  # on the request's critical path: its own time counts in the total
    own_us: int
    back_us: int  # of own_us, after its last child answered (the way back)
    parts: tuple[tuple[Hop, int], ...]


@dataclass(frozen=True)
class StageTime:
    """One stage call of a request: the gateway's call span, and the model's time inside it."""

    stage: str
    model: str
    call_us: int
    model_us: int
    critical: bool

    @property
    def mesh_us(self) -> int:
        return self.call_us - self.model_us


@dataclass(frozen=True)
class Attribution:
    """A request's time, hop by hop."""

    trace_id: str
    pipeline: str | None
    total_us: int  # the root span's duration: the request at the front door
    rows: tuple[SpanTime, ...]  # the waterfall, in tree order
    stages: tuple[StageTime, ...]
    detached: int  # spans not under the root (missing parents): not attributed

    def hops(self) -> dict[Hop, int]:
        """Own time per hop over the critical path (sums to ``total_us``), in ``Hop`` order."""
        sums = dict.fromkeys(Hop, 0)
        for row in self.rows:
            if row.critical:
                for hop, us in row.parts:
                    sums[hop] += us
        return {hop: us for hop, us in sums.items() if us}

    @property
    def attributed_us(self) -> int:
        return sum(self.hops().values())

    @property
    def model_us(self) -> int:
        return sum(us for hop, us in self.hops().items() if hop in MODEL_HOPS)

    @property
    def mesh_us(self) -> int:
        return self.attributed_us - self.model_us

    @property
    def envoy_us(self) -> int:
        return sum(us for hop, us in self.hops().items() if hop in ENVOY_HOPS)

    @property
    def back_us(self) -> int:
        return sum(row.back_us for row in self.rows if row.critical)

    @property
    def mesh_share(self) -> float:
        return self.mesh_us / self.attributed_us if self.attributed_us else 0.0

    def to_json(self) -> dict[str, Any]:
        """The attribution as plain JSON (``sluice trace --json``); times in milliseconds."""
        ms = _ms
        return {
            "trace_id": self.trace_id,
            "pipeline": self.pipeline,
            "total_ms": ms(self.total_us),
            "attributed_ms": ms(self.attributed_us),
            "model_ms": ms(self.model_us),
            "mesh_ms": ms(self.mesh_us),
            "mesh_share": round(self.mesh_share, 4),
            "envoy_ms": ms(self.envoy_us),
            "way_back_ms": ms(self.back_us),
            "hops": {hop.value: ms(us) for hop, us in self.hops().items()},
            "stages": [
                {"stage": s.stage, "model": s.model, "call_ms": ms(s.call_us), "model_ms": ms(s.model_us),
                 "mesh_ms": ms(s.mesh_us), "critical": s.critical}
                for s in self.stages
            ],
            "spans": [
                {"service": r.span.service, "name": r.span.name, "role": r.role.value, "depth": r.depth,
                 "offset_ms": ms(r.offset_us), "duration_ms": ms(r.span.duration_us), "own_ms": ms(r.own_us),
                 "back_ms": ms(r.back_us), "critical": r.critical, "stage": r.stage,
                 "parts": {hop.value: ms(us) for hop, us in r.parts}}
                for r in self.rows
            ],
            "detached_spans": self.detached,
        }


def _ms(us: int) -> float:
    return round(us / 1000, 3)


class TraceError(ValueError):
    """The spans do not make one request's trace (none, or no root)."""


@dataclass
class _Node:
    span: Span
    start: int  # clipped to the parent
    end: int
    children: list[_Node] = field(default_factory=list)
    detached: list[_Node] = field(default_factory=list)  # under it, but never on the walk


def attribute(spans: Iterable[Span]) -> Attribution:
    """The attribution of one request from its trace's spans (any order)."""
    spans = list(spans)
    if not spans:
        raise TraceError("the trace has no spans")
    by_id = {s.id: s for s in spans}
    roots = [s for s in spans if s.parent_id is None or s.parent_id not in by_id]
    # the request's root: the span without a parent that lasts longest (the front door);
    # other parentless spans are parts whose parents never reached Zipkin
    root_span = max(roots, key=lambda s: (s.parent_id is None, s.duration_us))
    children: dict[str, list[Span]] = {}
    for s in spans:
        if s.parent_id is not None and s.parent_id in by_id:
            children.setdefault(s.parent_id, []).append(s)

    def build(span: Span, start: int, end: int) -> _Node:
        node = _Node(span, start, end)
        for child in sorted(children.get(span.id, ()), key=lambda c: (c.start_us, -c.duration_us)):
            c_start, c_end = max(child.start_us, start), min(child.end_us, end)
            sub = build(child, c_start, max(c_start, c_end))
            if child.shadow or child.end_us > end + DETACHED_AFTER_US:
                node.detached.append(sub)
            else:
                node.children.append(sub)
        return node

    root = build(root_span, root_span.start_us, root_span.end_us)
    rows: list[SpanTime] = []
    stages: list[StageTime] = []

    def walk(node: _Node, depth: int, parent_role: Role | None, stage: str | None, critical: bool) -> int:
        """Append the node's row and its subtree's; return the model time in the subtree."""
        span = node.span
        role = _role(span, parent_role)
        if role is Role.GATEWAY_CALL:
            stage = f"{span.tags.get(STAGE_TAG, '?')} {span.tags.get(MODEL_TAG, span.name)}"
        path, own, back = _critical_children(node)
        parts = _split(span, role, own, bool(node.children))
        index = len(rows)
        rows.append(SpanTime(span, role, depth, node.start - root.start, stage, critical, own, back, parts))
        model = sum(us for hop, us in parts if hop in MODEL_HOPS)
        on_path = {id(c) for c in path}
        for child in sorted([*node.children, *node.detached], key=lambda c: (c.start, -(c.end - c.start))):
            model += walk(child, depth + 1, role, stage, critical and id(child) in on_path)
        if role is Role.GATEWAY_CALL:
            stages.append(StageTime(span.tags.get(STAGE_TAG, "?"), span.tags.get(MODEL_TAG, span.name),
                                    node.end - node.start, min(model, node.end - node.start), rows[index].critical))
        return model

    walk(root, 0, None, None, True)
    pipeline = next((s.tags[PIPELINE_TAG] for s in spans if s.tags.get(PIPELINE_TAG)), None)
    reached = len(rows)
    return Attribution(root_span.trace_id, pipeline, root_span.duration_us, tuple(rows), tuple(stages), len(spans) - reached)


def _critical_children(node: _Node) -> tuple[list[_Node], int, int]:
    """The children on the node's critical path (last first), its own time, and the part of
    that after the last child answered. From the node's end: the child that finished last,
    then the one that finished last before that child started, and so on."""
    cursor = node.end
    pool = list(node.children)
    path: list[_Node] = []
    own = back = 0
    while True:
        eligible = [c for c in pool if c.end <= cursor]
        if not eligible:
            break
        child = max(eligible, key=lambda c: (c.end, c.end - c.start))
        pool.remove(child)
        gap = cursor - child.end
        own += gap
        if not path:
            back = gap
        path.append(child)
        cursor = child.start
    own += cursor - node.start
    return path, own, back


def _role(span: Span, parent: Role | None) -> Role:
    if span.tags.get("component") == ENVOY_COMPONENT:
        if span.tags.get(DIRECTION_TAG) == "egress":
            return Role.EGRESS_ENVOY
        return Role.RUNTIME_ENVOY if parent is Role.EGRESS_ENVOY else Role.FRONT_ENVOY
    if span.kind == "CLIENT" and STAGE_TAG in span.tags:
        return Role.GATEWAY_CALL
    if RUNTIME_TAG in span.tags:  # a runtime's call span, or one stage of a fused call under it
        return Role.RUNTIME
    if span.kind == "SERVER":
        if RUNTIME_TAG in span.tags or parent is Role.RUNTIME_ENVOY:
            return Role.RUNTIME
        return Role.GATEWAY
    return Role.OTHER


def _split(span: Span, role: Role, own: int, has_children: bool) -> tuple[tuple[Hop, int], ...]:
    """A span's own time as hops, using the times it tagged (each capped by what is left)."""
    if role is Role.GATEWAY:
        parse, encode = span.tag_us(PARSE_MS_TAG), span.tag_us(ENCODE_MS_TAG)
        if parse is None and encode is None:
            return ((Hop.GATEWAY, own),)
        parse_us, encode_us, queue_us = _take(own, ((Hop.GATEWAY_PARSE, parse or 0), (Hop.GATEWAY_ENCODE, encode or 0)), Hop.GATEWAY_QUEUE)
        return parse_us, queue_us, encode_us  # in the order they happen
    if role is Role.RUNTIME:
        compute = span.tag_us(COMPUTE_MS_TAG)
        if compute is None:
            return ((Hop.RUNTIME, own),)
        return _take(own, ((Hop.RUNTIME_QUEUE, span.tag_us(QUEUE_MS_TAG) or 0), (Hop.MODEL_COMPUTE, compute)), Hop.RUNTIME_CODEC)
    if role is Role.RUNTIME_ENVOY and not has_children:
        # a runtime that does not join the trace (e.g. a Triton server): its time is inside
        return ((Hop.RUNTIME, own),)
    hop = {
        Role.FRONT_ENVOY: Hop.FRONT_ENVOY, Role.GATEWAY_CALL: Hop.GATEWAY_CALL, Role.EGRESS_ENVOY: Hop.EGRESS_ENVOY,
        Role.RUNTIME_ENVOY: Hop.RUNTIME_ENVOY,
    }.get(role, Hop.OTHER)
    return ((hop, own),)


def _take(own: int, tagged: Sequence[tuple[Hop, int]], rest: Hop) -> tuple[tuple[Hop, int], ...]:
    parts, left = [], own
    for hop, us in tagged:
        us = min(us, left)
        parts.append((hop, us))
        left -= us
    parts.append((rest, left))
    return tuple(parts)


@dataclass(frozen=True)
class StageSummary:
    """p50 of a stage's model time and mesh time over several requests."""

    pipeline: str
    stage: str
    model: str
    requests: int
    model_p50_us: float
    mesh_p50_us: float
    call_p50_us: float


def summarize_stages(attributions: Iterable[Attribution]) -> list[StageSummary]:
    """Per (pipeline, stage): the p50s over the given requests' stage calls (each request's
    model and mesh time come from the same call, so their split is exact per request)."""
    grouped: dict[tuple[str, str, str], list[StageTime]] = {}
    for a in attributions:
        for s in a.stages:
            grouped.setdefault((a.pipeline or "?", s.stage, s.model), []).append(s)
    return [
        StageSummary(pipeline, stage, model, len(calls),
                     statistics.median(c.model_us for c in calls), statistics.median(c.mesh_us for c in calls),
                     statistics.median(c.call_us for c in calls))
        for (pipeline, stage, model), calls in sorted(grouped.items(), key=lambda kv: (kv[0][0], _stage_key(kv[0][1])))
    ]


def _stage_key(stage: str) -> tuple[int, str]:
    return (int(stage), "") if stage.isdigit() else (1 << 30, stage)


def _truthy(tag: str | None) -> bool:
    return tag is not None and tag.lower() == "true"  # Zipkin's tags are strings


def complete(spans: Sequence[Span]) -> bool:
    """Whether a trace looks whole: one root, every parent present, every stage call reached
    its runtime's sidecar (each Envoy sends its spans on its own schedule), and a runtime
    that traces has a span under each of its sidecar's spans: one whose answer said so
    (the gateway's call span tagged ``sluice.runtime_traced``), or one with a span under
    another of its sidecar's spans (a runtime that never joins the trace, e.g. Triton, has none)."""
    if not spans:
        return False
    by_id = {s.id: s for s in spans}
    if sum(1 for s in spans if s.parent_id is None) != 1 or any(s.parent_id not in by_id for s in spans if s.parent_id):
        return False
    has_child = {s.parent_id for s in spans if s.parent_id}

    def envoy(s: Span, direction: str) -> bool:
        return s.tags.get("component") == ENVOY_COMPONENT and s.tags.get(DIRECTION_TAG) == direction

    calls = [s for s in spans if s.kind == "CLIENT" and STAGE_TAG in s.tags]
    egress = [s for s in spans if envoy(s, "egress") and not s.shadow]
    if not all(s.id in has_child for s in (*calls, *egress)):
        return False
    children: dict[str, list[Span]] = {}
    for s in spans:
        if s.parent_id:
            children.setdefault(s.parent_id, []).append(s)

    def reaches_runtime(s: Span) -> bool:
        return any(RUNTIME_TAG in c.tags or reaches_runtime(c) for c in children.get(s.id, ()))

    # a call whose runtime answered that it traced it (``sluice.tracing.TRACED_PARAMETER``)
    if not all(reaches_runtime(s) for s in calls if _truthy(s.tags.get(RUNTIME_TRACED_TAG))):
        return False
    runtime_sidecars: dict[str, list[Span]] = {}
    for s in spans:
        if envoy(s, "ingress") and s.parent_id is not None and envoy(by_id[s.parent_id], "egress") and not s.shadow:
            runtime_sidecars.setdefault(s.service, []).append(s)
    return all(
        all(s.id in has_child for s in sidecar) or not any(s.id in has_child for s in sidecar)
        for sidecar in runtime_sidecars.values()
    )
