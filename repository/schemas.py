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


class VersionPolicyOut(BaseModel):
    """A model's version policy file (``versions.json``), normalised: ``load`` is one of
    ``{"latest": {"num_versions": N}}``, ``{"all": {}}``, ``{"specific": {"versions": [...]}}``."""

    load: dict[str, Any]
    default: str | None = None


class PolicyOut(BaseModel):
    """A model's version policy as it applies now (after a change to it)."""

    default_version: str | None
    load_versions: list[str]
    version_policy: VersionPolicyOut | None
    policy_error: str | None = None


class ModelOut(BaseModel):
    """A model in full: every version's framework, signature and files, and its version policy."""

    name: str
    layout: str
    framework: str
    #: the highest version
    latest: str
    #: the version an unpinned request gets (the policy's default, else the latest); null: the policy is refused
    default_version: str | None
    #: the versions a runtime loads when asked for the model without a version
    load_versions: list[str]
    #: the model's policy file; null: none (the latest version is loaded and answers)
    version_policy: VersionPolicyOut | None
    #: why the policy file is refused, when it is
    policy_error: str | None = None
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
