"""The config a translation reads, indexed once per store revision: ``ResourceSet``.

Every proxy's snapshot is built from the same ``ResourceSet``, so lookups
(services by host, DestinationRules, VirtualServices, workloads by labels) are
indexed here once, and ``memo`` keeps what all proxies share (clusters,
endpoints, outbound routes) so a change costs one build of them, not one per
proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshlet.control.resources import (
    CLUSTER_DOMAIN,
    AuthorizationPolicy,
    DestinationRule,
    Gateway,
    PeerAuthentication,
    RequestAuthentication,
    Resource,
    Service,
    ServiceEntry,
    VirtualService,
    Workload,
    WorkloadEntry,
)

T = TypeVar("T")

# Where mesh-wide policies live (PeerAuthentication without a selector here
# applies to every namespace), as in Istio.
ROOT_NAMESPACES = frozenset({"istio-system", "meshlet-system"})
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})
H2_PROTOCOLS = frozenset({"HTTP2", "GRPC"})
MESH_GATEWAY = "mesh"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    number: int
    protocol: str
    target_port: int | None = None

    @property
    def is_http(self) -> bool:
        return self.protocol in HTTP_PROTOCOLS


@dataclass(frozen=True, slots=True)
class StaticEndpoint:
    """A ServiceEntry endpoint: an address and its ports by name."""

    address: str
    ports: Mapping[str, int]
    labels: Mapping[str, str]
    weight: int = 1
    locality: str | None = None


@dataclass(frozen=True, slots=True)
class MeshService:
    """A host the mesh routes to: from a meshlet ``Service`` or a ``ServiceEntry``."""

    host: str
    namespace: str
    ports: tuple[ServicePort, ...]
    source: str
    # Workloads whose labels include these back the service (None: static endpoints).
    selector: Mapping[str, str] | None = None
    endpoints: tuple[StaticEndpoint, ...] = ()
    aliases: tuple[str, ...] = ()
    external: bool = False
    dns: bool = False

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.number == number), None)

    def domains(self, port: int) -> list[str]:
        """Virtual host domains: every name of the service, bare and with ``:port``."""
        names = [self.host, *self.aliases]
        return [d for name in names for d in (name, f"{name}:{port}")]


def service_of(resource: Service) -> MeshService:
    short = resource.name
    ns = resource.namespace
    aliases = (short, f"{short}.{ns}", f"{short}.{ns}.svc", *resource.spec.hosts)
    ports = tuple(ServicePort(p.name, p.number, p.protocol, p.target_port) for p in resource.spec.ports)
    return MeshService(host=resource.host, namespace=ns, ports=ports, source=resource.resource_id,
                       selector=resource.selector_labels(), aliases=tuple(dict.fromkeys(aliases)))


def services_of_entry(entry: ServiceEntry) -> list[MeshService]:
    spec = entry.spec
    ports = tuple(ServicePort(p.name, p.number, p.protocol, p.target_port) for p in spec.ports)
    selector = dict(spec.workload_selector.match_labels) if spec.workload_selector is not None else None
    endpoints = tuple(
        StaticEndpoint(e.address or "", dict(e.ports), dict(e.labels), e.weight or 1, e.locality)
        for e in spec.endpoints
    )
    return [
        MeshService(host=host, namespace=entry.namespace, ports=ports, source=entry.resource_id,
                    selector=selector, endpoints=endpoints, external=spec.location == "MESH_EXTERNAL",
                    dns=spec.resolution in ("DNS", "DNS_ROUND_ROBIN"))
        for host in spec.hosts
    ]


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _age(resource: Resource) -> tuple[str, str, str]:
    created = resource.metadata.creation_timestamp
    return (created.isoformat() if created is not None else "", resource.namespace, resource.name)


@dataclass
class ResourceSet:
    """All config and registrations at one store revision, indexed."""

    services: dict[str, MeshService] = field(default_factory=dict)
    destination_rules: list[DestinationRule] = field(default_factory=list)
    virtual_services: list[VirtualService] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    peer_authentications: list[PeerAuthentication] = field(default_factory=list)
    authorization_policies: list[AuthorizationPolicy] = field(default_factory=list)
    request_authentications: list[RequestAuthentication] = field(default_factory=list)
    workloads: list[Workload] = field(default_factory=list)
    workload_entries: list[WorkloadEntry] = field(default_factory=list)
    # Problems found while indexing (duplicate hosts), reported to every proxy.
    problems: list[str] = field(default_factory=list)
    revision: int = 0
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)
    # The shared snapshot parts an earlier set built, by key (see ``inherit_parts``).
    _earlier_parts: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, resources: Iterable[Resource], revision: int = 0) -> ResourceSet:
        rs = cls(revision=revision)
        # One resource per key, the last given winning, as in a store.
        unique = {r.key: r for r in resources}
        ordered = sorted(unique.values(), key=_age)
        for resource in ordered:
            rs._add(resource)
        return rs

    def _add(self, resource: Resource) -> None:
        if isinstance(resource, Service):
            self._add_service(service_of(resource))
        elif isinstance(resource, ServiceEntry):
            for service in services_of_entry(resource):
                self._add_service(service)
        elif isinstance(resource, DestinationRule):
            self.destination_rules.append(resource)
        elif isinstance(resource, VirtualService):
            self.virtual_services.append(resource)
        elif isinstance(resource, Gateway):
            self.gateways.append(resource)
        elif isinstance(resource, PeerAuthentication):
            self.peer_authentications.append(resource)
        elif isinstance(resource, AuthorizationPolicy):
            self.authorization_policies.append(resource)
        elif isinstance(resource, RequestAuthentication):
            self.request_authentications.append(resource)
        elif isinstance(resource, Workload):
            self.workloads.append(resource)
        elif isinstance(resource, WorkloadEntry):
            self.workload_entries.append(resource)

    def _add_service(self, service: MeshService) -> None:
        existing = self.services.get(service.host)
        if existing is not None:
            # The oldest definition wins, as Istio resolves conflicting hosts.
            self.problems.append(f"{service.source}: host {service.host} is already defined by "
                                 f"{existing.source}; ignored")
            return
        self.services[service.host] = service

    # -- lookups ---------------------------------------------------------------- #

    def memo(self, key: Any, build: Callable[[], T]) -> T:
        """``build()`` once per resource set (shared parts of every proxy's snapshot)."""
        try:
            return self._memo[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self._memo[key] = build()
            return value

    def inherit_parts(self, earlier: ResourceSet) -> None:
        """Let ``previous_parts`` offer the shared parts ``earlier`` built (only those: the
        earlier set itself is not kept), so tables that did not change are used again."""
        self._earlier_parts = {key[1]: value for key, value in earlier._memo.items()
                               if isinstance(key, tuple) and len(key) == 2 and key[0] == "parts"}

    def previous_parts(self, key: Any) -> Any:
        """What the set given to ``inherit_parts`` built under ``("parts", key)``, if anything."""
        return self._earlier_parts.get(key)

    def resolve_host(self, host: str, namespace: str) -> str:
        """The full host a (possibly short) name in ``namespace`` means."""
        if host in self.services or host == "*" or host.startswith("*."):
            return host
        if "." not in host:
            return f"{host}.{namespace}.{CLUSTER_DOMAIN}"
        # "name.namespace" and "name.namespace.svc" are short for the cluster-local host.
        for candidate in (f"{host}.{CLUSTER_DOMAIN}", f"{host}.{CLUSTER_DOMAIN.partition('.')[2]}"):
            if candidate in self.services:
                return candidate
        return host

    def service(self, host: str) -> MeshService | None:
        return self.services.get(host)

    def destination_rule(self, host: str) -> DestinationRule | None:
        """The DestinationRule for ``host``: an exact host first (the one in the service's
        namespace preferred), then the longest matching wildcard."""
        return self.memo(("dr", host), lambda: self._find_destination_rule(host))

    def _find_destination_rule(self, host: str) -> DestinationRule | None:
        service = self.services.get(host)
        home = service.namespace if service is not None else None
        exact = self.memo("destination_rules_by_host", self._index_destination_rules).get(host, [])
        if exact:
            return sorted(exact, key=lambda dr: dr.namespace != home)[0]
        wild = [dr for dr in self.destination_rules
                if dr.spec.host.startswith("*") and host.endswith(dr.spec.host[1:])]
        return max(wild, key=lambda dr: len(dr.spec.host), default=None)

    def _index_destination_rules(self) -> dict[str, list[DestinationRule]]:
        index: dict[str, list[DestinationRule]] = {}
        for dr in self.destination_rules:
            index.setdefault(self.resolve_host(dr.spec.host, dr.namespace), []).append(dr)
        return index

    def workloads_selected(self, namespace: str, selector: Mapping[str, str]) -> list[Workload]:
        """Workloads of ``namespace`` whose labels include ``selector``, registry order."""
        by_label = self.memo("workloads_by_label", self._index_workloads)
        candidates = [by_label.get((namespace, key, value), []) for key, value in selector.items()]
        if not selector:
            candidates = [by_label.get((namespace, "", ""), [])]
        smallest = min(candidates, key=len)
        return [w for w in smallest if labels_match(selector, w.spec.labels)]

    def _index_workloads(self) -> dict[tuple[str, str, str], list[Workload]]:
        """(namespace, label, value) -> workloads; (namespace, "", "") -> all of the namespace."""
        index: dict[tuple[str, str, str], list[Workload]] = {}
        for w in self.workloads:
            index.setdefault((w.namespace, "", ""), []).append(w)
            for key, value in w.spec.labels.items():
                index.setdefault((w.namespace, key, value), []).append(w)
        return index

    def workload_of(self, node_id: str, name: str, namespace: str) -> Workload | None:
        """The registered workload a proxy serves: by proxyId, else by name."""
        by_id = self.memo("workloads_by_proxy", self._workloads_by_proxy)
        found = by_id.get(node_id)
        if found is not None:
            return found
        return next((w for w in self.workloads if w.name == name and w.namespace == namespace), None)

    def _workloads_by_proxy(self) -> dict[str, Workload]:
        return {w.spec.proxy_id: w for w in self.workloads if w.spec.proxy_id}

    def services_selecting(self, workload: Workload) -> list[MeshService]:
        """Services of the workload's namespace whose selector its labels satisfy, in order."""
        by_label = self.memo("services_by_selector", self._index_service_selectors)
        labels = workload.spec.labels
        candidates: set[int] = set(by_label.get((workload.namespace, "", ""), ()))
        for key, value in labels.items():
            candidates.update(by_label.get((workload.namespace, key, value), ()))
        ordered = self.memo("services_in_order", lambda: list(self.services.values()))
        chosen = (ordered[i] for i in sorted(candidates))
        return [s for s in chosen if s.selector is not None and labels_match(s.selector, labels)]

    def _index_service_selectors(self) -> dict[tuple[str, str, str], list[int]]:
        """(namespace, label, value) -> positions of services whose selector names it;
        (namespace, "", "") -> those with an empty selector (they select every workload)."""
        index: dict[tuple[str, str, str], list[int]] = {}
        for position, service in enumerate(self.services.values()):
            if service.selector is None:
                continue
            items = service.selector.items() or [("", "")]
            for key, value in items:
                index.setdefault((service.namespace, key, value), []).append(position)
        return index
