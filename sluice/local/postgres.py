"""A throwaway PostgreSQL server for tests and benchmarks: ``initdb`` in a temporary
directory, ``postgres`` on a free loopback port, stopped by its PID.

PostgreSQL refuses to run as root: when this process is root the data directory is
handed to the unprivileged ``nobody`` user and the server binaries run as that user
(``runuser -u nobody``; ``setpriv``-free, util-linux's runuser is on every Debian).
Trust authentication on 127.0.0.1 only; fsync stays on (the store's durability is what
the tests check). Binaries are found on PATH (``initdb``, ``postgres``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sluice.local.procs import StartError, free_port

#: the OS user the server runs as when we are root
SERVER_USER = "nobody"
DB_USER = "sluice"


def available() -> bool:
    """True when PostgreSQL's server binaries are on PATH."""
    return shutil.which("initdb") is not None and shutil.which("postgres") is not None


@dataclass
class PostgresServer:
    """One server; ``url(db)`` is what ``SLUICE_MANAGER_DB_URL`` takes."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sluice-pg-")))
    port: int = 0
    proc: subprocess.Popen | None = None

    def _as_server_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", SERVER_USER, "--", *argv] if os.geteuid() == 0 else argv

    def start(self, timeout_s: float = 30.0) -> "PostgresServer":
        data = self.root / "data"
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam(SERVER_USER)
            data.mkdir()
            os.chown(data, nobody.pw_uid, nobody.pw_gid)
        init = subprocess.run(
            self._as_server_user(["initdb", "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8", "--no-instructions"]),
            capture_output=True, text=True, timeout=120, cwd="/",
        )
        if init.returncode != 0:
            raise StartError(f"initdb failed: {init.stderr[-2000:]}")
        self.port = free_port()
        log = open(self.root / "postgres.log", "ab")
        if os.geteuid() == 0:
            os.chown(self.root / "postgres.log", pwd.getpwnam(SERVER_USER).pw_uid, -1)
        self.proc = subprocess.Popen(
            self._as_server_user([
                "postgres", "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1", "-k", str(data),
                "-c", "max_connections=200", "-c", "shared_buffers=32MB",
            ]),
            stdout=log, stderr=subprocess.STDOUT, cwd="/", start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"postgres exited: {(self.root / 'postgres.log').read_text()[-2000:]}")
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise StartError(f"postgres not ready within {timeout_s}s")

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """SIGTERM the server's process group (postgres and its children), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        try:
            return self.start()
        except BaseException:
            self.stop()  # a half-started server too, and its directory
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
