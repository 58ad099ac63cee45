"""A sidecar's listeners and routes.

Outbound (explicit ports): one listener per service port number, bound on the
proxy's outbound address (annotation ``meshlet.dev/outbound-address`` on its
Workload, else 127.0.0.1). The application calls
``http://<outbound address>:<service port>/`` with ``Host: <service>`` (any of
the service's names, with or without the port); the listener's route
configuration, named by the port, holds a virtual host per service on that
port. Several sidecars on one machine each take their own loopback address
(127.0.0.0/8), so their outbound ports do not collide. A TCP service port has
its own listener with a tcp_proxy (one TCP service per port number).

Inbound: for each port of each service that selects the proxy's workload, a
listener on the workload's address and port (``spec.ports[<port name>]``)
terminating mesh mTLS per PeerAuthentication and forwarding to the
application on 127.0.0.1 at its app port: ``meshlet.dev/app-ports``
(``"http=9081,grpc=9091"``) when the workload sets it, else the service
port's targetPort or number when that differs from the inbound port.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from meshlet.control.resources import Workload
from meshlet.control.translate.clusters import duration, inbound_cluster, inbound_name, outbound_name
from meshlet.control.translate.index import H2_PROTOCOLS, MESH_GATEWAY, MeshService, ResourceSet, ServicePort
from meshlet.control.translate.listeners import (
    add_mesh_chains,
    inline_manager,
    listener,
    rds_manager,
    tcp_proxy,
)
from meshlet.control.translate.node import ProxyNode
from meshlet.control.translate.routes import (
    RouteContext,
    mesh_virtual_service,
    outbound_route_config,
    route_labels,
)
from meshlet.control.translate.security import STRICT, mtls_mode
from meshlet.control.translate.status import TranslationStatus

T = TypeVar("T")

APP_PORTS = "meshlet.dev/app-ports"
OUTBOUND_ADDRESS = "meshlet.dev/outbound-address"
APP_ADDRESS = "127.0.0.1"
DEFAULT_OUTBOUND_ADDRESS = "127.0.0.1"


@dataclass
class SidecarConfig:
    """``listeners`` and ``clusters`` are the sidecar's own (inbound); ``outbound_listeners``
    and ``routes`` are built once for every sidecar with the same ``outbound_key``."""

    listeners: list[listener_pb2.Listener]
    routes: list[route_pb2.RouteConfiguration]
    clusters: list[cluster_pb2.Cluster]
    outbound_listeners: list[listener_pb2.Listener] = field(default_factory=list)
    outbound_key: Hashable = None
    # Sidecars with equal keys have equal outbound routes (whatever their outbound address).
    routes_key: Hashable = None
    inbound: Inbound | None = None


def shared(rs: ResourceSet, key: object, build: Callable[[TranslationStatus], T],
           status: TranslationStatus) -> T:
    """``build`` once per resource set for every proxy that asks with ``key``,
    replaying the notes it made into each proxy's status."""
    def run() -> tuple[T, list[tuple[str, str, str]]]:
        scratch = TranslationStatus("")
        value = build(scratch)
        return value, [(n.level, n.resource, n.message) for n in scratch.notes]

    value, notes = rs.memo(key, run)
    for level, resource, message in notes:
        status.add(level, resource, message)
    return value


@dataclass(frozen=True, slots=True)
class Inbound:
    """A sidecar's inbound listeners and clusters, the ports they take, the notes made
    building them, and what they were built from (``inputs``): a later translation
    with equal inputs uses them again instead of building them anew."""

    inputs: tuple[object, ...]
    listeners: list[listener_pb2.Listener]
    clusters: list[cluster_pb2.Cluster]
    ports: frozenset[int]
    notes: tuple[tuple[str, str, str], ...]


def inbound_inputs(rs: ResourceSet, workload: Workload | None, mtls: bool) -> tuple[object, ...]:
    """Everything a sidecar's inbound config is made of (compared with ``==``, which
    tuples shortcut by identity: unchanged store objects compare at once)."""
    if workload is None:
        return (mtls, None)
    return (mtls, workload, tuple(rs.services_selecting(workload)), tuple(rs.peer_authentications))


