"""The real Zipkin server (``io.zipkin:zipkin-server`` exec jar from Maven Central),
run with ``java -jar`` and in-memory storage, for ``sluice up`` and the tests.

``./build.sh`` fetches the jar with Maven into ``.sluice/zipkin/``; ``jar_path`` finds it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSION = "3.5.1"
DEFAULT_JAR = ROOT / ".sluice" / "zipkin" / "zipkin-server-exec.jar"


def jar_path() -> Path | None:
    path = Path(os.environ.get("SLUICE_ZIPKIN_JAR", DEFAULT_JAR))
    return path if path.is_file() else None


def java() -> str | None:
    return shutil.which("java")


def command(jar: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a Zipkin server on ``port`` with in-memory storage."""
    argv = [java() or "java", "-Xms64m", "-Xmx384m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-jar", str(jar)]
    env = {"QUERY_PORT": str(port), "STORAGE_TYPE": "mem", "MEM_MAX_SPANS": "200000", "JAVA_OPTS": ""}
    return argv, env
