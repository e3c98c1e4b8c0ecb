"""One logging format for every Sluice process: time, service, level, logger, message."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(service: str, level: str | None = None) -> None:
    level = (level or os.environ.get("SLUICE_LOG_LEVEL", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's per-request access log costs more than a fast request itself
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
