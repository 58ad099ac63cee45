"""Clusters: every service port, and every DestinationRule subset of it, as an EDS
cluster named the Istio way, ``outbound|<port>|<subset>|<host>``, carrying the
DestinationRule's trafficPolicy (load balancer, connection pool, outlier
detection, TLS). Inbound clusters, ``inbound|<port>||<host>``, lead a sidecar
to its own application.

The traffic policy for a cluster merges, field by field (most specific
first): the subset's port-level settings, the subset's policy, the rule's
port-level settings, the rule's policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from google.protobuf import duration_pb2

from meshlet.control.resources import DestinationRule, parse_duration
from meshlet.control.resources.networking import (
    ClientTLSSettings,
    ConnectionPoolSettings,
    LoadBalancerSettings,
    OutlierDetection,
    TrafficPolicy,
)
from meshlet.control.translate.index import H2_PROTOCOLS, MeshService, ResourceSet, ServicePort, labels_match
from meshlet.control.translate.security import DISABLE, ads_source, mtls_mode, upstream_mesh_tls
from meshlet.control.translate.status import TranslationStatus

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
DEFAULT_CONNECT_TIMEOUT = 10.0
_SIMPLE_LB = {
    "UNSPECIFIED": cluster_pb2.Cluster.ROUND_ROBIN,
    "ROUND_ROBIN": cluster_pb2.Cluster.ROUND_ROBIN,
    "LEAST_REQUEST": cluster_pb2.Cluster.LEAST_REQUEST,
    "LEAST_CONN": cluster_pb2.Cluster.LEAST_REQUEST,
    "RANDOM": cluster_pb2.Cluster.RANDOM,
}


def outbound_name(port: int, subset: str, host: str) -> str:
    return f"outbound|{port}|{subset}|{host}"


def inbound_name(port: int, host: str) -> str:
    return f"inbound|{port}||{host}"


def sni_of(port: int, subset: str, host: str) -> str:
    return f"outbound_.{port}_.{subset}_.{host}"


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """One outbound cluster: a service port, optionally narrowed to a subset."""

    service: MeshService
    port: ServicePort
    subset: str
    subset_labels: dict[str, str]
    policy: EffectivePolicy

    @property
    def name(self) -> str:
        return outbound_name(self.port.number, self.subset, self.service.host)


def _layers(policy: TrafficPolicy | None, port: int) -> list[object]:
    if policy is None:
        return []
    port_level = [p for p in policy.port_level_settings if p.port.number == port]
    return [*port_level, policy]


def effective_policy(rule: DestinationRule | None, subset: str, port: int) -> EffectivePolicy:
    if rule is None:
        return EffectivePolicy()
    layers: list[object] = []
    for s in rule.spec.subsets:
        if s.name == subset:
            layers += _layers(s.traffic_policy, port)
    layers += _layers(rule.spec.traffic_policy, port)

    def first(name: str) -> object:
        return next((getattr(layer, name) for layer in layers if getattr(layer, name) is not None), None)

    return EffectivePolicy(
        load_balancer=first("load_balancer"),  # type: ignore[arg-type]
        connection_pool=first("connection_pool"),  # type: ignore[arg-type]
        outlier_detection=first("outlier_detection"),  # type: ignore[arg-type]
        tls=first("tls"),  # type: ignore[arg-type]
    )


def cluster_targets(rs: ResourceSet) -> list[ClusterTarget]:
    """Every outbound cluster of the mesh, in a stable order."""
    return rs.memo("cluster_targets", lambda: list(_targets(rs)))


def _targets(rs: ResourceSet) -> Iterator[ClusterTarget]:
    for host in sorted(rs.services):
        service = rs.services[host]
        rule = rs.destination_rule(host)
        subsets = [(s.name, dict(s.labels)) for s in rule.spec.subsets] if rule is not None else []
        for port in service.ports:
            for subset, labels in [("", {}), *subsets]:
                policy = effective_policy(rule, subset, port.number)
                yield ClusterTarget(service, port, subset, labels, policy)


def find_target(rs: ResourceSet, host: str, port: int, subset: str) -> ClusterTarget | None:
    index = rs.memo("cluster_index", lambda: {t.name: t for t in cluster_targets(rs)})
    return index.get(outbound_name(port, subset, host))


def outbound_clusters(rs: ResourceSet, mtls: bool, status: TranslationStatus) -> list[cluster_pb2.Cluster]:
    """The outbound clusters for a proxy that can (``mtls``) or cannot present a mesh certificate.

    Built once per resource set for each of the two cases; problems are noted
    in ``status``."""
    built, notes = rs.memo(("outbound_clusters", mtls), lambda: _build_all(rs, mtls))
    for level, resource, message in notes:
        status.add(level, resource, message)
    return built


def _build_all(rs: ResourceSet, mtls: bool) -> tuple[list[cluster_pb2.Cluster], list[tuple[str, str, str]]]:
    scratch = TranslationStatus("")
    clusters = []
    for target in cluster_targets(rs):
        built = build_cluster(rs, target, mtls, scratch)
        if built is not None:
            clusters.append(built)
    return clusters, [(n.level, n.resource, n.message) for n in scratch.notes]


def build_cluster(rs: ResourceSet, target: ClusterTarget, mtls: bool,
                  status: TranslationStatus) -> cluster_pb2.Cluster | None:
    service, policy = target.service, target.policy
    where = service.source
    cluster = cluster_pb2.Cluster(name=target.name)
    if service.dns:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.load_assignment.CopyFrom(_dns_assignment(target))
    else:
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(ads_source())
        cluster.eds_cluster_config.service_name = target.name
    _connect_timeout(cluster, policy.connection_pool)
    _load_balancer(cluster, policy.load_balancer, where, status)
    _connection_pool(cluster, policy.connection_pool, target.port)
    _outlier_detection(cluster, policy.outlier_detection, where, status)
    if not _transport(rs, cluster, target, mtls, status):
        return None
    return cluster


def _dns_assignment(target: ClusterTarget) -> endpoint_pb2.ClusterLoadAssignment:
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=target.name)
    group = assignment.endpoints.add()
    endpoints = target.service.endpoints or ()
    addresses = [(e.address, e.ports.get(target.port.name, target.port.number)) for e in endpoints
                 if labels_match(target.subset_labels, e.labels)]
    for address, port in addresses or [(target.service.host, target.port.target_port or target.port.number)]:
        socket = group.lb_endpoints.add().endpoint.address.socket_address
        socket.address, socket.port_value = address, port
    return assignment


def _connect_timeout(cluster: cluster_pb2.Cluster, pool: ConnectionPoolSettings | None) -> None:
    timeout = DEFAULT_CONNECT_TIMEOUT
    if pool is not None and pool.tcp is not None and pool.tcp.connect_timeout is not None:
        timeout = parse_duration(pool.tcp.connect_timeout)
    cluster.connect_timeout.CopyFrom(duration(timeout))


def _load_balancer(cluster: cluster_pb2.Cluster, lb: LoadBalancerSettings | None, where: str,
                   status: TranslationStatus) -> None:
    cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    if lb is None:
        return
    if lb.simple is not None:
        if lb.simple == "PASSTHROUGH":
            status.error(where, "loadBalancer.simple PASSTHROUGH is not supported; using ROUND_ROBIN")
            return
        cluster.lb_policy = _SIMPLE_LB[lb.simple]
        return
    hashing = lb.consistent_hash
    if hashing is None:
        return
    if hashing.maglev is not None:
        cluster.lb_policy = cluster_pb2.Cluster.MAGLEV
        if hashing.maglev.table_size is not None:
            cluster.maglev_lb_config.table_size.value = hashing.maglev.table_size
        return
    cluster.lb_policy = cluster_pb2.Cluster.RING_HASH
    ring = hashing.ring_hash.minimum_ring_size if hashing.ring_hash is not None else hashing.minimum_ring_size
    if ring is not None:
        cluster.ring_hash_lb_config.minimum_ring_size.value = ring


def _connection_pool(cluster: cluster_pb2.Cluster, pool: ConnectionPoolSettings | None,
                     port: ServicePort) -> None:
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds()
    options = hpo.HttpProtocolOptions()
    wants_options = port.protocol in H2_PROTOCOLS
    if pool is not None and pool.tcp is not None and pool.tcp.max_connections is not None:
        thresholds.max_connections.value = pool.tcp.max_connections
    http = pool.http if pool is not None else None
    if http is not None:
        if http.http1_max_pending_requests is not None:
            thresholds.max_pending_requests.value = http.http1_max_pending_requests
        if http.http2_max_requests is not None:
            thresholds.max_requests.value = http.http2_max_requests
        if http.max_retries is not None:
            thresholds.max_retries.value = http.max_retries
        common = options.common_http_protocol_options
        if http.idle_timeout is not None:
            common.idle_timeout.CopyFrom(duration(parse_duration(http.idle_timeout)))
            wants_options = True
        if http.max_requests_per_connection:
            common.max_requests_per_connection.value = http.max_requests_per_connection
            wants_options = True
        if http.h2_upgrade_policy == "UPGRADE" and port.is_http:
            wants_options = True
    if thresholds.ListFields():
        cluster.circuit_breakers.thresholds.append(thresholds)
    if not wants_options:
        return
    h2 = port.protocol in H2_PROTOCOLS or (http is not None and http.h2_upgrade_policy == "UPGRADE")
    if h2:
        h2_options = protocol_pb2.Http2ProtocolOptions()
        if http is not None and http.max_concurrent_streams is not None:
            h2_options.max_concurrent_streams.value = http.max_concurrent_streams
        options.explicit_http_config.http2_protocol_options.CopyFrom(h2_options)
    else:
        options.explicit_http_config.http_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Pack(options)


def _outlier_detection(cluster: cluster_pb2.Cluster, od: OutlierDetection | None, where: str,
                       status: TranslationStatus) -> None:
    if od is None:
        return
    out = outlier_detection_pb2.OutlierDetection()
    if od.consecutive_5xx_errors is not None:
        out.consecutive_5xx.value = od.consecutive_5xx_errors
        out.enforcing_consecutive_5xx.value = 100 if od.consecutive_5xx_errors > 0 else 0
    else:
        # Istio: unset means "not enforced" rather than Envoy's default of 5.
        out.enforcing_consecutive_5xx.value = 0
    if od.consecutive_gateway_errors is not None:
        out.consecutive_gateway_failure.value = od.consecutive_gateway_errors
        out.enforcing_consecutive_gateway_failure.value = 100 if od.consecutive_gateway_errors > 0 else 0
    if od.interval is not None:
        out.interval.CopyFrom(duration(parse_duration(od.interval)))
    if od.base_ejection_time is not None:
        out.base_ejection_time.CopyFrom(duration(parse_duration(od.base_ejection_time)))
    if od.max_ejection_percent is not None:
        out.max_ejection_percent.value = od.max_ejection_percent
    if od.min_health_percent is not None:
        cluster.common_lb_config.healthy_panic_threshold.value = float(od.min_health_percent)
    for field_name in ("consecutive_local_origin_failures", "split_external_local_origin_errors"):
        if getattr(od, field_name) is not None:
            status.error(where, f"outlierDetection.{field_name} is not supported; left out")
    cluster.outlier_detection.CopyFrom(out)


def _transport(rs: ResourceSet, cluster: cluster_pb2.Cluster, target: ClusterTarget, mtls: bool,
               status: TranslationStatus) -> bool:
    """Set the cluster's TLS; False when the cluster cannot be built for this proxy."""
    tls = target.policy.tls
    if tls is not None and tls.mode == "DISABLE":
        return True
    explicit = tls is not None and tls.mode == "ISTIO_MUTUAL"
    if not explicit and not _auto_mtls(rs, target):
        return True
    if not mtls:
        if explicit:
            status.error(target.service.source, f"cluster {target.name}: ISTIO_MUTUAL needs a mesh "
                         "certificate and this proxy has none; the cluster is left out")
            return False
        return True
    sni = sni_of(target.port.number, target.subset, target.service.host)
    if tls is not None and tls.sni:
        sni = tls.sni
    cluster.transport_socket.CopyFrom(upstream_mesh_tls(sni))
    return True


def _auto_mtls(rs: ResourceSet, target: ClusterTarget) -> bool:
    """Istio's auto mTLS: mesh workloads get mTLS unless every one of them disabled it."""
    service = target.service
    if service.external or service.selector is None:
        return False
    selector = {**service.selector, **target.subset_labels}
    workloads = rs.workloads_selected(service.namespace, selector)
    if not workloads:
        return True
    port = target.port
    return any(mtls_mode(rs, w, w.namespace, w.spec.ports.get(port.name, port.target_port or port.number))
               != DISABLE for w in workloads)


def inbound_cluster(name: str, address: str, port: int, http2: bool) -> cluster_pb2.Cluster:
    """A sidecar's way to its own application: STATIC, plaintext on loopback."""
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC,
                                  lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)
    cluster.connect_timeout.CopyFrom(duration(DEFAULT_CONNECT_TIMEOUT))
    cluster.load_assignment.cluster_name = name
    socket = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    socket.address, socket.port_value = address, port
    if http2:
        options = hpo.HttpProtocolOptions()
        options.explicit_http_config.http2_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Pack(options)
    return cluster
