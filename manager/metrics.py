"""The manager's Prometheus metrics, read from the control plane at scrape time:
xDS pushes and NACKs, connected Envoys and gateways, pipelines and runtimes."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from manager.control import ControlPlane


class ControlPlaneCollector(Collector):
    def __init__(self, control: ControlPlane):
        self.control = control

    def collect(self):
        xds = self.control.xds
        yield CounterMetricFamily("sluice_xds_pushes", "xDS responses sent to Envoys", value=xds.pushes)
        yield CounterMetricFamily("sluice_xds_nacks", "xDS responses Envoys rejected", value=xds.nacks)
        connected = GaugeMetricFamily("sluice_xds_connected_envoys", "Envoy nodes with an open ADS stream", labels=["role"])
        by_role: dict[str, int] = {}
        for status in xds.nodes().values():
            if status.streams:
                by_role[status.info.role] = by_role.get(status.info.role, 0) + 1
        for role, count in sorted(by_role.items()):
            connected.add_metric([role], count)
        yield connected
        yield GaugeMetricFamily("sluice_gateways_connected", "Gateways watching pipelines", value=self.control.feed.gateways)
        yield GaugeMetricFamily("sluice_pipelines", "Pipelines defined", value=len(self.control.served))
        endpoints = GaugeMetricFamily("sluice_runtime_endpoints", "Healthy endpoints per runtime", labels=["runtime"])
        live = self.control.registry.endpoints()
        for runtime in sorted(self.control.runtimes):
            endpoints.add_metric([runtime], len(live.get(runtime, [])))
        yield endpoints


def register(control: ControlPlane) -> None:
    REGISTRY.register(ControlPlaneCollector(control))
