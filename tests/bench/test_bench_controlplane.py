"""``meshlet bench controlplane --quick --json``: the promised JSON shape, every simulated
proxy on a real ADS stream counted in each push, and measurements from the control
plane's own /proc entries."""

from __future__ import annotations

import json
import subprocess
import sys

from meshlet.bench.controlplane import (
    ControlPlaneBenchOptions,
    _shares,
    change_yaml,
    proxy_node_id,
    services_yaml,
    workloads_yaml,
)
from meshlet.control.resources import load_documents
from meshlet.control.translate import ProxyNode

BENCH = (sys.executable, "-m", "meshlet.cli.main", "bench", "controlplane")


def test_quick_run_prints_one_json_row() -> None:
    done = subprocess.run([*BENCH, "--quick", "--json"], capture_output=True, text=True, timeout=90,
                          check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    [row] = result["rows"]
    assert "error" not in row
    assert (row["services"], row["proxies"], row["protocol"]) == (20, 40, "sotw")
    assert 0 < row["push_p50_ms"] <= row["push_p99_ms"] <= row["push_max_ms"]
    assert row["rss_mb"] >= row["rss_now_mb"] > 10
    assert row["cpu_s"] > 0 and row["initial_sync_s"] > 0
    assert "every proxy has it after" in done.stderr


def test_quick_run_with_delta_streams() -> None:
    done = subprocess.run([*BENCH, "--quick", "--json", "--delta", "--proxies", "10", "--changes", "1"],
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)["rows"]
    assert row["protocol"] == "delta" and row["proxies"] == 10 and row["push_p99_ms"] > 0


def test_generated_config_is_valid_and_names_each_proxy() -> None:
    opts = ControlPlaneBenchOptions(services=3, proxies=5)
    documents = services_yaml(opts.services) + workloads_yaml(opts.proxies, opts.services) + [change_yaml(0)]
    resources = [r for doc in documents for r in load_documents(doc, "bench")]
    workloads = [r for r in resources if r.kind == "Workload"]
    assert [w.spec.proxy_id for w in workloads] == [proxy_node_id(i) for i in range(5)]  # type: ignore[attr-defined]
    node = ProxyNode.parse(proxy_node_id(300))
    assert (node.name, node.address, node.kind) == ("w-300", "10.0.1.44", "sidecar")


def test_proxies_are_shared_out_among_workers() -> None:
    assert _shares(2000, 2) == [(0, 1000), (1000, 1000)]
    assert _shares(5, 3) == [(0, 2), (2, 2), (4, 1)]
    assert _shares(1, 4) == [(0, 1)]
