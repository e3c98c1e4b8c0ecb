"""Request field types that say in the OpenAPI exactly what the strict request models
accept (schemathesis checks that the schema and the validation agree)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field


def _integral(value):
    """JSON Schema's integers include 2.0: take it as 2 (a strict model refuses floats)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**constraints):
    """An integer as JSON states it (2 or 2.0, not "2" or 2.5; request models are strict),
    with ``Field`` constraints (placed so that they reach the JSON Schema)."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]
