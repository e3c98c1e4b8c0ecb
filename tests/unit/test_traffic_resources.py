"""Traffic and policy per stage, from the definition to Envoy's configuration:
``manager.traffic_spec`` (the REST fields and their 422s), ``sluice.traffic`` (plan and
wire form), ``manager.xds.traffic`` (routes, splits, pins, sticky hashing, mirrors,
retries, local rate limits, stage clusters) and ``manager.xds.layers`` (stage clusters
follow the pipeline's live revisions)."""

from __future__ import annotations

import pytest
from google.protobuf.json_format import MessageToDict
from pydantic import ValidationError

from manager.resolve import resolve
from manager.schemas import PipelineSpec
from manager.served_models import models_from_json
from manager.store import RuntimeRow
from manager.xds.layers import MeshLayers
from manager.xds.resources import CLUSTER, ENDPOINT, MeshSettings, NodeInfo, pipeline_scope_resource, retry_policy
from manager.xds.traffic import RATE_LIMIT_FILTER, stage_cluster_name, token_bucket
from sluice.errors import ApiError
from sluice.plan_proto import from_bytes, to_bytes, to_proto
from sluice.traffic import (
    RATE_LIMITED_HEADER, SERVED_RUNTIME_HEADER, VARIANT_HEADER, VERSION_HEADER, Mirror, RateLimit, StageTraffic, Variant,
)
from sluice.wire import runtime_cluster


def _t(name: str, datatype: str, *shape: int) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape)}


SCALER = {"versions": ["1"], "inputs": [_t("x", "FP64", -1)], "outputs": [_t("features", "FP64", -1, 4)]}
CLASSIFIER = {"versions": ["1", "2"], "inputs": [_t("features", "FP64", -1, 4)], "outputs": [_t("label", "BYTES", -1)]}
RUNTIMES = {
    "scikit": RuntimeRow("scikit", "oip", models_from_json({"iris_scaler": SCALER, "iris_classifier": CLASSIFIER})),
    "canary": RuntimeRow("canary", "oip", models_from_json({"iris_classifier": {**CLASSIFIER, "versions": ["1"]}})),
    "shadow": RuntimeRow("shadow", "oip", models_from_json({"iris_classifier": {**CLASSIFIER, "versions": ["3"]}})),
}


def plan_of(classifier: dict, revision: int = 1, **pipeline):
    spec = PipelineSpec.model_validate(
        {"name": "iris", "stages": [{"runtime": "scikit", "model": "iris_scaler"}, {"runtime": "scikit", "model": "iris_classifier", **classifier}], **pipeline}
    )
    return resolve(spec, revision, RUNTIMES, 3000)


def routes_of(plan) -> dict[str, dict]:
    scope = pipeline_scope_resource(plan.name, [plan], retry_policy(2))
    routes = MessageToDict(scope, preserving_proto_field_name=True)["route_configuration"]["virtual_hosts"][0]["routes"]
    return {r["name"]: r for r in routes}


def test_traffic_fields_resolve_into_the_plan_and_survive_the_wire_form() -> None:
    plan = plan_of(
        {
            "traffic": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}],
            "mirror": {"runtime": "shadow", "version": "3", "percent": 25},
            "sticky": "X-User",
            "retries": {"attempts": 3, "per_try_timeout_ms": 200, "on": ["unavailable", "reset"]},
            "rate_limit": {"rps": 20},
            "outlier_detection": {"consecutive_errors": 3},
            "circuit_breaker": {"max_requests": 8},
        },
        rate_limit={"rps": 50, "burst": 100},
    )
    traffic = plan.stages[1].traffic
    assert traffic.variants == (Variant("scikit", "1", 50), Variant("scikit", "2", 50))
    assert traffic.mirror == Mirror("shadow", "3", 25.0)
    assert traffic.sticky == "x-user"  # header names are case-insensitive: stored lower-case
    assert (traffic.retry.attempts, traffic.retry.per_try_timeout_ms, traffic.retry.on) == (3, 200, ("unavailable", "reset"))
    assert traffic.rate_limit == RateLimit(20, 20)  # burst defaults to rps
    assert traffic.outlier.consecutive_errors == 3 and traffic.circuit_breaker.max_requests == 8
    assert plan.rate_limit == RateLimit(50, 100)
    assert plan.stages[0].traffic == StageTraffic()
    assert from_bytes(to_bytes(plan)) == plan


def test_a_plain_stage_has_the_same_wire_form_as_before_traffic_existed() -> None:
    plan = plan_of({})
    message = to_proto(plan)
    assert not any(s.HasField("traffic") for s in message.stages) and not message.HasField("rate_limit")
    assert from_bytes(to_bytes(plan)) == plan


