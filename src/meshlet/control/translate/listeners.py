"""Listener building blocks shared by sidecars and gateways: the HTTP connection
manager (RDS or an inline route), the TCP proxy, and the filter chains for
each mTLS mode."""

from __future__ import annotations

from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import Message

from meshlet.control.translate.routes import FAULT_FILTER
from meshlet.control.translate.security import DISABLE, PERMISSIVE, ads_source, downstream_mesh_tls

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
ROUTER = "envoy.filters.http.router"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"


def listener(name: str, address: str, port: int) -> listener_pb2.Listener:
    out = listener_pb2.Listener(name=name)
    socket = out.address.socket_address
    socket.address, socket.port_value = address, port
    return out


def _http_filters(manager: hcm.HttpConnectionManager, with_fault: bool) -> None:
    if with_fault:
        # Off until a route's typed_per_filter_config sets a fault, as Istio does.
        fault = manager.http_filters.add(name=FAULT_FILTER)
        fault.typed_config.Pack(fault_pb2.HTTPFault())
    router = manager.http_filters.add(name=ROUTER)
    router.typed_config.Pack(router_pb2.Router())


def rds_manager(stat_prefix: str, route_name: str) -> lc.Filter:
    manager = hcm.HttpConnectionManager(stat_prefix=stat_prefix, codec_type=hcm.HttpConnectionManager.AUTO)
    manager.rds.route_config_name = route_name
    manager.rds.config_source.CopyFrom(ads_source())
    _http_filters(manager, with_fault=True)
    return _network_filter(HCM, manager)


def inline_manager(stat_prefix: str, route_config: route_pb2.RouteConfiguration) -> lc.Filter:
    manager = hcm.HttpConnectionManager(stat_prefix=stat_prefix, codec_type=hcm.HttpConnectionManager.AUTO)
    manager.route_config.CopyFrom(route_config)
    _http_filters(manager, with_fault=False)
    return _network_filter(HCM, manager)


def tcp_proxy(stat_prefix: str, cluster: str) -> lc.Filter:
    return _network_filter(TCP_PROXY, tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster))


def _network_filter(name: str, config: Message) -> lc.Filter:
    out = lc.Filter(name=name)
    out.typed_config.Pack(config)
    return out


def add_tls_inspector(out: listener_pb2.Listener) -> None:
    inspector = out.listener_filters.add(name=TLS_INSPECTOR)
    inspector.typed_config.Pack(tls_inspector_pb2.TlsInspector())


def add_mesh_chains(out: listener_pb2.Listener, network_filter: lc.Filter, mode: str, mtls: bool) -> None:
    """Filter chains for an inbound port in ``mode`` (STRICT / PERMISSIVE / DISABLE).

    PERMISSIVE tells mTLS from plaintext by the first bytes (tls_inspector +
    ``transport_protocol``); without a mesh certificate only plaintext is served."""
    if mode == DISABLE or not mtls:
        out.filter_chains.add(name="plaintext").filters.append(network_filter)
        return
    secure = out.filter_chains.add(name="mtls")
    secure.filters.append(network_filter)
    secure.transport_socket.CopyFrom(downstream_mesh_tls())
    if mode == PERMISSIVE:
        add_tls_inspector(out)
        secure.filter_chain_match.transport_protocol = "tls"
        plain = out.filter_chains.add(name="plaintext")
        plain.filter_chain_match.transport_protocol = "raw_buffer"
        plain.filters.append(network_filter)

