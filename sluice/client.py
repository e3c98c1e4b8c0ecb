"""The Python SDK: from a fitted model to a prediction through the mesh.

    from sluice.client import Client
    c = Client("http://127.0.0.1:8080")
    ref = c.upload(estimator, "churn", runtime="scikit")      # upload, load on the runtime
    c.create_pipeline("churn", [ref])
    c.predict("churn", [{"tenure": 3, "charges": 70.5}])      # -> [{"label": ..., ...}]

Every call goes to the manager, except ``predict``, which goes to the gateway (its URL
comes from the manager's ``/api/v1/info`` unless given). Any error answer raises
``SluiceError`` carrying the server's JSON error: ``status``, ``code``, ``message``,
``details``.

Tokens (a mesh in secure mode): ``Client(url, token)`` sends ``Authorization: Bearer
<token>`` to the manager and the gateway. With no token given, the client uses
``SLUICE_TOKEN``, else the admin token ``sluice up --secure`` wrote to
``$SLUICE_HOME/admin.token`` (default ``.sluice/admin.token``), and that file only
for a manager on a loopback address, so a local admin token never leaves the machine.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from sluice.packaging import TensorDicts, package

#: chunk size of streamed uploads (and of progress updates)
UPLOAD_CHUNK = 1 << 20


class SluiceError(Exception):
    """An error answer from a Sluice service, in the project's JSON error shape."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


@dataclass(frozen=True)
class ModelRef:
    """An uploaded model version, loaded on ``runtime``; ``str(ref)`` is its pipeline chain entry."""

    name: str
    version: str
    runtime: str
    token: str | None = None

    def __str__(self) -> str:
        return f"{self.runtime}/{self.name}:{self.version}"