@pytest.mark.parametrize(
    "classifier, field, words",
    [
        ({"traffic": [{"runtime": "nope", "weight": 1}]}, "traffic[0]", "unknown runtime 'nope'"),
        ({"traffic": [{"version": "7", "weight": 1}]}, "traffic[0]", "no version '7'"),
        ({"traffic": [{"runtime": "canary", "version": "2", "weight": 1}]}, "traffic[0]", "no version '2'"),
        ({"traffic": [{"version": "1", "weight": 0}, {"version": "2", "weight": 0}]}, "traffic", "add up to 0"),
        ({"traffic": [{"version": "1", "weight": 1}, {"version": "1", "weight": 2}]}, "traffic", "same runtime and version"),
        ({"mirror": {"runtime": "shadow", "version": "1"}}, "mirror", "no version '1'"),
        ({"sticky": "x-user"}, "sticky", "two entries or more"),
    ],
)
def test_bad_traffic_is_a_422_naming_the_stage_and_the_field(classifier, field, words) -> None:
    with pytest.raises(ApiError) as caught:
        plan_of(classifier)
    error = caught.value
    assert error.status == 422 and error.code == "bad_traffic"
    assert error.details["stage"] == 1 and error.details["field"] == field
    assert words in error.message and "stage 1" in error.message


@pytest.mark.parametrize(
    "classifier",
    [
        {"sticky": "x-sluice-route", "traffic": [{"version": "1", "weight": 1}, {"version": "2", "weight": 1}]},
        {"sticky": "x user"},
        {"traffic": [{"weight": 1}]},  # names neither runtime nor version
        {"rate_limit": {"rps": 0}},
        {"retries": {"attempts": 2, "on": ["everything"]}},
        {"mirror": {"runtime": "shadow", "percent": 101}},
    ],
)
def test_malformed_traffic_fields_do_not_validate(classifier) -> None:
    with pytest.raises(ValidationError):
        plan_of(classifier)


def test_a_version_split_is_weighted_clusters_each_adding_its_version_header() -> None:
    routes = routes_of(plan_of({"traffic": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]}))
    route = routes["iris.r1.s1"]["route"]
    entries = route["weighted_clusters"]["clusters"]
    assert [(e["name"], e["weight"]) for e in entries] == [(runtime_cluster("scikit"), 90), (runtime_cluster("scikit"), 10)]
    assert [e["request_headers_to_add"][0]["header"] for e in entries] == [
        {"key": VERSION_HEADER, "value": "1"}, {"key": VERSION_HEADER, "value": "2"},
    ]
    assert all(e["response_headers_to_add"][0]["header"] == {"key": SERVED_RUNTIME_HEADER, "value": "scikit"} for e in entries)
    assert "hash_policy" not in route and "use_hash_policy" not in route["weighted_clusters"]


def test_a_split_has_a_pinned_route_per_variant_before_it() -> None:
    routes = routes_of(plan_of({"traffic": [{"runtime": "scikit", "weight": 90}, {"runtime": "canary", "weight": 10}]}))
    names = list(routes)
    assert names.index("iris.r1.s1.pin0") < names.index("iris.r1.s1.pin1") < names.index("iris.r1.s1")
    pin = routes["iris.r1.s1.pin1"]
    variant = next(h for h in pin["match"]["headers"] if h["name"] == VARIANT_HEADER)
    assert variant["string_match"]["safe_regex"]["regex"] == "^(?:canary)$"
    assert pin["route"]["cluster"] == runtime_cluster("canary")
    assert pin["response_headers_to_add"][0]["header"]["value"] == "canary"
    # a plain stage has no pins and one cluster
    assert routes["iris.r1.s0"]["route"]["cluster"] == runtime_cluster("scikit")
    assert "iris.r1.s0.pin0" not in routes


def test_sticky_hashes_the_header_and_the_split_uses_the_hash() -> None:
    route = routes_of(plan_of({"traffic": [{"version": "1", "weight": 1}, {"version": "2", "weight": 1}], "sticky": "x-user"}))["iris.r1.s1"]["route"]
    assert route["hash_policy"] == [{"header": {"header_name": "x-user"}}]
    assert route["weighted_clusters"]["use_hash_policy"] is True


def test_a_mirror_is_a_request_mirror_policy_with_its_percent_and_version() -> None:
    route = routes_of(plan_of({"mirror": {"runtime": "shadow", "version": "3", "percent": 12.5}}))["iris.r1.s1"]["route"]
    (mirror,) = route["request_mirror_policies"]
    assert mirror["cluster"] == runtime_cluster("shadow")
    assert mirror["runtime_fraction"]["default_value"] == {"numerator": 125_000, "denominator": "MILLION"}
    assert mirror["request_headers_mutations"][0]["append"]["header"] == {"key": VERSION_HEADER, "value": "3"}


