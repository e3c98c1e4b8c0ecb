"""Repository settings (``SLUICE_REPOSITORY_*``)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class RepositorySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_REPOSITORY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 18087
    #: model directories, separated by ':' (Sluice layout and/or Triton layout)
    roots: str = "models/store:models/triton"
