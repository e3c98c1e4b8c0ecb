"""Console settings (``SLUICE_MANAGER_UI_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class UiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_MANAGER_UI_", extra="ignore")

    #: the span of the "last minute" figures: requests, p50/p99 and error rates
    window_s: float = Field(60.0, gt=0)
    #: a stats view reuses the last scrape of the gateway's /metrics if it is this recent
    scrape_interval_s: float = Field(1.0, gt=0)
    #: deadline of one scrape of the gateway's /metrics and of one Zipkin query
    fetch_timeout_s: float = Field(3.0, gt=0)
    #: Zipkin as a browser reaches it, for the trace links (default: ``SLUICE_ZIPKIN_URL``,
    #: right for ``sluice up``; set it where the collector's address is an internal one)
    zipkin_ui_url: str = ""
