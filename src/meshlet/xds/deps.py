"""What an xDS resource refers to by name and must wait for: RDS, EDS and SDS names.

A listener names route configurations (an HCM's ``rds``) and secrets (SDS in
its TLS contexts); a cluster names its EDS assignment and secrets. The proxy's
ADS client subscribes to these names and keeps a resource "warming" (not yet
applied) until everything it names has arrived, as Envoy does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf.message import DecodeError


@dataclass(frozen=True, slots=True)
class Refs:
    """Names a resource refers to, by the type that delivers them."""

    routes: frozenset[str] = field(default_factory=frozenset)
    endpoints: frozenset[str] = field(default_factory=frozenset)
    secrets: frozenset[str] = field(default_factory=frozenset)


def listener_refs(listener: Any) -> Refs:
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    routes: set[str] = set()
    secrets: set[str] = set()
    for chain in chains:
        for network_filter in chain.filters:
            manager = _unpack(network_filter.typed_config, hcm.HttpConnectionManager)
            if manager is not None and manager.HasField("rds"):
                routes.add(manager.rds.route_config_name)
        if chain.HasField("transport_socket"):
            downstream = _unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
            if downstream is not None:
                secrets.update(_sds_names(downstream.common_tls_context))
    if listener.HasField("api_listener"):  # gRPC's proxyless clients
        manager = _unpack(listener.api_listener.api_listener, hcm.HttpConnectionManager)
        if manager is not None and manager.HasField("rds"):
            routes.add(manager.rds.route_config_name)
    return Refs(routes=frozenset(routes), secrets=frozenset(secrets))


def cluster_refs(cluster: Any) -> Refs:
    endpoints: frozenset[str] = frozenset()
    if cluster.type == cluster_pb2.Cluster.EDS:
        endpoints = frozenset({cluster.eds_cluster_config.service_name or cluster.name})
    secrets: frozenset[str] = frozenset()
    if cluster.HasField("transport_socket"):
        upstream = _unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
        if upstream is not None:
            secrets = frozenset(_sds_names(upstream.common_tls_context))
    return Refs(endpoints=endpoints, secrets=secrets)


def _sds_names(common: Any) -> Iterator[str]:
    """Secrets named through SDS (an ``sds_config``); others are static."""
    for sds in common.tls_certificate_sds_secret_configs:
        if sds.HasField("sds_config"):
            yield sds.name
    if common.HasField("validation_context_sds_secret_config"):
        sds = common.validation_context_sds_secret_config
        if sds.HasField("sds_config"):
            yield sds.name


def _unpack(any_msg: Any, message_class: Any) -> Any:
    if not any_msg.type_url or not any_msg.Is(message_class.DESCRIPTOR):
        return None
    message = message_class()
    try:
        return message if any_msg.Unpack(message) else None
    except DecodeError:
        return None  # left to the compiler, which names the field
