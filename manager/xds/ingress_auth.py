"""Token checks on the mesh's two public ingresses, as Envoy configuration (secure mode).

The manager's REST ingress (its sidecar: role ``service``, service ``manager``) and
the gateway's public ingress (role ``gateway``) get, in secure mode only, three HTTP
filters before the router, and per-route configuration for each of them over RDS:

1. ``envoy.filters.http.jwt_authn``: the token (``Authorization: Bearer``) must be an
   ES256 JWT from the manager (``local_jwks``: the manager's public key, inline; issuer,
   audience, expiry required); verified tokens are cached (``jwt_cache_config``). The
   payload goes to dynamic metadata (``jwt_payload``) and, on the manager's ingress
   only, to the ``x-sluice-jwt-payload`` header, for the one check Envoy cannot make
   (a ``runtime:<name>`` scope against the runtime in the path). Public routes (health,
   API docs) disable it per route.
2. ``sluice.revocations`` (``rbac``, DENY): the ids (``jti``) of revoked tokens that
   have not expired, as virtual-host configuration in the route configuration. A
   revocation therefore changes one RDS resource per protected sidecar, never a
   listener, and is live mesh-wide as soon as both sidecars ACK (tens of ms).
3. ``sluice.scopes`` (``rbac``, ALLOW): the scopes each route needs, matched on the
   ``scopes`` claim (``sourced_metadata`` principals, list ``one_of``). ``admin`` passes
   everywhere. Serving routes name the pipeline in the path, which no static policy
   can compare with a scope, so their policy adds a CEL condition:
   ``'serve:' + request.url_path.split('/')[i] in scopes`` (``i`` = the pipeline's
   segment: ``/serve/<p>``, ``/api/v1/serve/<p>``, OIP REST ``/v2/models/<p>/...``).
   The configuration is the same whatever the number of pipelines, and a pipeline
   created later needs no push. OIP gRPC (``ModelInfer``) names the pipeline in the
   body, which Envoy does not parse: gRPC needs ``serve:*`` (liveness and readiness
   excepted).

Paths are normalised (``normalize_path``, ``merge_slashes``, escaped slashes refused)
before routing, so the path checked is the path served. Envoy's plain-text 401/403
bodies are reshaped by ``local_reply_config`` into the project's JSON error (gRPC
calls keep Envoy's gRPC status). In dev mode none of this is pushed: zero cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# The _pb2 modules must be imported for json_format to resolve their "@type"s.
import envoy.extensions.filters.http.jwt_authn.v3.config_pb2  # noqa: F401
import envoy.extensions.filters.http.rbac.v3.rbac_pb2  # noqa: F401

from manager.auth.scopes import ADMIN, DEPLOY, PAYLOAD_HEADER, RUNTIME_PREFIX, SERVE_ALL, SERVE_PREFIX

JWT_FILTER = "envoy.filters.http.jwt_authn"
REVOCATIONS_FILTER = "sluice.revocations"
SCOPES_FILTER = "sluice.scopes"
PROVIDER = "sluice"
REQUIREMENT = "token"
#: the dynamic-metadata key (under the jwt_authn filter's namespace) holding the payload
PAYLOAD_KEY = "jwt_payload"

_JWT = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_JWT_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig"
_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
_RBAC_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"

MANAGER = "manager"
GATEWAY = "gateway"
REPOSITORY = "repository"


def public_ingress(node) -> str | None:
    """``manager``, ``gateway`` or ``repository`` for the sidecars whose ingress anyone can call."""
    if node.role == "gateway":
        return GATEWAY
    if node.role == "service" and node.service in (MANAGER, REPOSITORY):
        return node.service
    return None


# --- matchers
def _claim(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"sourced_metadata": {"metadata_matcher": {
        "filter": JWT_FILTER, "path": [{"key": PAYLOAD_KEY}, {"key": key}], "value": value,
    }}}


def _scope(exact: str | None = None, prefix: str | None = None) -> dict[str, Any]:
    string_match = {"exact": exact} if exact is not None else {"prefix": prefix}
    return _claim("scopes", {"list_match": {"one_of": {"string_match": string_match}}})


#: any token that verified (every token has an id)
_ANY_TOKEN = _claim("jti", {"present_match": True})


def _policy(*principals: dict[str, Any], condition: dict[str, Any] | None = None) -> dict[str, Any]:
    policy: dict[str, Any] = {"permissions": [{"any": True}], "principals": list(principals)}
    if condition is not None:
        policy["condition"] = condition
        policy["cel_config"] = {"enable_string_concat": True, "enable_string_functions": True}
    return policy


def _call(function: str, *args: dict[str, Any], target: dict[str, Any] | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"function": function, "args": list(args)}
    if target is not None:
        call["target"] = target
    return {"call_expr": call}


def _const(value: str | int) -> dict[str, Any]:
    return {"const_expr": {"string_value": value} if isinstance(value, str) else {"int64_value": value}}


def _select(operand: dict[str, Any], name: str) -> dict[str, Any]:
    return {"select_expr": {"operand": operand, "field": name}}


def serve_condition(segment: int) -> dict[str, Any]:
    """CEL: ``'serve:' + request.url_path.split('/')[segment] in <payload>.scopes``."""
    pipeline = _call("_[_]", _call("split", _const("/"), target=_select({"ident_expr": {"name": "request"}}, "url_path")), _const(segment))
    scopes = _call("_[_]", _call("_[_]", _call("_[_]", _select({"ident_expr": {"name": "metadata"}}, "filter_metadata"),
                                                 _const(JWT_FILTER)), _const(PAYLOAD_KEY)), _const("scopes"))
    return _call("@in", _call("_+_", _const(SERVE_PREFIX), pipeline), scopes)


def _rules(**policies: dict[str, Any]) -> dict[str, Any]:
    return {"action": "ALLOW", "policies": policies}


ADMIN_ONLY = _rules(admin=_policy(_scope(ADMIN)))
DEPLOYERS = _rules(deploy=_policy(_scope(ADMIN), _scope(DEPLOY)))
#: runtime registration, heartbeats, deregistration: the manager then checks the name
REGISTRARS = _rules(runtime=_policy(_scope(ADMIN), _scope(prefix=RUNTIME_PREFIX)))
#: recorded model digests: runtimes check their files against them
DIGEST_READERS = _rules(digests=_policy(_scope(ADMIN), _scope(DEPLOY), _scope(prefix=RUNTIME_PREFIX)))
ANY_TOKEN = _rules(token=_policy(_ANY_TOKEN))
SERVE_ALL_ONLY = _rules(serve_all=_policy(_scope(ADMIN), _scope(SERVE_ALL)))


def serving(segment: int) -> dict[str, Any]:
    """``admin``, ``serve:*``, or ``serve:<the pipeline in path segment>``."""
    return _rules(serve_all=_policy(_scope(ADMIN), _scope(SERVE_ALL)), pipeline=_policy({"any": True}, condition=serve_condition(segment)))


PUBLIC = None  # no token needed


def _method(name: str) -> list[dict[str, Any]]:
    return [{"name": ":method", "string_match": {"exact": name}}]


def _regex(pattern: str) -> dict[str, Any]:
    return {"safe_regex": {"regex": pattern}}


#: the manager's REST API: (match, rules), first match wins; the last catches everything else
MANAGER_ROUTES: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    ({"path": "/healthz"}, PUBLIC),
    ({"path_separated_prefix": "/docs"}, PUBLIC),
    ({"path": "/openapi.json"}, PUBLIC),
    ({"path": "/redoc"}, PUBLIC),
    ({"path_separated_prefix": "/api/v1/tokens"}, ADMIN_ONLY),
    ({"path": "/api/v1/runtimes", "headers": _method("POST")}, REGISTRARS),
    (_regex(r"/api/v1/runtimes/[^/]+/instances/[^/]+(/heartbeat)?"), REGISTRARS),
    ({**_regex(r"/api/v1/models/[^/]+/versions/[^/]+/digests"), "headers": _method("GET")}, DIGEST_READERS),
    ({"prefix": "/api/v1/pipelines"}, DEPLOYERS),  # also /api/v1/pipelines:apply
    ({"path_separated_prefix": "/api/v1/models"}, DEPLOYERS),
    ({"path_separated_prefix": "/api/v1/runtimes"}, DEPLOYERS),
    ({"path": "/api/v1/mesh"}, DEPLOYERS),
    ({"path": "/api/v1/info"}, ANY_TOKEN),
    ({"path_separated_prefix": "/ui/api"}, DEPLOYERS),  # the console's data views: the scope of pipelines
    ({"path_separated_prefix": "/ui"}, PUBLIC),  # the console's page and files: no data in them
    ({"prefix": "/"}, ADMIN_ONLY),  # /metrics and anything new: admin until said otherwise
]

#: the gateway's public ingress; gRPC routes go to the gateway's gRPC port
GATEWAY_GRPC_ROUTES: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    ({"path": "/inference.GRPCInferenceService/ServerLive", "grpc": {}}, PUBLIC),
    ({"path": "/inference.GRPCInferenceService/ServerReady", "grpc": {}}, PUBLIC),
    ({"prefix": "/grpc.health.v1.Health/", "grpc": {}}, PUBLIC),
    ({"prefix": "/", "grpc": {}}, SERVE_ALL_ONLY),  # ModelInfer names the pipeline in the body
]
GATEWAY_HTTP_ROUTES: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    ({"path_separated_prefix": "/healthz"}, PUBLIC),
    ({"path_separated_prefix": "/v2/health"}, PUBLIC),
    ({"path": "/v2"}, PUBLIC),  # OIP server metadata
    ({"prefix": "/serve/"}, serving(2)),
    ({"prefix": "/api/v1/serve/"}, serving(4)),
    ({"path": "/v2/models/stats"}, SERVE_ALL_ONLY),  # every pipeline's statistics
    ({"path_separated_prefix": "/v2/repository"}, SERVE_ALL_ONLY),  # lists every pipeline
    ({"prefix": "/v2/models/"}, serving(3)),
    ({"path_separated_prefix": "/api/v1/pipelines"}, DEPLOYERS),
    ({"prefix": "/"}, ADMIN_ONLY),  # /metrics, anything new
]


#: the model repository: anyone may read (runtimes download; what they load is checked
#: against the digests the manager recorded), only deployers write
REPOSITORY_ROUTES: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    ({"prefix": "/", "headers": _method("GET")}, PUBLIC),
    ({"prefix": "/", "headers": _method("HEAD")}, PUBLIC),
    ({"path_separated_prefix": "/models"}, DEPLOYERS),  # POST (upload) and DELETE
    ({"prefix": "/"}, ADMIN_ONLY),
]


def _error_mapper(status: int, code: str, message: str) -> dict[str, Any]:
    not_grpc = {"header_filter": {"header": {
        "name": "content-type", "string_match": {"prefix": "application/grpc"}, "invert_match": True,
        "treat_missing_header_as_empty": True,
    }}}
    return {
        "filter": {"and_filter": {"filters": [
            {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": status, "runtime_key": f"sluice.auth.status_{status}"}}}},
            not_grpc,
        ]}},
        "body_format_override": {
            "json_format": {"error": {"code": code, "message": message, "details": {"reason": "%RESPONSE_CODE_DETAILS%"}}},
            "content_type": "application/json",
        },
    }


@dataclass(frozen=True)
class IngressAuth:
    """What the public ingresses check, as of now: the verification key and the revoked ids."""

    jwks: str
    revoked: frozenset[str] = field(default_factory=frozenset)
    issuer: str = "sluice-manager"
    audience: str = "sluice"
    jwt_cache_size: int = 1000
    #: how long after ``exp`` (and before ``nbf``) a token still passes (Envoy's default is 60 s)
    clock_skew_s: int = 5

    def with_revoked(self, revoked: frozenset[str]) -> "IngressAuth":
        return replace(self, revoked=frozenset(revoked))

    def protects(self, node) -> bool:
        return public_ingress(node) is not None

    # --- listener side (changes only with the key)
    def http_filters(self, node) -> list[dict[str, Any]]:
        provider: dict[str, Any] = {
            "issuer": self.issuer,
            "audiences": [self.audience],
            "require_expiration": True,
            "clock_skew_seconds": self.clock_skew_s,
            "local_jwks": {"inline_string": self.jwks},
            "payload_in_metadata": PAYLOAD_KEY,
            "jwt_cache_config": {"jwt_cache_size": self.jwt_cache_size},
        }
        if public_ingress(node) == MANAGER:
            provider["forward_payload_header"] = PAYLOAD_HEADER
            # the manager passes the caller's own token on to the repository (uploads, deletes)
            provider["forward"] = True
        return [
            {"name": JWT_FILTER, "typed_config": {
                "@type": _JWT, "providers": {PROVIDER: provider},
                "requirement_map": {REQUIREMENT: {"provider_name": PROVIDER}},
            }},
            {"name": REVOCATIONS_FILTER, "typed_config": {"@type": _RBAC, "rules": {"action": "DENY"}}},
            {"name": SCOPES_FILTER, "typed_config": {"@type": _RBAC, "rules": ADMIN_ONLY}},
        ]

    def protect_hcm(self, node, hcm: dict[str, Any]) -> None:
        """Add the filters (before everything else) and the JSON error replies to an HCM's typed_config."""
        hcm["http_filters"] = [*self.http_filters(node), *hcm.get("http_filters", [])]
        hcm["normalize_path"] = True
        hcm["merge_slashes"] = True
        hcm["path_with_escaped_slashes_action"] = "REJECT_REQUEST"
        mappers = hcm.setdefault("local_reply_config", {}).setdefault("mappers", [])
        mappers[:0] = [
            _error_mapper(401, "unauthorized", "%LOCAL_REPLY_BODY%: send a token from the manager as 'Authorization: Bearer <token>'"),
            _error_mapper(403, "forbidden", "the token does not grant this call (it lacks the scope, or was revoked)"),
        ]

    # --- route side (changes with every revocation)
    def virtual_host(self, node, vhost: dict[str, Any]) -> dict[str, Any]:
        """The ingress virtual host with one route per protection rule, each sent where the
        unprotected virtual host sent it (gRPC to the gRPC cluster, the rest to the local one)."""
        routes = vhost["routes"]
        default = routes[-1]["route"]
        grpc = next((r["route"] for r in routes if "grpc" in r["match"]), None)
        face = public_ingress(node)
        if face == MANAGER:
            rules = MANAGER_ROUTES
        elif face == REPOSITORY:
            rules = REPOSITORY_ROUTES
        else:
            rules = [*(GATEWAY_GRPC_ROUTES if grpc is not None else []), *GATEWAY_HTTP_ROUTES]
        secured = []
        for match, policy in rules:
            action = grpc if "grpc" in match else default
            if policy is PUBLIC:
                per_filter = {
                    JWT_FILTER: {"@type": _JWT_ROUTE, "disabled": True},
                    REVOCATIONS_FILTER: {"@type": _RBAC_ROUTE},
                    SCOPES_FILTER: {"@type": _RBAC_ROUTE},
                }
            else:
                per_filter = {
                    JWT_FILTER: {"@type": _JWT_ROUTE, "requirement_name": REQUIREMENT},
                    SCOPES_FILTER: {"@type": _RBAC_ROUTE, "rbac": {"rules": policy}},
                }
            secured.append({"match": match, "route": action, "typed_per_filter_config": per_filter})
        out = {**vhost, "routes": secured}
        if self.revoked:
            principals = [_claim("jti", {"string_match": {"exact": jti}}) for jti in sorted(self.revoked)]
            out["typed_per_filter_config"] = {REVOCATIONS_FILTER: {"@type": _RBAC_ROUTE, "rbac": {"rules": {
                "action": "DENY", "policies": {"revoked": {"permissions": [{"any": True}], "principals": principals}},
            }}}}
        return out
