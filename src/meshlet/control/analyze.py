"""``meshlet analyze``: config mistakes that are valid one resource at a time
but wrong together.

Each finding carries a code, Istio's where Istio's analyzers report the same
thing (``IST0101`` ReferencedResourceNotFound, ``IST0109`` conflicting
VirtualService hosts, ``IST0173`` subset selecting no workloads), and
meshlet's own ``MSH0xxx`` otherwise (weights, conflicting policies).

``analyze(resources, workloads)`` is pure: it reads the resources (and any
registered workloads) and returns findings sorted by resource.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TypeVar

from meshlet.control.registry import labels_match
from meshlet.control.resources import (
    CLUSTER_DOMAIN,
    DestinationRule,
    Gateway,
    PeerAuthentication,
    Resource,
    Service,
    ServiceEntry,
    VirtualService,
    Workload,
    WorkloadEntry,
)
from meshlet.control.resources.networking import Destination, WorkloadSelector

R = TypeVar("R", bound=Resource)


class Severity(enum.StrEnum):
    ERROR = "Error"
    WARNING = "Warning"
    INFO = "Info"


@dataclass(frozen=True, slots=True)
class Finding:
    code: str
    name: str
    severity: Severity
    resource: str  # "VirtualService default/reviews"
    path: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "name": self.name, "severity": self.severity.value,
                "resource": self.resource, "path": self.path, "message": self.message}

    def __str__(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"{self.severity.value} [{self.code}] ({self.resource}{where}) {self.message}"


REFERENCED_RESOURCE_NOT_FOUND = ("IST0101", "ReferencedResourceNotFound")
CONFLICTING_VIRTUAL_SERVICE_HOSTS = ("IST0109", "ConflictingMeshGatewayVirtualServiceHosts")
SUBSET_SELECTS_NO_WORKLOADS = ("IST0173", "DestinationRuleSubsetNotSelectPods")
WEIGHTS_NOT_100 = ("MSH0001", "RouteWeightsNotSummingTo100")
CONFLICTING_PEER_AUTHENTICATION = ("MSH0002", "ConflictingPeerAuthentication")
CONFLICTING_DESTINATION_RULES = ("MSH0003", "ConflictingDestinationRules")
MTLS_DISABLED_UNDER_STRICT = ("MSH0004", "DestinationRuleDisablesStrictMtls")
VIRTUAL_SERVICE_HOST_UNKNOWN = ("MSH0005", "VirtualServiceHostNotFound")

# Namespace-wide policies here apply to the whole mesh (Istio's root namespace).
ROOT_NAMESPACES = frozenset({"istio-system", "meshlet-system"})


def fqdn(host: str, namespace: str) -> str:
    """A host as Istio resolves it: short names are relative to the resource's namespace."""
    if "*" in host:
        return host
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{namespace}.{CLUSTER_DOMAIN}"
    if len(parts) == 2:
        return f"{host}.{CLUSTER_DOMAIN}"
    if len(parts) == 3 and parts[2] == "svc":
        return f"{host}.cluster.local"
    return host


class _Mesh:
    """The resources indexed the way the checks look them up."""

    def __init__(self, resources: Iterable[Resource], workloads: Iterable[Resource]) -> None:
        self.resources = list(resources)
        self.services: dict[str, Service] = {}
        self.entries: list[tuple[str, ServiceEntry]] = []
        self.workloads: list[Workload | WorkloadEntry] = []
        for resource in [*self.resources, *workloads]:
            if isinstance(resource, Service):
                self.services[resource.host] = resource
                for alias in resource.spec.hosts:
                    self.services[fqdn(alias, resource.namespace)] = resource
            elif isinstance(resource, ServiceEntry):
                self.entries.extend((fqdn(h, resource.namespace), resource) for h in resource.spec.hosts)
            elif isinstance(resource, Workload | WorkloadEntry) and resource not in self.workloads:
                self.workloads.append(resource)
        self.gateways = {(r.namespace, r.name) for r in self.resources if isinstance(r, Gateway)}
        self.rules = [r for r in self.resources if isinstance(r, DestinationRule)]

    def of(self, kind: type[R]) -> Iterator[R]:
        return (r for r in self.resources if isinstance(r, kind))

    def known(self, host: str) -> bool:
        return host in self.services or any(fnmatchcase(host, pattern) or fnmatchcase(pattern, host)
                                            for pattern, _ in self.entries)

    def rules_for(self, host: str) -> list[DestinationRule]:
        return [r for r in self.rules if fqdn(r.spec.host, r.namespace) == host]

    def workload_labels(self, host: str) -> list[dict[str, str]] | None:
        """Labels of the workloads behind ``host``; None when the host has no known backing."""
        service = self.services.get(host)
        if service is not None:
            selector = service.selector_labels()
            return [dict(w.spec.labels) for w in self.workloads
                    if w.namespace == service.namespace and labels_match(selector, w.spec.labels)]
        for pattern, entry in self.entries:
            if pattern == host:
                if entry.spec.endpoints:
                    return [dict(e.labels) for e in entry.spec.endpoints]
                if entry.spec.workload_selector is not None:
                    selector = entry.spec.workload_selector.match_labels
                    return [dict(w.spec.labels) for w in self.workloads
                            if isinstance(w, WorkloadEntry) and labels_match(selector, w.spec.labels)]
        return None


