"""The workload registry: sidecars register with a bootstrap token, report
their health, and deregister; EDS reads endpoints per service and subset.

Registrations are ``Workload`` resources in the same ``Store`` as the rest of
the config, so every control-plane replica sees them and watches carry them.

Tokens: a workload proves who it is with a single-use bootstrap token. The
registry only needs ``TokenRedeemer.redeem(token) -> TokenClaims``;
``RegistrationTokens`` provides it over the mesh identity's ``BootstrapTokens``
(hashed, expiring, single-use, bound to a SPIFFE workload identity).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, cast

from pydantic import ValidationError

from meshlet.control.resources import Metadata, Service, Workload, WorkloadSpec, WorkloadStatus
from meshlet.control.resources.base import check_dns_label, check_labels, check_name
from meshlet.control.resources.loader import problems_of
from meshlet.control.resources.mesh import Health
from meshlet.control.store import MUST_NOT_EXIST, Conflict, NotFound, Store
from meshlet.errors import MeshletError
from meshlet.identity.spiffe import SpiffeId
from meshlet.identity.tokens import (
    DEFAULT_TOKEN_TTL,
    MAX_TOKEN_LENGTH,
    BootstrapTokens,
    MemoryTokenStore,
    TokenRefused,
    hash_token,
)

HEALTH_UPDATE_ATTEMPTS = 5
# How often a steady health report is written through (see Registry.report_health);
# the control plane's silence sweep must allow a few of these.
HEARTBEAT = timedelta(seconds=10)
REGISTER_PURPOSE = "register"
DEFAULT_TRUST_DOMAIN = "cluster.local"


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


class RegistrationTokens:
    """Registration tokens from the mesh identity's ``BootstrapTokens``: single-use,
    stored hashed, bound to one workload identity and to the purpose
    ``"register"`` (so a CSR token cannot register, nor the reverse)."""

    def __init__(self, tokens: BootstrapTokens, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 purpose: str = REGISTER_PURPOSE) -> None:
        self.tokens = tokens
        self.trust_domain = trust_domain
        self.purpose = purpose

    @classmethod
    def in_memory(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                  clock: Callable[[], float] = time.time) -> RegistrationTokens:
        return cls(BootstrapTokens(MemoryTokenStore(), clock=clock), trust_domain)

    def issue(self, namespace: str, service_account: str, ttl: float = DEFAULT_TOKEN_TTL) -> str:
        identity = SpiffeId.for_workload(self.trust_domain, check_dns_label(namespace),
                                         check_dns_label(service_account))
        return self.tokens.issue(identity, ttl=ttl, purpose=self.purpose)

    def redeem(self, token: str) -> TokenClaims:
        # The identity a token is bound to is in its record; redeeming then
        # checks purpose, expiry and single use atomically.
        record = self.tokens.store.get(hash_token(token)) if len(token) <= MAX_TOKEN_LENGTH else None
        if record is None:
            raise RegistrationError("bootstrap token unknown (forged, mistyped or purged)")
        identity = SpiffeId.parse(record.spiffe_id)
        try:
            self.tokens.redeem(token, purpose=self.purpose, spiffe_id=identity)
        except TokenRefused as exc:
            raise RegistrationError(str(exc)) from None
        if identity.namespace is None or identity.service_account is None:
            raise RegistrationError(f"bootstrap token is bound to {identity}, not a workload identity")
        return TokenClaims(identity.namespace, identity.service_account)


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
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 heartbeat: timedelta = HEARTBEAT) -> None:
        self.store = store
        self.tokens = tokens
        self._clock = clock
        # A steady report still refreshes ``reported_at`` once this old, so the
        # silence sweep can tell a live proxy from a dead one.
        self.heartbeat = heartbeat

    async def register(self, token: str, *, service: str, address: str, ports: Mapping[str, int],
                       labels: Mapping[str, str] | None = None, version: str | None = None,
                       name: str | None = None, proxy_id: str | None = None) -> Workload:
        """Spend ``token`` and record a workload of ``service`` in the token's namespace.

        The request is checked before the token is spent, so a mistake does not burn
        it. Registering under an existing name replaces that workload only when it
        runs as the same service account (a restarted proxy re-registering)."""
        all_labels = {"app": service, **(labels or {})}
        if version is not None:
            all_labels["version"] = version
        workload_name = name or f"{service}-{uuid.uuid4().hex[:8]}"
        try:
            check_labels(all_labels)
            check_name(workload_name)
            spec = WorkloadSpec(address=address, ports=dict(ports), labels=all_labels, proxy_id=proxy_id)
        except ValidationError as exc:
            problems = "; ".join(f"{path}: {message}" for path, message in problems_of(exc))
            raise RegistrationError(f"registration of {service}: {problems}") from None
        except ValueError as exc:
            raise RegistrationError(f"registration of {service}: {exc}") from None
        claims = self.tokens.redeem(token)
        workload = Workload(
            api_version=Workload.api_version_string(),
            metadata=Metadata(name=workload_name, namespace=claims.namespace),
            spec=spec.model_copy(update={"service_account": claims.service_account}),
            status=WorkloadStatus(registered_at=self._now()),
        )
        existing = await self.store.get("Workload", claims.namespace, workload_name)
        if isinstance(existing, Workload) and existing.spec.service_account != claims.service_account:
            raise RegistrationError(f"workload {claims.namespace}/{workload_name} is registered by service "
                                    f"account {existing.spec.service_account!r}")
        expected = existing.metadata.resource_version if existing is not None else MUST_NOT_EXIST
        return cast(Workload, await self.store.put(workload, expected_version=expected))

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
        """Record what the workload's proxy says of it. A steady report writes only
        when the stored one is older than ``heartbeat`` (so steady reports rarely
        touch the store, yet the silence sweep sees the proxy alive)."""
        for _ in range(HEALTH_UPDATE_ATTEMPTS):
            workload = await self._get(namespace, name)
            status = workload.status
            unchanged = status.health == health and status.reason == reason
            if unchanged and not self._heartbeat_due(status.reported_at):
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

    def _heartbeat_due(self, reported_at: datetime | None) -> bool:
        return reported_at is None or self._now() - reported_at >= self.heartbeat

    async def mark_silent_unhealthy(self, max_silence: timedelta) -> list[str]:
        """Workloads reported HEALTHY whose proxy has said nothing for ``max_silence``
        become UNHEALTHY (a proxy that died cannot deregister). Returns their names."""
        cutoff = self._now() - max_silence
        marked: list[str] = []
        for workload in await self.workloads():
            status = workload.status
            last = status.reported_at or status.registered_at
            if status.health != "HEALTHY" or last is None or last > cutoff:
                continue
            silence = int(max_silence.total_seconds())
            updated = workload.model_copy(update={"status": status.model_copy(update={
                "health": "UNHEALTHY", "reason": f"no health report for {silence}s"})})
            try:
                await self.store.put(updated, expected_version=workload.metadata.resource_version)
            except (Conflict, NotFound):
                continue  # reported or removed meanwhile (or another replica got there first)
            marked.append(f"{workload.namespace}/{workload.name}")
        return marked

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
