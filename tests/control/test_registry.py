from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshlet.control.registry import RegistrationError, RegistrationTokens, Registry, service_endpoints
from meshlet.control.resources import Service, load_documents
from meshlet.control.store import EventType
from meshlet.control.store.sqlite import SqliteStore
from meshlet.identity.spiffe import SpiffeId

SERVICE = """
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{name: http, number: 9080}]}
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "r.db", poll_interval=0.05)
    try:
        yield opened
    finally:
        await opened.close()


def service() -> Service:
    (svc,) = load_documents(SERVICE)
    assert isinstance(svc, Service)
    return svc


def test_tokens_are_single_use_expire_and_are_bound_to_registration() -> None:
    clock = FakeClock()
    tokens = RegistrationTokens.in_memory(clock=clock)
    token = tokens.issue("default", "reviews", ttl=60)
    claims = tokens.redeem(token)
    assert (claims.namespace, claims.service_account) == ("default", "reviews")
    with pytest.raises(RegistrationError, match="already used"):
        tokens.redeem(token)
    late = tokens.issue("default", "reviews", ttl=60)
    clock.now += 61
    with pytest.raises(RegistrationError, match="expired"):
        tokens.redeem(late)
    with pytest.raises(RegistrationError, match="unknown"):
        tokens.redeem("mlt1.forged")
    # A token minted for a CSR does not register a workload.
    csr_token = tokens.tokens.issue(SpiffeId.for_workload("cluster.local", "default", "reviews"))
    with pytest.raises(RegistrationError, match="is for 'csr', not 'register'"):
        tokens.redeem(csr_token)
    with pytest.raises(ValueError, match="not a DNS label"):
        tokens.issue("Bad NS", "x")


async def test_register_report_health_and_deregister(store: SqliteStore) -> None:
    tokens = RegistrationTokens.in_memory()
    registry = Registry(store, tokens)
    watch = store.watch(["Workload"], start_revision=await store.revision())
    v1 = await registry.register(tokens.issue("default", "reviews"), service="reviews", version="v1",
                                 address="127.0.0.1", ports={"http": 19080}, proxy_id="sidecar~1")
    v2 = await registry.register(tokens.issue("default", "reviews"), service="reviews", version="v2",
                                 address="127.0.0.2", ports={"http": 19081}, name="reviews-v2")
    assert v1.spec.labels == {"app": "reviews", "version": "v1"}
    assert v1.spec.service_account == "reviews" and v1.status.registered_at is not None
    assert v2.name == "reviews-v2"

    endpoints = await registry.endpoints(service())
    assert [(e.address, e.port, e.health) for e in endpoints] == [
        ("127.0.0.1", 19080, "UNKNOWN"), ("127.0.0.2", 19081, "UNKNOWN")]
    assert [e.address for e in await registry.endpoints(service(), {"version": "v2"})] == ["127.0.0.2"]

    healthy = await registry.report_health("default", v1.name, "HEALTHY")
    assert healthy.status.health == "HEALTHY" and healthy.status.reported_at is not None
    same = await registry.report_health("default", v1.name, "HEALTHY")
    assert same.metadata.resource_version == healthy.metadata.resource_version  # no write, no push

    with pytest.raises(RegistrationError, match="belongs to another proxy"):
        await registry.deregister("default", v1.name, proxy_id="sidecar~2")
    await registry.deregister("default", v1.name, proxy_id="sidecar~1")
    assert [w.name for w in await registry.workloads()] == ["reviews-v2"]

    types = [(await anext(watch)).type for _ in range(4)]
    assert types == [EventType.ADDED, EventType.ADDED, EventType.MODIFIED, EventType.DELETED]
    await watch.aclose()


async def test_registration_refusals(store: SqliteStore) -> None:
    tokens = RegistrationTokens.in_memory()
    registry = Registry(store, tokens)
    with pytest.raises(RegistrationError, match="unknown"):
        await registry.register("forged", service="reviews", address="127.0.0.1", ports={"http": 1})
    token = tokens.issue("default", "reviews")
    with pytest.raises(RegistrationError, match=r"out of range 1\.\.65535"):
        await registry.register(token, service="reviews", address="127.0.0.1", ports={"http": 0})
    # The mistake did not spend the token.
    first = await registry.register(token, service="reviews", address="127.0.0.1", ports={"http": 1},
                                    name="reviews-1")
    # A restarted proxy re-registers under its name; another service account may not take it.
    again = await registry.register(tokens.issue("default", "reviews"), service="reviews",
                                    address="127.0.0.9", ports={"http": 1}, name="reviews-1")
    assert again.spec.address == "127.0.0.9" and again.metadata.uid == first.metadata.uid
    with pytest.raises(RegistrationError, match="registered by service account 'reviews'"):
        await registry.register(tokens.issue("default", "ratings"), service="ratings",
                                address="127.0.0.2", ports={"http": 1}, name="reviews-1")
    with pytest.raises(RegistrationError, match="is not registered"):
        await registry.report_health("default", "ghost", "HEALTHY")


def test_endpoints_use_the_workload_port_for_the_service_port_name() -> None:
    workloads = load_documents("""
