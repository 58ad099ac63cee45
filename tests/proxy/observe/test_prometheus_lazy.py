"""The Prometheus rendering without prometheus_client imported at proxy start."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshlet.proxy.observe import prometheus
from meshlet.proxy.observe.stats import StatsStore


def test_content_type_is_prometheus_clients() -> None:
    assert prometheus.CONTENT_TYPE == CONTENT_TYPE_LATEST


def test_proxy_start_does_not_import_prometheus_client() -> None:
    code = "import sys, meshlet.proxy.server; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_render_imports_it_on_first_use() -> None:
    store = StatsStore()
    store.scope("cluster.", "envoy_cluster_name", "backend").counter("upstream_rq_total").inc()
    text = prometheus.render(store).decode()
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="backend"} 1.0' in text
