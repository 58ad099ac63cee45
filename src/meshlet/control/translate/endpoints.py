"""ClusterLoadAssignments: the endpoints of each EDS cluster, from the registry's
workloads (and WorkloadEntries, and ServiceEntry endpoints), narrowed to the
cluster's subset labels, with the health the workloads' proxies reported.

A workload serves a service port on ``spec.ports[<port name>]`` when it names
that port, else on the port's ``targetPort``, else on its number.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from meshlet.control.translate.clusters import ClusterTarget, cluster_targets
from meshlet.control.translate.index import ResourceSet, ServicePort, labels_match

_HEALTH = {
    "UNKNOWN": health_check_pb2.UNKNOWN,
    "HEALTHY": health_check_pb2.HEALTHY,
    "UNHEALTHY": health_check_pb2.UNHEALTHY,
    "DRAINING": health_check_pb2.DRAINING,
}

# (address, port, health, weight, locality)
_Endpoint = tuple[str, int, str, int, str | None]


def load_assignments(rs: ResourceSet) -> list[endpoint_pb2.ClusterLoadAssignment]:
    """One assignment per EDS cluster of the mesh (shared by every proxy)."""
    return rs.memo("load_assignments", lambda: [
        assignment(t.name, sorted(_endpoints(rs, t))) for t in cluster_targets(rs) if not t.service.dns
    ])


def _port_of(ports: Mapping[str, int], port: ServicePort) -> int:
    return ports.get(port.name, port.target_port or port.number)


def _endpoints(rs: ResourceSet, target: ClusterTarget) -> Iterator[_Endpoint]:
    service, port = target.service, target.port
    if service.selector is None:
        for e in service.endpoints:
            if e.address and labels_match(target.subset_labels, e.labels):
                yield (e.address, _port_of(e.ports, port), "UNKNOWN", e.weight, e.locality)
        return
    selector = {**service.selector, **target.subset_labels}
    for w in rs.workloads_selected(service.namespace, selector):
        yield (w.spec.address, _port_of(w.spec.ports, port), w.status.health, w.spec.weight or 1,
               w.spec.locality)
    for entry in rs.workload_entries:
        spec = entry.spec
        if entry.namespace == service.namespace and spec.address and labels_match(selector, spec.labels):
            yield (spec.address, _port_of(spec.ports, port), "UNKNOWN", spec.weight or 1, spec.locality)


def assignment(name: str, endpoints: list[_Endpoint]) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints grouped by locality (``region/zone/subzone``)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    groups: dict[str | None, endpoint_pb2.LocalityLbEndpoints] = {}
    for address, port, health, weight, locality in endpoints:
        group = groups.get(locality)
        if group is None:
            group = groups[locality] = cla.endpoints.add()
            if locality:
                region, _, rest = locality.partition("/")
                zone, _, sub_zone = rest.partition("/")
                group.locality.region, group.locality.zone, group.locality.sub_zone = region, zone, sub_zone
        lb = group.lb_endpoints.add()
        lb.endpoint.address.socket_address.address = address
        lb.endpoint.address.socket_address.port_value = port
        lb.health_status = _HEALTH[health]
        if weight != 1:
            lb.load_balancing_weight.value = weight
    return cla