apiVersion: meshlet.dev/v1
kind: Workload
metadata: {name: a}
spec: {address: 10.0.0.1, ports: {http: 8080}, labels: {app: reviews}}
---
apiVersion: meshlet.dev/v1
kind: Workload
metadata: {name: b}
spec: {address: 10.0.0.2, labels: {app: reviews}, weight: 3}
---
apiVersion: meshlet.dev/v1
kind: Workload
metadata: {name: c, namespace: elsewhere}
spec: {address: 10.0.0.3, labels: {app: reviews}}
""")
    found = service_endpoints(service(), workloads)  # type: ignore[arg-type]
    assert [(e.workload, e.port, e.weight) for e in found] == [("a", 8080, 1), ("b", 9080, 3)]
    with pytest.raises(RegistrationError, match="has no port 'grpc'"):
        service_endpoints(service(), [], port_name="grpc")


async def test_silent_healthy_workloads_become_unhealthy(store: SqliteStore) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    tokens = RegistrationTokens.in_memory()
    registry = Registry(store, tokens, clock=lambda: now[0])
    quiet = await registry.register(tokens.issue("default", "reviews"), service="reviews",
                                    address="127.0.0.1", ports={"http": 1})
    chatty = await registry.register(tokens.issue("default", "reviews"), service="reviews",
                                     address="127.0.0.2", ports={"http": 1})
    never = await registry.register(tokens.issue("default", "reviews"), service="reviews",
                                    address="127.0.0.3", ports={"http": 1})
    await registry.report_health("default", quiet.name, "HEALTHY")
    await registry.report_health("default", chatty.name, "HEALTHY")
    now[0] += timedelta(seconds=20)
    await registry.report_health("default", chatty.name, "HEALTHY", reason="still here")
    now[0] += timedelta(seconds=15)
    assert await registry.mark_silent_unhealthy(timedelta(seconds=30)) == [f"default/{quiet.name}"]
    health = {w.name: (w.status.health, w.status.reason) for w in await registry.workloads()}
    assert health[quiet.name] == ("UNHEALTHY", "no health report for 30s")
    assert health[chatty.name] == ("HEALTHY", "still here")
    assert health[never.name] == ("UNKNOWN", None)  # never reported: not the sweeper's to judge


async def test_steady_reports_refresh_reported_at_only_once_per_heartbeat(store: SqliteStore) -> None:
    """The same health reported again writes nothing until ``heartbeat`` has
    passed, then refreshes ``reported_at``: a proxy that keeps reporting stays
    HEALTHY through the silence sweep, without a store write per report."""
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    tokens = RegistrationTokens.in_memory()
    registry = Registry(store, tokens, clock=lambda: now[0], heartbeat=timedelta(seconds=10))
    steady = await registry.register(tokens.issue("default", "reviews"), service="reviews",
                                     address="127.0.0.1", ports={"http": 1})
    first = await registry.report_health("default", steady.name, "HEALTHY")
    now[0] += timedelta(seconds=4)
    again = await registry.report_health("default", steady.name, "HEALTHY")
    assert again.metadata.resource_version == first.metadata.resource_version  # nothing written
    for _ in range(4):  # 40 s of reports every 10 s: past the 30 s sweep bound
        now[0] += timedelta(seconds=10)
        refreshed = await registry.report_health("default", steady.name, "HEALTHY")
        assert refreshed.status.reported_at == now[0]
    assert await registry.mark_silent_unhealthy(timedelta(seconds=30)) == []
    (workload,) = await registry.workloads()
    assert workload.status.health == "HEALTHY"
