"""Settings of the Triton CPU fallback, read from the environment.

``SLUICE_TRITON_DYNAMIC_BATCHING`` (default on; ``0``/``false``/``off`` runs every
request on its own whatever config.pbtxt says), ``SLUICE_TRITON_MAX_QUEUE_DELAY_US``
(overrides every model's ``dynamic_batching.max_queue_delay_microseconds``) and
``SLUICE_TRITON_INTRA_OP_THREADS`` (onnxruntime threads per model; 0 lets
onnxruntime choose).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class FallbackSettings:
    dynamic_batching: bool = True
    max_queue_delay_us: int | None = None
    intra_op_threads: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "FallbackSettings":
        delay = environ.get("SLUICE_TRITON_MAX_QUEUE_DELAY_US", "").strip()
        try:
            return cls(
                dynamic_batching=environ.get("SLUICE_TRITON_DYNAMIC_BATCHING", "1").strip().lower() not in _FALSE,
                max_queue_delay_us=int(delay) if delay else None,
                intra_op_threads=int(environ.get("SLUICE_TRITON_INTRA_OP_THREADS", "0")),
            )
        except ValueError as exc:
            raise ValueError(f"bad SLUICE_TRITON_* setting: {exc}") from None
