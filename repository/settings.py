"""Repository settings (``SLUICE_REPOSITORY_*``).

The upload limits are explicit so that an operator sizes them to the models they
serve: ``max_upload_bytes`` bounds the request body (counted while it streams in),
``max_upload_files`` and ``max_unpacked_bytes`` bound what an archive may unpack to
(a tar bomb is refused, not extracted).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RepositorySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_REPOSITORY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 18087
    #: model directories, separated by ':' (Sluice layout and/or Triton layout)
    roots: str = "models/store:models/triton"
    #: where a NEW model is uploaded to (a new version goes beside the model's others); "" = the first of ``roots``
    upload_root: str = ""
    #: roots (of ``roots``, ':'-separated) whose models are never changed through the API:
    #: no new version, no delete (409 ``read_only``); e.g. the example models beside a
    #: local mesh's upload root, which live in the source tree
    read_only_roots: str = ""
    #: the largest upload request body, in bytes (413 ``too_large`` beyond)
    max_upload_bytes: int = Field(1 << 30, gt=0)
    #: the most files (and directories) one upload may hold
    max_upload_files: int = Field(10_000, gt=0)
    #: the most bytes one upload may unpack to (a gzip bomb's guard)
    max_unpacked_bytes: int = Field(4 << 30, gt=0)