def test_retries_and_timeout_are_the_stages_own() -> None:
    routes = routes_of(plan_of({"timeout_ms": 1500, "retries": {"attempts": 4, "per_try_timeout_ms": 250, "on": ["5xx", "reset"]}}))
    own, default = routes["iris.r1.s1"]["route"], routes["iris.r1.s0"]["route"]
    assert own["timeout"] == "1.500s" and own["retry_policy"]["num_retries"] == 4
    assert own["retry_policy"]["per_try_timeout"] == "0.250s" and own["retry_policy"]["retry_on"] == "5xx,reset"
    assert own["retry_policy"]["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert default["retry_policy"]["num_retries"] == 2 and "per_try_timeout" not in default["retry_policy"]


def test_rate_limits_are_local_rate_limits_on_the_routes_the_pipelines_on_its_first_stage() -> None:
    routes = routes_of(plan_of({"rate_limit": {"rps": 5, "burst": 7}}, rate_limit={"rps": 20}))
    first = routes["iris.r1.s0"]["typed_per_filter_config"][RATE_LIMIT_FILTER]
    second = routes["iris.r1.s1"]["typed_per_filter_config"][RATE_LIMIT_FILTER]
    assert first["token_bucket"] == {"max_tokens": 20, "tokens_per_fill": 1, "fill_interval": "0.050s"}
    assert first["response_headers_to_add"][0]["header"] == {"key": RATE_LIMITED_HEADER, "value": "pipeline"}
    assert second["token_bucket"] == {"max_tokens": 7, "tokens_per_fill": 1, "fill_interval": "0.200s"}
    assert second["response_headers_to_add"][0]["header"]["value"] == "stage"
    assert first["rate_limited_as_resource_exhausted"] is True
    assert first["filter_enforced"]["default_value"]["numerator"] == 100
    assert "typed_per_filter_config" not in routes_of(plan_of({}))["iris.r1.s1"]


@pytest.mark.parametrize("rps, bucket", [(1, (1, 1, 1000)), (20, (20, 1, 50)), (50, (50, 2, 50)), (1000, (1000, 50, 50))])
def test_token_buckets_refill_as_finely_as_envoy_allows(rps, bucket) -> None:
    assert token_bucket(RateLimit(rps, rps)) == bucket


def _gateway() -> NodeInfo:
    return NodeInfo("gw", "gateway", "gateway", 8083, 18083, egress_port=18100)


def test_outlier_detection_and_circuit_breakers_give_the_stage_clusters_of_its_own() -> None:
    policy = {"outlier_detection": {"consecutive_errors": 3, "base_ejection_ms": 500}, "circuit_breaker": {"max_requests": 8, "max_pending_requests": 2},
              "traffic": [{"runtime": "scikit", "weight": 1}, {"runtime": "canary", "weight": 1}]}
    plan = plan_of(policy)
    layers = MeshLayers(MeshSettings())
    layers.set_endpoints({"scikit": (("127.0.0.1", 9001),), "canary": (("127.0.0.1", 9002),)})
    layers.set_pipelines({"iris": [plan]})
    clusters = {c.name: MessageToDict(c, preserving_proto_field_name=True) for c in _resources(layers, CLUSTER)}
    own = [stage_cluster_name(plan, 1, r) for r in ("scikit", "canary")]
    assert set(own) <= set(clusters) and runtime_cluster("scikit") in clusters
    for name, runtime in zip(own, ("scikit", "canary")):
        cluster = clusters[name]
        assert "service_name" not in cluster["eds_cluster_config"]  # an assignment of its own name:
        assert _ports(layers, name) == [9001 if runtime == "scikit" else 9002]  # the runtime's endpoints
        assert cluster["outlier_detection"]["consecutive_5xx"] == 3 and cluster["outlier_detection"]["base_ejection_time"] == "0.500s"
        assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] == 8
        assert cluster["circuit_breakers"]["thresholds"][0]["max_pending_requests"] == 2
    split = routes_of(plan)["iris.r1.s1"]["route"]["weighted_clusters"]["clusters"]
    assert [e["name"] for e in split] == own
    # the runtime's endpoints change: so do its stage clusters'
    layers.set_endpoints({"scikit": (("127.0.0.1", 9001), ("127.0.0.1", 9003)), "canary": (("127.0.0.1", 9002),)})
    assert _ports(layers, own[0]) == [9001, 9003] and _ports(layers, own[1]) == [9002]
    # a replace without the policy, then a withdrawal, removes them
    layers.set_pipelines({"iris": [plan, plan_of({}, revision=2)]})
    assert set(own) <= {c.name for c in _resources(layers, CLUSTER)}  # the draining revision keeps its own
    layers.set_pipelines({"iris": [plan_of({}, revision=2)]})
    assert not set(own) & {c.name for c in _resources(layers, CLUSTER)}
    layers.set_pipelines({"iris": []})
    assert not layers.stage_clusters.items and not layers.stage_endpoints.items


