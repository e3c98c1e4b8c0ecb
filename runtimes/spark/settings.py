"""Settings of the Spark runtime kind, from ``SLUICE_SPARK_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SparkSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_SPARK_", extra="ignore")

    #: driver memory of the runtime's one local SparkSession (JVM path only)
    driver_memory: str = "512m"
    #: most rows the JVM path puts in one micro-batch (one Spark job)
    max_batch_rows: int = Field(1024, ge=1)
    #: how long the JVM path waits after a request for others to join its batch
    max_batch_delay_ms: float = Field(2.0, ge=0.0)