def analyze(resources: Iterable[Resource], workloads: Iterable[Resource] = ()) -> list[Finding]:
    """Findings over ``resources``; registered workloads may come in ``resources`` or
    separately in ``workloads`` (``Workload`` or ``WorkloadEntry``)."""
    mesh = _Mesh(resources, workloads)
    findings: list[Finding] = []
    for check in _CHECKS:
        findings.extend(check(mesh))
    return sorted(findings, key=lambda f: (f.resource, f.path, f.code))


def _finding(code: tuple[str, str], severity: Severity, resource: Resource, path: str,
             message: str) -> Finding:
    return Finding(code[0], code[1], severity, resource.resource_id, path, message)


# -- checks ------------------------------------------------------------------ #


def _destinations(vs: VirtualService) -> Iterator[tuple[str, Destination]]:
    for i, http in enumerate(vs.spec.http):
        for j, route in enumerate(http.route):
            yield f"spec.http[{i}].route[{j}].destination", route.destination
        if http.mirror is not None:
            yield f"spec.http[{i}].mirror", http.mirror
    for i, tcp in enumerate(vs.spec.tcp):
        for j, tcp_route in enumerate(tcp.route):
            yield f"spec.tcp[{i}].route[{j}].destination", tcp_route.destination


def _check_references(mesh: _Mesh) -> Iterator[Finding]:
    for vs in mesh.of(VirtualService):
        for path, destination in _destinations(vs):
            host = fqdn(destination.host, vs.namespace)
            if not mesh.known(host):
                yield _finding(REFERENCED_RESOURCE_NOT_FOUND, Severity.ERROR, vs, path + ".host",
                               f"referenced host not found: {destination.host!r} ({host})")
                continue
            if destination.subset is None:
                continue
            subsets = {s.name for rule in mesh.rules_for(host) for s in rule.spec.subsets}
            if destination.subset not in subsets:
                yield _finding(REFERENCED_RESOURCE_NOT_FOUND, Severity.ERROR, vs, path + ".subset",
                               f"referenced host+subset in destinationrule not found: "
                               f"{destination.host!r}+{destination.subset!r}")
        for i, gateway in enumerate(vs.spec.gateways):
            if gateway == "mesh":
                continue
            namespace, _, name = gateway.rpartition("/")
            if (namespace or vs.namespace, name) not in mesh.gateways:
                yield _finding(REFERENCED_RESOURCE_NOT_FOUND, Severity.ERROR, vs, f"spec.gateways[{i}]",
                               f"referenced gateway not found: {gateway!r}")
        if vs.spec.gateways and "mesh" not in vs.spec.gateways:
            continue  # gateway-bound: hosts are names clients use at the edge
        for i, vs_host in enumerate(vs.spec.hosts):
            if not mesh.known(fqdn(vs_host, vs.namespace)):
                yield _finding(VIRTUAL_SERVICE_HOST_UNKNOWN, Severity.WARNING, vs, f"spec.hosts[{i}]",
                               f"host {vs_host!r} is no Service or ServiceEntry: sidecars will "
                               "never route to it")
    for rule in mesh.rules:
        host = fqdn(rule.spec.host, rule.namespace)
        if not mesh.known(host):
            yield _finding(REFERENCED_RESOURCE_NOT_FOUND, Severity.WARNING, rule, "spec.host",
                           f"referenced host not found: {rule.spec.host!r} ({host})")


def _check_weights(mesh: _Mesh) -> Iterator[Finding]:
    for vs in mesh.of(VirtualService):
        groups: list[tuple[str, Sequence[int | None]]] = [
            (f"spec.http[{i}].route", [r.weight for r in http.route]) for i, http in enumerate(vs.spec.http)]
        groups += [(f"spec.tcp[{i}].route", [r.weight for r in tcp.route])
                   for i, tcp in enumerate(vs.spec.tcp)]
        for path, weights in groups:
            if all(w is None for w in weights):
                continue
            total = sum(w or 0 for w in weights)
            if total != 100:
                shown = ", ".join("unset" if w is None else str(w) for w in weights)
                yield _finding(WEIGHTS_NOT_100, Severity.ERROR, vs, path,
                               f"route weights sum to {total}, not 100 ({shown})")


