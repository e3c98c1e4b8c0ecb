"""Settings every service shares, read from ``SLUICE_*`` environment variables.

Each service subclasses ``ServiceSettings`` in its own ``settings.py`` with its own
prefix (``SLUICE_MANAGER_``, ``SLUICE_GATEWAY_`` ...); the shared fields below use the
plain ``SLUICE_`` prefix so one variable configures every process.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Read by every service: logging, tracing, discovery."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore")

    log_level: str = "INFO"
    #: Zipkin collector base URL (e.g. http://127.0.0.1:9411); empty: tracing off
    zipkin_url: str = ""
    #: fraction of requests traced when tracing is on
    trace_sample_rate: float = Field(1.0, ge=0.0, le=1.0)
    #: Consul agent address (host:port); empty: the manager's embedded registry
    consul_addr: str = ""
    #: Consul ACL token (``X-Consul-Token``) for every call to the agent: the manager
    #: needs read access to services and nodes, a runtime write access to its service
    consul_token: str = ""


def common() -> CommonSettings:
    return CommonSettings()
