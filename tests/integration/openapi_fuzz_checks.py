"""Checks the OpenAPI fuzz (tests/integration/test_openapi_fuzz.py) adds to schemathesis's
own: loaded by the ``st`` CLI through ``SCHEMATHESIS_HOOKS``.

* ``error_shape``: every error (4xx/5xx) is the project's ``{"error": {"code",
  "message", "details"}}`` (a string code and message, an object of details); under
  ``/v2`` OIP's own ``{"error": "<message>"}``, which the KServe/Triton protocol fixes.
* ``schema_agrees_with_validator``: a request the schema calls valid is never refused by
  the service's own request validation (FastAPI's ``invalid``, the gateway's records
  parser ``invalid_input``); a 422 it may get must come from a rule the schema cannot
  state (an unknown runtime, a stage refusing the values), and says so in its code.
"""

from __future__ import annotations

import schemathesis

#: error codes of request validation: a schema-valid request must never get one
VALIDATION_CODES = frozenset({"invalid", "invalid_input", "bad_request"})


def _is_oip(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


@schemathesis.check
def error_shape(ctx, response, case) -> None:
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"a {response.status_code} whose body is not JSON: {response.content[:200]!r}") from None
    if _is_oip(case.operation.path):
        assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str) and body["error"], (
            f"an OIP error must be {{\"error\": \"<message>\"}}, got {body!r}"
        )
        return None
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(error, dict), (
        f"an error must be {{\"error\": {{code, message, details}}}}, got {body!r}"
    )
    assert set(error) == {"code", "message", "details"}, f"error keys must be code, message, details: {error!r}"
    assert isinstance(error["code"], str) and error["code"], f"error code must be a non-empty string: {error!r}"
    assert isinstance(error["message"], str) and error["message"], f"error message must be a non-empty string: {error!r}"
    assert isinstance(error["details"], dict), f"error details must be an object: {error!r}"
    assert error["code"] != "internal", f"an internal error (a crash): {error!r}"
    return None


@schemathesis.check
def schema_agrees_with_validator(ctx, response, case) -> None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code not in (400, 422):
        return None
    if _is_oip(case.operation.path):
        return None  # OIP's 400s carry a message only; the infer operations are configured apart
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None  # error_shape reports it
    assert code not in VALIDATION_CODES, (
        f"the schema calls this request valid, the service's own validation refused it ({response.status_code} {code}): "
        f"{response.text[:300]}"
    )
    return None
