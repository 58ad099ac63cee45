"""The examples under examples/ start and serve (so they cannot rot).

The bootstraps' fixed ports are swapped for free ones (as ``meshlet demo``
does) and the sample upstream app takes the place of each cluster's endpoint;
the sample gRPC app runs behind the proxy.
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
import pytest
import yaml
from interop_helpers import StartMeshlet, bootstrap, cluster, hcm, listener, ports, require, route, run

from meshlet.bench.apps import example_path, start_upstream
from meshlet.bench.procs import Child, free_port

pytestmark = pytest.mark.interop


def endpoint_ports(config: dict[str, Any]) -> list[int]:
    found = []
    for defined in config["static_resources"]["clusters"]:
        for locality in defined["load_assignment"]["endpoints"]:
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


def test_grpc_echo_example_behind_the_proxy(start_meshlet: StartMeshlet) -> None:
    app = Child("grpc echo", [sys.executable, str(example_path("apps/grpc_echo.py")), "--port", "0"],
                capture_stdout=True).start()
    try:
        app_port = int(app.read_stdout_line(r"listening on grpc://\S+:(\d+)", 20).group(1))
        port, admin = ports(2)
        start_meshlet(bootstrap([listener("grpc", port, [hcm([route("/")])])],
                                [cluster("app", app_port, http2=True)], admin))
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
            service = "/meshlet.example.Echo"
            assert channel.unary_unary(f"{service}/Unary")(b"hi", timeout=10) == b"echo:hi"
            assert list(channel.unary_stream(f"{service}/Count")(b"3", timeout=10)) == [b"0", b"1", b"2"]
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(f"{service}/Fail")(b"unavailable", timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert raised.value.details() == "failed as asked: UNAVAILABLE"  # type: ignore[attr-defined]
    finally:
        assert app.stop() == 0  # SIGTERM: a clean exit
