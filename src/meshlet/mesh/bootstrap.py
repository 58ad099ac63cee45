"""The Envoy v3 bootstrap of a mesh proxy: its node id, an admin port, and ADS
from the control plane for everything else (listeners, routes, clusters,
endpoints and its SVID over SDS)."""

from __future__ import annotations

from typing import Any

HTTP_OPTIONS_URL = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
XDS_CLUSTER = "xds_cluster"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def ads_bootstrap(node_id: str, node_cluster: str, xds_address: str, admin_port: int) -> dict[str, Any]:
    host, _, port = xds_address.rpartition(":")
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": XDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(host, int(port))}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS_URL, "explicit_http_config": {"http2_protocol_options": {}}}},
        }]},
    }