def inbound_config(rs: ResourceSet, workload: Workload | None, mtls: bool,
                   earlier: Inbound | None = None) -> Inbound:
    """The inbound part of a sidecar's config, or ``earlier`` when built from equal inputs."""
    inputs = inbound_inputs(rs, workload, mtls)
    if earlier is not None and earlier.inputs == inputs:
        return earlier
    scratch = TranslationStatus("")
    config = SidecarConfig([], [], [])
    ports = _inbound(rs, workload, mtls, config, scratch)
    notes = tuple((n.level, n.resource, n.message) for n in scratch.notes)
    return Inbound(inputs, config.listeners, config.clusters, frozenset(ports), notes)


def sidecar_config(rs: ResourceSet, node: ProxyNode, workload: Workload | None, mtls: bool,
                   status: TranslationStatus, earlier: Inbound | None = None) -> SidecarConfig:
    inbound = inbound_config(rs, workload, mtls, earlier)
    for level, resource, message in inbound.notes:
        status.add(level, resource, message)
    config = SidecarConfig(list(inbound.listeners), [], list(inbound.clusters), inbound=inbound)
    inbound_ports = inbound.ports
    outbound_address = DEFAULT_OUTBOUND_ADDRESS
    labels: dict[str, str] = {}
    if workload is not None:
        outbound_address = workload.metadata.annotations.get(OUTBOUND_ADDRESS, DEFAULT_OUTBOUND_ADDRESS)
        labels = dict(workload.spec.labels)
    # An outbound port that is also an inbound one on the same address is left out.
    taken = frozenset(inbound_ports) if workload is not None and workload.spec.address == outbound_address \
        else frozenset()
    ctx_key: tuple[str, tuple[tuple[str, str], ...]] | None = None
    if rs.memo("source_matches", lambda: uses_source_matches(rs)):
        ctx_key = (node.namespace, route_labels(labels))
    config.outbound_key = ("outbound", outbound_address, taken, ctx_key)
    config.routes_key = ("outbound_routes", taken, ctx_key)
    outbound = shared(rs, config.outbound_key,
                      lambda notes: _outbound(rs, outbound_address, ctx_key, taken, notes), status)
    config.outbound_listeners, config.routes = outbound
    return config


# -- outbound ------------------------------------------------------------------------ #


def _outbound_ports(rs: ResourceSet) -> dict[int, tuple[bool, list[MeshService]]]:
    """Port number -> (serves HTTP, the services on it)."""
    ports: dict[int, tuple[bool, list[MeshService]]] = {}
    for host in sorted(rs.services):
        service = rs.services[host]
        for port in service.ports:
            http, services = ports.get(port.number, (port.is_http, []))
            services.append(service)
            ports[port.number] = (http or port.is_http, services)
    return ports


def _outbound(rs: ResourceSet, address: str, ctx_key: tuple[str, tuple[tuple[str, str], ...]] | None,
              taken: frozenset[int], status: TranslationStatus,
              ) -> tuple[list[listener_pb2.Listener], list[route_pb2.RouteConfiguration]]:
    """Outbound listeners on ``address`` and their routes; ``ctx_key`` is the client's
    (namespace, labels) when some route matches on them, else None (routes alike for all)."""
    listeners: list[listener_pb2.Listener] = []
    routes: list[route_pb2.RouteConfiguration] = []
    for number, (http, services) in sorted(rs.memo("outbound_ports", lambda: _outbound_ports(rs)).items()):
        if number in taken:
            status.error("", f"outbound port {address}:{number} is the workload's inbound port; "
                         f"outbound traffic to port {number} is not captured")
            continue
        name = f"outbound_{address}_{number}"
        if http:
            out = listener(name, address, number)
            out.filter_chains.add().filters.append(rds_manager(f"outbound_{number}", str(number)))
            listeners.append(out)
            ctx = RouteContext(number, MESH_GATEWAY, "", ()) if ctx_key is None else \
                RouteContext(number, MESH_GATEWAY, ctx_key[0], ctx_key[1])
            routes.append(shared(rs, ("outbound_routes", ctx), _route_builder(rs, ctx), status))
            continue
        cluster = _tcp_destination(rs, services, number, status)
        if cluster is not None:
            out = listener(name, address, number)
            out.filter_chains.add().filters.append(tcp_proxy(f"outbound_{number}", cluster))
            listeners.append(out)
    return listeners, routes


def uses_source_matches(rs: ResourceSet) -> bool:
    """Whether any mesh route matches on the client (sourceLabels, sourceNamespace)."""
    return any(m.source_labels or m.source_namespace is not None
               for vs in rs.virtual_services for http in vs.spec.http for m in http.match)


