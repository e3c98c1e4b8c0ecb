"""The runtime process's one local SparkSession, and the one thread that runs Spark jobs.

The session starts on first need (``acquire``), with ``local[1]``, a small driver and
the UI off, and stops when its last user calls ``release``. If the process already
has a SparkContext (a test suite's, a notebook's), that session is shared and left
running. Every Spark job goes through ``jobs``, a single worker thread: with one
local core there is nothing to gain from running two at once.
"""

from __future__ import annotations

import atexit
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from runtimes.spark.settings import SparkSettings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_lock = threading.Lock()
_session: SparkSession | None = None
_owned = False
_users = 0
jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spark-job")


def acquire() -> SparkSession:
    """The shared session, started if need be; pair every call with ``release``."""
    global _session, _owned, _users
    with _lock:
        if _session is None:
            from pyspark import SparkContext
            from pyspark.sql import SparkSession

            _owned = SparkContext._active_spark_context is None
            settings = SparkSettings()
            _session = (
                SparkSession.builder.master("local[1]")
                .appName("sluice-spark-runtime")
                .config("spark.ui.enabled", "false")
                .config("spark.ui.showConsoleProgress", "false")
                .config("spark.driver.memory", settings.driver_memory)
                .config("spark.sql.shuffle.partitions", "1")
                .getOrCreate()
            )
            if _owned:
                _session.sparkContext.setLogLevel("ERROR")
                log.info("started a local SparkSession (local[1], driver memory %s)", settings.driver_memory)
        _users += 1
        return _session


def release() -> None:
    """One user fewer; the last one stops the session if this module started it."""
    global _session, _users
    with _lock:
        _users = max(0, _users - 1)
        if _users == 0 and _session is not None:
            if _owned:
                _session.stop()
                log.info("stopped the local SparkSession")
            _session = None


@atexit.register
def _stop_at_exit() -> None:
    global _users
    with _lock:
        _users = 1
    release()
