"""Envoy v3 bootstrap configs that benchmarks and the demo generate."""

from __future__ import annotations

from typing import Any

import yaml

from meshlet.bench.procs import LOOPBACK

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def socket_address(port: int, host: str = LOOPBACK) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def static_cluster(name: str, port: int, host: str = LOOPBACK, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(port, host)}}]}],
        },
        **extra,
    }


def single_route_proxy(listen_port: int, upstream_port: int, admin_port: int) -> dict[str, Any]:
    """Everything on ``listen_port`` goes to one upstream: the benchmark's path."""
    return {
        "admin": {"address": socket_address(admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": socket_address(listen_port),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": HCM_TYPE,
                        "stat_prefix": "bench",
                        "codec_type": "HTTP1",
                        "route_config": {
                            "name": "bench",
                            "virtual_hosts": [{
                                "name": "all",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                            }],
                        },
                        "http_filters": [{"name": "envoy.filters.http.router",
                                          "typed_config": {"@type": ROUTER_TYPE}}],
                    },
                }]}],
            }],
            "clusters": [static_cluster("upstream", upstream_port)],
        },
    }


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
