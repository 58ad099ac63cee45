"""The workload registry: sidecars register with a bootstrap token, report
their health, and deregister; EDS reads endpoints per service and subset.

Registrations are ``Workload`` resources in the same ``Store`` as the rest of
the config, so every control-plane replica sees them and watches carry them.

Tokens: a workload proves who it is with a single-use bootstrap token. The
registry only needs ``TokenRedeemer.redeem(token) -> TokenClaims``;
``HashedTokens`` is the in-process implementation (SHA-256 hashes, expiry,
single use) and the mesh identity's token service plugs in the same way.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, cast

from meshlet.control.resources import Metadata, Service, Workload, WorkloadSpec, WorkloadStatus
from meshlet.control.resources.base import check_dns_label, check_labels
from meshlet.control.resources.mesh import Health
from meshlet.control.store import Conflict, NotFound, Store
from meshlet.errors import MeshletError

HEALTH_UPDATE_ATTEMPTS = 5
MAX_TOKENS = 100_000


class RegistrationError(MeshletError):
    """A registration was refused (bad token, bad fields, not the owner)."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """Who a redeemed token speaks for."""

    namespace: str
    service_account: str


class TokenRedeemer(Protocol):
    def redeem(self, token: str) -> TokenClaims:
        """The claims of a valid, unexpired, unused token, which is then spent.
        Raises ``RegistrationError`` otherwise."""
        ...


class HashedTokens:
    """Single-use bootstrap tokens kept as SHA-256 hashes (a leaked table grants nothing)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._grants: dict[bytes, tuple[TokenClaims, float]] = {}

    def issue(self, namespace: str, service_account: str, ttl: float = 3600.0) -> str:
        self._drop_expired()
        if len(self._grants) >= MAX_TOKENS:
            raise RegistrationError(f"too many outstanding tokens (limit {MAX_TOKENS})")
        token = secrets.token_urlsafe(32)
        claims = TokenClaims(check_dns_label(namespace), check_dns_label(service_account))
        self._grants[_digest(token)] = (claims, self._clock() + ttl)
        return token

    def redeem(self, token: str) -> TokenClaims:
        # Only hashes of high-entropy tokens are compared, so a plain dict
        # lookup leaks nothing an attacker could use.
        grant = self._grants.pop(_digest(token), None)
        if grant is None:
            raise RegistrationError("bootstrap token unknown or already used")
        claims, expires = grant
        if self._clock() > expires:
            raise RegistrationError("bootstrap token expired")
        return claims

    def _drop_expired(self) -> None:
        now = self._clock()
        for digest, (_, expires) in list(self._grants.items()):
            if now > expires:
                del self._grants[digest]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address:port serving a service, for EDS."""

    workload: str
    address: str
    port: int
    health: Health
    labels: Mapping[str, str]
    weight: int = 1
    locality: str | None = None


class Registry:
    def __init__(self, store: Store, tokens: TokenRedeemer,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.tokens = tokens
        self._clock = clock

    async def register(self, token: str, *, service: str, address: str, ports: Mapping[str, int],
                       labels: Mapping[str, str] | None = None, version: str | None = None,
                       name: str | None = None, proxy_id: str | None = None) -> Workload:
        """Spend ``token`` and record a workload of ``service`` in the token's namespace."""
        claims = self.tokens.redeem(token)
        all_labels = {"app": service, **(labels or {})}
        if version is not None:
            all_labels["version"] = version
        try:
            check_labels(all_labels)
            workload = Workload(
                api_version=Workload.api_version_string(),
                metadata=Metadata(name=name or f"{service}-{uuid.uuid4().hex[:8]}",
                                  namespace=claims.namespace),
                spec=WorkloadSpec(address=address, ports=dict(ports), labels=all_labels,
                                  service_account=claims.service_account, proxy_id=proxy_id),
                status=WorkloadStatus(registered_at=self._now()),
            )
        except ValueError as exc:
            raise RegistrationError(f"registration of {service}: {exc}") from None
        return cast(Workload, await self.store.put(workload))

    async def deregister(self, namespace: str, name: str, *, proxy_id: str | None = None) -> None:
        """Remove a workload. With ``proxy_id``, only the proxy that registered it may."""
        workload = await self._get(namespace, name)
        if proxy_id is not None and workload.spec.proxy_id != proxy_id:
            raise RegistrationError(f"workload {namespace}/{name} belongs to another proxy")
        try:
            await self.store.delete("Workload", namespace, name,
                                    expected_version=workload.metadata.resource_version)
        except NotFound:
            pass

    async def report_health(self, namespace: str, name: str, health: Health,
                            reason: str | None = None) -> Workload:
        """Record what the workload's proxy says of it; only writes when something changed
        so steady reports do not push config."""
        for _ in range(HEALTH_UPDATE_ATTEMPTS):
            workload = await self._get(namespace, name)
            if workload.status.health == health and workload.status.reason == reason:
                return workload
            status = workload.status.model_copy(update={"health": health, "reason": reason,
                                                        "reported_at": self._now()})
            updated = workload.model_copy(update={"status": status})
            try:
                stored = await self.store.put(updated, expected_version=workload.metadata.resource_version)
            except Conflict:
                continue
            return cast(Workload, stored)
        raise RegistrationError(f"workload {namespace}/{name}: health update kept conflicting")

    async def workloads(self, namespace: str | None = None) -> list[Workload]:
        return [w for w in await self.store.list("Workload", namespace) if isinstance(w, Workload)]

    async def endpoints(self, service: Service, subset_labels: Mapping[str, str] | None = None,
                        port_name: str | None = None) -> list[Endpoint]:
        return service_endpoints(service, await self.workloads(service.namespace), subset_labels, port_name)

    async def _get(self, namespace: str, name: str) -> Workload:
        workload = await self.store.get("Workload", namespace, name)
        if not isinstance(workload, Workload):
            raise RegistrationError(f"workload {namespace}/{name} is not registered")
        return workload

    def _now(self) -> datetime:
        return self._clock().replace(microsecond=0)


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def service_endpoints(service: Service, workloads: Iterable[Workload],
                      subset_labels: Mapping[str, str] | None = None,
                      port_name: str | None = None) -> list[Endpoint]:
    """Endpoints of ``service`` (its first port, or ``port_name``) among ``workloads``,
    narrowed to a subset's labels; sorted so snapshots are stable."""
    ports = [p for p in service.spec.ports if port_name is None or p.name == port_name]
    if not ports:
        raise RegistrationError(f"service {service.namespace}/{service.name} has no port {port_name!r}")
    port = ports[0]
    selector = {**service.selector_labels(), **(subset_labels or {})}
    found: list[Endpoint] = []
    for workload in workloads:
        if workload.namespace != service.namespace or not labels_match(selector, workload.spec.labels):
            continue
        number = workload.spec.ports.get(port.name, port.target_port or port.number)
        found.append(Endpoint(workload.name, workload.spec.address, number, workload.status.health,
                              workload.spec.labels, workload.spec.weight or 1, workload.spec.locality))
    return sorted(found, key=lambda e: (e.address, e.port, e.workload))