def _route_builder(rs: ResourceSet,
                   ctx: RouteContext) -> Callable[[TranslationStatus], route_pb2.RouteConfiguration]:
    return lambda status: outbound_route_config(rs, ctx, status)


def _tcp_destination(rs: ResourceSet, services: list[MeshService], port: int,
                     status: TranslationStatus) -> str | None:
    service = services[0]
    for other in services[1:]:
        status.warning(other.source, f"TCP port {port} already goes to {service.host}; explicit outbound "
                       f"ports carry one TCP service per port number")
    vs = mesh_virtual_service(rs, service.host, status)
    if vs is None or not vs.spec.tcp:
        return outbound_name(port, "", service.host)
    for i, route in enumerate(vs.spec.tcp):
        if any(m.port not in (None, port) for m in route.match):
            continue
        if len(route.route) != 1:
            status.error(f"{vs.resource_id} tcp[{i}]", "weighted TCP routes are not supported yet; "
                         f"port {port} goes to the service's default cluster")
            return outbound_name(port, "", service.host)
        dest = route.route[0].destination
        host = rs.resolve_host(dest.host, vs.namespace)
        return outbound_name(dest.port.number if dest.port else port, dest.subset or "", host)
    return outbound_name(port, "", service.host)


# -- inbound -------------------------------------------------------------------------- #


def app_ports(workload: Workload) -> dict[str, int]:
    """The ``meshlet.dev/app-ports`` annotation: port name -> the application's port."""
    text = workload.metadata.annotations.get(APP_PORTS, "")
    ports: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, number = item.replace(":", "=").partition("=")
        if sep and number.strip().isdigit():
            ports[name.strip()] = int(number)
    return ports


def _app_port(workload: Workload, port: ServicePort, listen_port: int) -> int | None:
    annotated = app_ports(workload).get(port.name)
    if annotated is not None:
        return annotated
    for candidate in (port.target_port, port.number):
        if candidate is not None and candidate != listen_port:
            return candidate
    if workload.spec.address != APP_ADDRESS:
        return listen_port
    return None


def _inbound(rs: ResourceSet, workload: Workload | None, mtls: bool, config: SidecarConfig,
             status: TranslationStatus) -> set[int]:
    if workload is None:
        status.info("", "no registered workload for this proxy: no inbound listeners")
        return set()
    where = workload.resource_id
    bound: set[int] = set()
    for service in rs.services_selecting(workload):
        for port in service.ports:
            listen_port = workload.spec.ports.get(port.name, port.target_port or port.number)
            if listen_port in bound:
                continue
            app_port = _app_port(workload, port, listen_port)
            if app_port is None:
                status.error(where, f"no app port for {service.host} port {port.name}: the inbound port "
                             f"{listen_port} is the app's own; set the {APP_PORTS} annotation")
                continue
            mode = mtls_mode(rs, workload, workload.namespace, listen_port)
            if mode == STRICT and not mtls:
                status.error(where, f"PeerAuthentication STRICT on port {listen_port} needs a mesh "
                             "certificate and this proxy has none: the inbound port is not served")
                continue
            bound.add(listen_port)
            _inbound_port(workload, service, port, listen_port, app_port, mode, mtls, config)
    return bound


def _inbound_port(workload: Workload, service: MeshService, port: ServicePort, listen_port: int,
                  app_port: int, mode: str, mtls: bool, config: SidecarConfig) -> None:
    cluster_name = inbound_name(listen_port, service.host)
    http2 = port.protocol in H2_PROTOCOLS
    config.clusters.append(inbound_cluster(cluster_name, APP_ADDRESS, app_port, http2))
    out = listener(f"inbound_{workload.spec.address}_{listen_port}", workload.spec.address, listen_port)
    stat_prefix = f"inbound_{listen_port}"
    if port.is_http:
        routes = route_pb2.RouteConfiguration(name=cluster_name)
        route = routes.virtual_hosts.add(name="inbound", domains=["*"]).routes.add(name="default")
        route.match.prefix = "/"
        route.route.cluster = cluster_name
        route.route.timeout.CopyFrom(duration(0))
        network_filter = inline_manager(stat_prefix, routes)
    else:
        network_filter = tcp_proxy(stat_prefix, cluster_name)
    add_mesh_chains(out, network_filter, mode, mtls)
    config.listeners.append(out)