def _check_subsets_select_workloads(mesh: _Mesh) -> Iterator[Finding]:
    for rule in mesh.rules:
        backing = mesh.workload_labels(fqdn(rule.spec.host, rule.namespace))
        if backing is None:
            continue  # unknown host: reported by the reference check
        for i, subset in enumerate(rule.spec.subsets):
            if not any(labels_match(subset.labels, labels) for labels in backing):
                selector = ",".join(f"{k}={v}" for k, v in sorted(subset.labels.items()))
                yield _finding(SUBSET_SELECTS_NO_WORKLOADS, Severity.WARNING, rule, f"spec.subsets[{i}]",
                               f"subset {subset.name!r} selects no workloads of {rule.spec.host!r}"
                               f" ({selector or 'no labels'})")


def _check_overlapping_virtual_services(mesh: _Mesh) -> Iterator[Finding]:
    owners: dict[tuple[str, frozenset[str]], list[VirtualService]] = defaultdict(list)
    for vs in mesh.of(VirtualService):
        gateways = frozenset(vs.spec.gateways or ["mesh"])
        for host in {fqdn(h, vs.namespace) for h in vs.spec.hosts}:
            owners[(host, gateways)].append(vs)
    for (host, gateways), services in owners.items():
        if len(services) < 2 or not any(vs.spec.http for vs in services):
            continue
        names = ", ".join(vs.resource_id for vs in services)
        for vs in services:
            yield _finding(CONFLICTING_VIRTUAL_SERVICE_HOSTS, Severity.ERROR, vs, "spec.hosts",
                           f"host {host!r} (gateways {', '.join(sorted(gateways))}) is routed by "
                           f"several VirtualServices: {names}; only one takes effect")


def _selector_key(selector: WorkloadSelector | None) -> str:
    labels = selector.match_labels if selector is not None else {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(namespace-wide)"


def _check_conflicting_policies(mesh: _Mesh) -> Iterator[Finding]:
    peer: dict[tuple[str, str], list[PeerAuthentication]] = defaultdict(list)
    for pa in mesh.of(PeerAuthentication):
        peer[(pa.namespace, _selector_key(pa.spec.selector))].append(pa)
    for (_, selector), policies in peer.items():
        if len(policies) < 2:
            continue
        modes = sorted({p.spec.mode for p in policies})
        severity = Severity.ERROR if len(modes) > 1 else Severity.WARNING
        names = ", ".join(p.resource_id for p in policies)
        for policy in policies:
            yield _finding(CONFLICTING_PEER_AUTHENTICATION, severity, policy, "spec.selector",
                           f"PeerAuthentications {names} select the same workloads ({selector}) "
                           f"with modes {', '.join(modes)}")
    rules: dict[tuple[str, str, str], list[DestinationRule]] = defaultdict(list)
    for rule in mesh.rules:
        host = fqdn(rule.spec.host, rule.namespace)
        rules[(rule.namespace, host, _selector_key(rule.spec.workload_selector))].append(rule)
    for (_, host, _), group in rules.items():
        if len(group) > 1:
            names = ", ".join(r.resource_id for r in group)
            for rule in group:
                yield _finding(CONFLICTING_DESTINATION_RULES, Severity.WARNING, rule, "spec.host",
                               f"several DestinationRules for {host!r} in one namespace ({names}); "
                               "which settings apply depends on the order they were created")
    yield from _check_mtls_disabled_under_strict(mesh)


def _strict_namespaces(mesh: _Mesh) -> tuple[set[str], set[str]]:
    """Namespaces with a namespace-wide STRICT policy, and those with a namespace-wide
    policy of another mode. When several apply (reported as MSH0002) STRICT wins
    here, so a DISABLE that may be refused is not missed."""
    strict: set[str] = set()
    other: set[str] = set()
    for pa in mesh.of(PeerAuthentication):
        if pa.spec.selector is None and pa.spec.mode != "UNSET":
            (strict if pa.spec.mode == "STRICT" else other).add(pa.namespace)
    return strict, other - strict


def _check_mtls_disabled_under_strict(mesh: _Mesh) -> Iterator[Finding]:
    strict, not_strict = _strict_namespaces(mesh)
    mesh_wide_strict = bool(strict & ROOT_NAMESPACES)
    for rule in mesh.rules:
        policy = rule.spec.traffic_policy
        if policy is None or policy.tls is None or policy.tls.mode != "DISABLE":
            continue
        service = mesh.services.get(fqdn(rule.spec.host, rule.namespace))
        if service is None:
            continue
        namespace = service.namespace
        if namespace in strict or (mesh_wide_strict and namespace not in not_strict):
            yield _finding(MTLS_DISABLED_UNDER_STRICT, Severity.ERROR, rule, "spec.trafficPolicy.tls.mode",
                           f"tls mode DISABLE for {rule.spec.host!r}, but STRICT mTLS applies to namespace "
                           f"{namespace!r}: requests will be refused")


_CHECKS = (
    _check_references,
    _check_weights,
    _check_subsets_select_workloads,
    _check_overlapping_virtual_services,
    _check_conflicting_policies,
)
