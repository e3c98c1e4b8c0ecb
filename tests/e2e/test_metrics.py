"""Prometheus metrics of every service and sidecar, and ``sluice status`` reading them."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from sluice.cli import app as cli

pytestmark = pytest.mark.e2e
RECORD = [{"sepal_length": 5.0, "sepal_width": 3.4, "petal_length": 1.5, "petal_width": 0.2}]


def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url, timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_services_and_sidecars_serve_prometheus_metrics(mesh, gateway, iris):
    for _ in range(10):
        assert gateway.post("/serve/iris", json=RECORD).status_code == 200
    assert gateway.post("/serve/iris", json=[{"sepal_length": 1}]).status_code == 422

    g = samples(f"{mesh.gateway_url}/metrics")
    assert g[("sluice_gateway_requests_total", (("pipeline", "iris"), ("status", "200")))] >= 10
    assert g[("sluice_gateway_requests_total", (("pipeline", "iris"), ("status", "422")))] >= 1
    assert g[("sluice_gateway_request_seconds_count", (("pipeline", "iris"),))] >= 10
    for stage, model in ((0, "iris_scaler"), (1, "iris_classifier")):
        key = ("sluice_gateway_stage_seconds_count", (("model", model), ("pipeline", "iris"), ("stage", str(stage))))
        assert g[key] >= 10

    r = samples(f"http://127.0.0.1:{mesh.runtime('scikit').metrics_port}/metrics")
    assert r[("sluice_runtime_inferences_total", (("model", "iris_scaler"), ("status", "OK")))] >= 10
    assert r[("sluice_runtime_inference_seconds_count", (("model", "iris_classifier"),))] >= 10

    m = samples(f"{mesh.manager_url}/metrics")
    assert m[("sluice_xds_connected_envoys", (("role", "gateway"),))] == 1
    assert m[("sluice_xds_connected_envoys", (("role", "runtime"),))] == 1
    assert m[("sluice_xds_pushes_total", ())] > 0
    assert m[("sluice_xds_nacks_total", ())] == 0
    assert m[("sluice_gateways_connected", ())] == 1
    assert m[("sluice_runtime_endpoints", (("runtime", "scikit"),))] == 1

    for node in ("manager", "repository", "runtime-scikit", "gateway"):
        text = httpx.get(f"{mesh.admin_url(node)}/stats/prometheus", timeout=5).text
        assert "envoy_http_downstream_rq_total" in text, node
    egress = httpx.get(f"{mesh.admin_url('gateway')}/stats/prometheus", timeout=5).text
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="runtime_scikit"}' in egress


def test_sluice_status_prints_pipelines_runtimes_and_latency(mesh, gateway, iris):
    assert gateway.post("/serve/iris", json=RECORD).status_code == 200
    result = CliRunner().invoke(cli, ["status", "--manager", mesh.manager_url, "--gateway", mesh.gateway_url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "iris" in result.output and "scikit/iris_scaler -> scikit/iris_classifier" in result.output
    assert "1 healthy" in result.output
    row = next(line for line in result.output.splitlines() if "iris_classifier" in line and "->" in line)
    p50, p99 = (float(x) for x in row.split("│")[4:6])
    assert 0 < p50 <= p99