def _ports(layers: MeshLayers, cluster: str) -> list[int]:
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

    found = layers.snapshot_for(_gateway()).get(ENDPOINT, cluster)
    assignment = ClusterLoadAssignment.FromString(found.body.value)
    return [e.endpoint.address.socket_address.port_value for loc in assignment.endpoints for e in loc.lb_endpoints]


def _resources(layers: MeshLayers, type_url: str):
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    snapshot = layers.snapshot_for(_gateway())
    return [Cluster.FromString(r.body.value) for r in snapshot.resources(type_url)]


# --- gateway.served_by: the headers the gateway carries (Envoy does the routing)
def test_stage_calls_forward_only_the_pin_and_the_sticky_key_and_never_the_markers() -> None:
    import asyncio

    from gateway import served_by

    metadata = (("x-sluice-route", "iris.r1.s1"), ("x-sluice-pipeline", "iris"), ("x-sluice-stage", "1"), ("x-sluice-model", "iris_classifier"))
    marked = metadata + served_by.stage_metadata("x-user", "lr")
    assert served_by.forwarded(marked) == metadata  # outside a request: the markers only go

    seen: dict = {}

    async def app(scope, receive, send):
        seen["forwarded"] = served_by.forwarded(marked)
        served_by.record(marked, "2", (("x-sluice-served-runtime", "canary"),))
        served_by.record(metadata, "1", ())  # no marker: the stage header names it; no runtime header: "?"
        await send({"type": "http.response.start", "status": 429, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def call():
        import httpx

        transport = httpx.ASGITransport(app=served_by.ServedByMiddleware(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.post("/serve/iris", headers={"x-sluice-variant": "canary", "x-user": "u1", "x-sluice-route": "evil"})

    response = asyncio.run(call())
    assert seen["forwarded"] == metadata + (("x-sluice-variant", "canary"), ("x-user", "u1"))  # the client's x-sluice-route is not
    assert response.headers["x-sluice-served-by"] == "lr=canary/iris_classifier:2, 1=?/iris_classifier:1"
    assert response.headers["retry-after"] == "1"


# --- each version's own signature (``manager.signatures.signature_for``)

#: ``iris_classifier`` version 2 gives probabilities where version 1 gives labels;
#: version 3 takes 3 features
PROBABILITIES = [_t("probabilities", "FP64", -1, 3)]
VERSIONED = {
    "scikit": RuntimeRow("scikit", "oip", models_from_json({
        "iris_scaler": SCALER,
        "iris_classifier": {**CLASSIFIER, "versions": ["1", "2", "3"], "by_version": {
            "1": {"inputs": CLASSIFIER["inputs"], "outputs": CLASSIFIER["outputs"]},
            "2": {"inputs": CLASSIFIER["inputs"], "outputs": PROBABILITIES},
            "3": {"inputs": [_t("features", "FP64", -1, 3)], "outputs": CLASSIFIER["outputs"]},
        }},
    })),
}


def versioned_plan(classifier: dict):
    spec = PipelineSpec.model_validate(
        {"name": "iris", "stages": [{"runtime": "scikit", "model": "iris_scaler"}, {"runtime": "scikit", "model": "iris_classifier", **classifier}]}
    )
    return resolve(spec, 1, VERSIONED, 3000)


def test_a_pinned_stage_has_its_versions_signature_and_an_unpinned_one_the_defaults() -> None:
    assert [t.name for t in versioned_plan({"version": "2"}).stages[1].outputs] == ["probabilities"]
    assert [t.name for t in versioned_plan({}).stages[1].outputs] == ["label"]
    with pytest.raises(ApiError) as caught:  # version 3 takes 3 features: the scaler gives 4
        versioned_plan({"version": "3"})
    assert caught.value.status == 422 and "stage 1" in caught.value.message


@pytest.mark.parametrize(
    "classifier, words",
    [
        ({"traffic": [{"version": "1", "weight": 1}, {"version": "2", "weight": 1}]}, "version '2' of 'iris_classifier' has other outputs"),
        ({"traffic": [{"version": "1", "weight": 1}, {"version": "3", "weight": 1}]}, "version '3' of 'iris_classifier' has other inputs"),
        ({"mirror": {"version": "3"}}, "has other inputs"),
    ],
)
def test_a_variant_or_mirror_whose_version_has_other_tensors_is_a_422(classifier, words) -> None:
    with pytest.raises(ApiError) as caught:
        versioned_plan(classifier)
    assert caught.value.code == "bad_traffic" and words in caught.value.message, caught.value.message


def test_a_mirror_may_answer_other_outputs_since_its_answer_goes_nowhere() -> None:
    plan = versioned_plan({"mirror": {"version": "2", "percent": 100}})
    assert plan.stages[1].traffic.mirror == Mirror("scikit", "2", 100.0)
