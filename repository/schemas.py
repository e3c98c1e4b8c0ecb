"""The repository's response shapes, for its OpenAPI document (and the SDK written against it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorBody(BaseModel):
    """Every error the repository answers: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorDetail


class FileOut(BaseModel):
    path: str
    size: int
    sha256: str


class TensorSpecOut(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class VersionOut(BaseModel):
    version: str
    framework: str
    inputs: list[TensorSpecOut]
    outputs: list[TensorSpecOut]
    files: list[FileOut]


class ModelOut(BaseModel):
    """A model in full: every version's framework, signature and files."""

    name: str
    layout: str
    framework: str
    latest: str
    versions: list[VersionOut]


class UploadedOut(BaseModel):
    """A new model version, as the repository numbered it."""

    name: str
    version: str
    layout: str
    framework: str
    files: list[FileOut]


def errors(**described: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with its description and the error body's schema."""
    return {int(status.removeprefix("e")): {"model": ErrorBody, "description": text} for status, text in described.items()}
