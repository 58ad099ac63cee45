"""The example bootstraps under examples/ start and serve (so they cannot rot).

Their fixed ports are swapped for free ones (as ``meshlet demo`` does) and the
sample upstream app takes the place of each cluster's endpoint.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from interop_helpers import StartMeshlet, require, run

from meshlet.bench.apps import example_path, start_upstream
from meshlet.bench.procs import free_port

pytestmark = pytest.mark.interop


def endpoint_ports(config: dict[str, Any]) -> list[int]:
    found = []
    for cluster in config["static_resources"]["clusters"]:
        for locality in cluster["load_assignment"]["endpoints"]:
            for lb_endpoint in locality["lb_endpoints"]:
                found.append(lb_endpoint["endpoint"]["address"]["socket_address"]["port_value"])
    return found


def all_fresh_ports(node: Any, mapping: dict[int, int]) -> None:
    """Every port_value gets a free port, the same one wherever it repeats."""
    if isinstance(node, dict):
        if isinstance(node.get("port_value"), int):
            node["port_value"] = mapping.setdefault(node["port_value"], free_port())
        for value in node.values():
            all_fresh_ports(value, mapping)
    elif isinstance(node, list):
        for item in node:
            all_fresh_ports(item, mapping)


@pytest.mark.parametrize(("example", "path", "expected"), [
    ("proxy/front-proxy.yaml", "/", "200"),
    ("demo/proxy.yaml", "/app/", "200"),
    ("demo/proxy.yaml", "/hello", "200"),
    ("demo/proxy.yaml", "/nowhere", "404"),
])
def test_example_serves(start_meshlet: StartMeshlet, example: str, path: str, expected: str) -> None:
    require("curl")
    config = yaml.safe_load(example_path(example).read_text())
    all_fresh_ports(config, {})
    upstreams = [start_upstream(port)[0] for port in endpoint_ports(config)]
    try:
        start_meshlet(config)
        listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        done = run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                    f"http://127.0.0.1:{listener}{path}"])
        assert done.stdout == expected, done.stderr
    finally:
        for child in upstreams:
            child.stop()
