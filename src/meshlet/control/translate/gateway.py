"""The ingress gateway's listeners and routes, from Gateway resources that select
it and the VirtualServices bound to them (``gateways: [name]``).

A gateway proxy's labels are those of its registered Workload (``proxyId`` =
its node id), else ``{"istio": <name from the node id>}`` so that the usual
``selector: {istio: ingressgateway}`` finds ``router~...~ingressgateway.<ns>~...``.

Per port: one listener on the proxy's address (or the server's ``bind``) and
one route configuration ``http.<port>`` with a virtual host per host the
bound VirtualServices route. TLS servers (SIMPLE or MUTUAL with
``credentialName``) get a filter chain each, matched by SNI on their hosts.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2

from meshlet.control.resources import Gateway
from meshlet.control.resources.networking import Server
from meshlet.control.translate.index import ResourceSet, labels_match
from meshlet.control.translate.listeners import add_tls_inspector, listener, rds_manager
from meshlet.control.translate.node import ProxyNode
from meshlet.control.translate.routes import (
    RouteContext,
    bound_to,
    host_matches,
    route_labels,
    virtual_service_routes,
)
from meshlet.control.translate.security import MeshIdentity, gateway_tls
from meshlet.control.translate.status import TranslationStatus


@dataclass(frozen=True, slots=True)
class BoundServer:
    gateway: Gateway
    server: Server

    @property
    def ref(self) -> str:
        return f"{self.gateway.namespace}/{self.gateway.name}"

    @property
    def tls(self) -> bool:
        tls = self.server.tls
        return tls is not None and tls.mode is not None and not tls.https_redirect

    def hosts(self) -> list[str]:
        return [h.rpartition("/")[2] for h in self.server.hosts]


@dataclass
class GatewayConfig:
    listeners: list[listener_pb2.Listener]
    routes: list[route_pb2.RouteConfiguration]
    credentials: list[str]


def gateway_config(rs: ResourceSet, node: ProxyNode, labels: dict[str, str], identity: MeshIdentity | None,
                   status: TranslationStatus) -> GatewayConfig:
    config = GatewayConfig([], [], [])
    by_port: dict[tuple[str, int], list[BoundServer]] = {}
    for gateway in rs.gateways:
        if not labels_match(gateway.spec.selector, labels):
            continue
        for server in gateway.spec.servers:
            address = server.bind or node.address
            by_port.setdefault((address, server.port.number), []).append(BoundServer(gateway, server))
    if not by_port:
        status.info("", f"no Gateway selects this gateway's labels {labels}")
    for (address, port), servers in sorted(by_port.items()):
        _port(rs, node, address, port, servers, identity, config, status)
    return config


def _port(rs: ResourceSet, node: ProxyNode, address: str, port: int, servers: list[BoundServer],
          identity: MeshIdentity | None, config: GatewayConfig, status: TranslationStatus) -> None:
    usable = [s for s in servers if _usable(s, identity, status)]
    plain = [s for s in usable if not s.tls]
    secure = [s for s in usable if s.tls]
    if plain and secure:
        for s in secure:
            status.error(s.gateway.resource_id, f"port {port} mixes plaintext and TLS servers; the TLS "
                         "server is left out")
        secure = []
    chosen = plain or secure
    if not chosen:
        return
    route_name = f"http.{port}"
    config.routes.append(_route_config(rs, node, route_name, port, chosen, status))
    out = listener(f"gateway_{address}_{port}", address, port)
    if plain:
        out.filter_chains.add().filters.append(rds_manager(f"gateway_{port}", route_name))
    else:
        add_tls_inspector(out)
        for s in secure:
            tls = s.server.tls
            if tls is None or tls.credential_name is None:
                continue  # _usable let only servers with a credential through
            chain = out.filter_chains.add(name=f"{s.ref}/{s.server.name or port}")
            names = [h for h in s.hosts() if h != "*"]
            chain.filter_chain_match.server_names.extend(names)
            chain.filters.append(rds_manager(f"gateway_{port}", route_name))
            chain.transport_socket.CopyFrom(gateway_tls(tls.credential_name, tls.mode == "MUTUAL"))
            config.credentials.append(tls.credential_name)
    config.listeners.append(out)


def _usable(bound: BoundServer, identity: MeshIdentity | None, status: TranslationStatus) -> bool:
    server, where = bound.server, bound.gateway.resource_id
    if server.port.protocol not in ("HTTP", "HTTPS", "HTTP2", "GRPC"):
        status.error(where, f"server port {server.port.number} protocol {server.port.protocol} is not "
                     "supported on gateways yet (HTTP and HTTPS are)")
        return False
    tls = server.tls
    if tls is None or tls.https_redirect or tls.mode is None:
        if server.port.protocol == "HTTPS":
            status.error(where, f"HTTPS server on port {server.port.number} has no tls settings")
            return False
        return True
    if tls.mode not in ("SIMPLE", "MUTUAL"):
        status.error(where, f"tls mode {tls.mode} is not supported on gateways yet (SIMPLE and MUTUAL are)")
        return False
    if tls.server_certificate or tls.private_key or tls.ca_certificates:
        status.error(where, "certificate files are not supported; use credentialName")
        return False
    if not tls.credential_name:
        status.error(where, f"tls mode {tls.mode} needs credentialName")
        return False
    if identity is None or identity.credential(tls.credential_name) is None:
        status.error(where, f"credential {tls.credential_name!r} is not known; the server is left out")
        return False
    if tls.mode == "MUTUAL" and identity.credential_ca(tls.credential_name) is None:
        status.error(where, f"credential {tls.credential_name!r} has no client CA for MUTUAL")
        return False
    return True


def _route_config(rs: ResourceSet, node: ProxyNode, name: str, port: int, servers: list[BoundServer],
                  status: TranslationStatus) -> route_pb2.RouteConfiguration:
    config = route_pb2.RouteConfiguration(name=name)
    used: set[str] = set()
    for bound in servers:
        ctx = RouteContext(port, bound.ref, node.namespace, route_labels({}))
        redirect = bound.server.tls is not None and bool(bound.server.tls.https_redirect)
        for pattern in bound.hosts():
            for vs in rs.virtual_services:
                if not bound_to(vs, bound.ref):
                    continue
                for host in vs.spec.hosts:
                    if not (host_matches(pattern, host) or host_matches(host, pattern)) or host in used:
                        continue
                    used.add(host)
                    domains = ["*"] if host == "*" else [host, f"{host}:{port}"]
                    vhost = config.virtual_hosts.add(name=f"{host}:{port}", domains=domains)
                    if redirect:
                        vhost.require_tls = rc.VirtualHost.ALL
                    vhost.routes.extend(virtual_service_routes(rs, vs, ctx, status))
    return config