#: a runtime kind's name in the default mesh, by packaged model kind
DEFAULT_RUNTIME = {"sklearn": "scikit", "spark": "serving-localml-spark", "onnx": "triton"}


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8080", token: str | None = None, gateway_url: str | None = None, timeout: float = 60.0):
        """``token``: the bearer token (None: ``default_token(url)``; "" for none at all)."""
        if token is None:
            token = default_token(url)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.token = token
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self._gateway_url = gateway_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- models
    def upload(
        self,
        model: Any,
        name: str,
        runtime: str | None = None,
        *,
        inputs: TensorDicts | None = None,
        outputs: TensorDicts | None = None,
        load: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> ModelRef:
        """Package ``model`` (a fitted scikit-learn estimator or Pipeline, a Spark
        PipelineModel or its saved directory, an ONNX model or file, or a path to a
        joblib file), upload it as a new version of ``name``, and load that version on
        ``runtime`` (unless ``load=False``; default: the default mesh's runtime for the
        kind, ``scikit`` for scikit-learn). ``progress(sent, total)`` sees the upload."""
        with package(model, name, inputs, outputs) as pkg, tempfile.TemporaryDirectory(prefix="sluice-upload-") as tmp:
            runtime = runtime or DEFAULT_RUNTIME.get(pkg.kind)
            if load and not runtime:
                raise ValueError("name the runtime to load this model on: runtime=...")
            archive = pkg.archive(Path(tmp) / "model.tar.gz")
            uploaded = self.upload_archive(name, archive, progress)
        version = uploaded["version"]
        if load:
            self.load(runtime, name, version)
        return ModelRef(name=name, version=version, runtime=runtime or "")

    def upload_archive(self, name: str, archive: Path, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Upload a ready tar.gz of a version's files; answers the new version."""
        total = archive.stat().st_size
        return self._call(
            "POST", f"/api/v1/models/{name}",
            content=_chunks(archive, total, progress),
            headers={"content-type": "application/gzip", "content-length": str(total)},
            timeout=None,
        )

    def load(self, runtime: str, model: str, version: str | None = None) -> dict[str, Any]:
        """Load a model version on every instance of ``runtime`` (no version: every version
        the model's version policy loads; with no policy, the latest)."""
        body = {"model": model, **({"version": version} if version else {})}
        return self._call("POST", f"/api/v1/runtimes/{runtime}/models", json=body, timeout=None)

    def unload(self, runtime: str, model: str, version: str | None = None) -> None:
        self._call("DELETE", f"/api/v1/runtimes/{runtime}/models/{model}", params=_version(version))

    def models(self) -> list[dict[str, Any]]:
        """Every model in the repository: versions, signatures, digests, serving runtimes."""
        return self._call("GET", "/api/v1/models")

    def model(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/models/{name}")

    def set_version_policy(self, name: str, *, default: str | None = None, load: dict[str, Any] | None = None) -> dict[str, Any]:
        """Set which version of ``name`` answers requests that name none (``default``) and
        which versions a runtime loads when asked for the model without a version (``load``:
        ``{"latest": {"num_versions": N}}``, ``{"all": {}}`` or ``{"specific": {"versions": [...]}}``;
        default: the latest one). Runtimes apply it at their next load of the model."""
        body = {k: v for k, v in (("load", load), ("default", default)) if v is not None}
        return self._call("PUT", f"/api/v1/models/{name}/version-policy", json=body)

    def delete_model(self, name: str, version: str | None = None) -> None:
        self._call("DELETE", f"/api/v1/models/{name}", params=_version(version))

    # --- pipelines
    def create_pipeline(self, name: str | dict[str, Any], chain: Sequence[str | ModelRef] | None = None) -> dict[str, Any]:
        """``create_pipeline("p", ["scikit/iris_scaler", ref])`` or ``create_pipeline({...definition...})``."""
        return self._call("POST", "/api/v1/pipelines", json=_definition(name, chain))

    def replace_pipeline(self, name: str | dict[str, Any], chain: Sequence[str | ModelRef] | None = None) -> dict[str, Any]:
        definition = _definition(name, chain)
        return self._call("PUT", f"/api/v1/pipelines/{definition['name']}", json=definition)

    def apply(self, definitions: Sequence[dict[str, Any]], prune: bool = False, dry_run: bool = False) -> dict[str, Any]:
        """Create or replace every definition in one change (``prune``: delete the pipelines
        not listed); answers once live with what was created, replaced, unchanged and deleted.
        One bad definition refuses all of it (``SluiceError`` 422 listing every problem)."""
        return self._call(
            "POST", "/api/v1/pipelines:apply", json={"pipelines": list(definitions), "prune": prune},
            params={"dry_run": "true"} if dry_run else None, timeout=None,
        )

    def pipelines(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/pipelines")

    def pipeline(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/pipelines/{name}")

    def delete_pipeline(self, name: str) -> None:
        self._call("DELETE", f"/api/v1/pipelines/{name}")

    # --- runtimes
    def runtimes(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/runtimes")

    # --- tokens (secure mode; an admin token)
    def create_token(self, scopes: Sequence[str], ttl_s: float | None = None) -> dict[str, Any]:
        """A new token: ``{"token", "id", "scopes", "expires_at"}`` (the only time it is shown)."""
        body: dict[str, Any] = {"scopes": list(scopes)}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return self._call("POST", "/api/v1/tokens", json=body)

    def tokens(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/tokens")

    def revoke_token(self, token_id: str) -> None:
        """Revoke a token; refused mesh-wide once this returns."""
        self._call("DELETE", f"/api/v1/tokens/{token_id}")

    # --- serving
    @property
    def gateway_url(self) -> str:
        if self._gateway_url is None:
            self._gateway_url = self._call("GET", "/api/v1/info")["gateway_url"]
        return self._gateway_url

    def predict(self, pipeline: str, records: Any) -> Any:
        """Serve ``records`` (a list of dicts, one dict, or a pandas DataFrame) through
        ``pipeline``; a DataFrame in gives a DataFrame out (same index)."""
        frame = records if _is_dataframe(records) else None
        if frame is not None:
            records = frame.to_dict(orient="records")
        body = orjson.dumps(records, option=orjson.OPT_SERIALIZE_NUMPY)
        answer = self._call(
            "POST", f"{self.gateway_url}/serve/{pipeline}", content=body, headers={"content-type": "application/json"}
        )
        if frame is not None:
            import pandas as pd

            return pd.DataFrame(answer, index=frame.index)
        return answer

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self._http.request(method, url, **kwargs)
        if response.is_success:
            return response.json() if response.content else None
        raise error_from(response)


def error_from(response: httpx.Response) -> SluiceError:
    """The ``SluiceError`` an error answer carries (or one describing a non-JSON answer)."""
    try:
        error = response.json()["error"]
        return SluiceError(response.status_code, error["code"], error["message"], error.get("details"))
    except (ValueError, KeyError, TypeError):
        return SluiceError(response.status_code, f"http_{response.status_code}", response.text[:500] or response.reason_phrase)


def _definition(name: str | dict[str, Any], chain: Sequence[str | ModelRef] | None) -> dict[str, Any]:
    if isinstance(name, dict):
        return name
    if not chain:
        raise ValueError("give a chain of '<runtime>/<model>[:<version>]' entries (or ModelRefs), or a whole definition")
    return {"name": name, "chain": [str(entry) for entry in chain]}


def _version(version: str | None) -> dict[str, str] | None:
    return {"version": version} if version else None


def _is_dataframe(value: Any) -> bool:
    return type(value).__module__.startswith("pandas") and hasattr(value, "to_dict")


def _chunks(path: Path, total: int, progress: Callable[[int, int], None] | None) -> Iterator[bytes]:
    sent = 0
    with open(path, "rb") as f:
        while chunk := f.read(UPLOAD_CHUNK):
            sent += len(chunk)
            if progress:
                progress(sent, total)
            yield chunk


#: the admin token's file name under ``$SLUICE_HOME`` (written by ``sluice up --secure``, mode 0600)
ADMIN_TOKEN_FILE = "admin.token"


def sluice_home() -> Path:
    """``$SLUICE_HOME``, default ``.sluice`` in the source tree: the local mesh's state."""
    return Path(os.environ.get("SLUICE_HOME") or Path(__file__).resolve().parents[1] / ".sluice")


def admin_token_path() -> Path:
    return sluice_home() / ADMIN_TOKEN_FILE


def _loopback(url: str) -> bool:
    import ipaddress

    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_token(url: str | None = None) -> str | None:
    """The token to use when none is given: ``SLUICE_TOKEN``, else the admin token in
    ``$SLUICE_HOME/admin.token`` when ``url`` (the manager) is on a loopback address."""
    token = os.environ.get("SLUICE_TOKEN")
    if token:
        return token.strip()
    if url is not None and not _loopback(url):
        return None
    try:
        return admin_token_path().read_text().strip() or None
    except OSError:
        return None
