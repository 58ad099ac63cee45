"""The pusher: store changes and registrations become per-proxy snapshots in the cache,
debounced, only for what changed, for proxies connected before and after."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2, health_check_pb2
from translate_helpers import ALL_V1, FIFTY_FIFTY, SERVICES, WORKLOADS, load, sidecar_id, workload_doc

from meshlet.control.push import ConfigPusher
from meshlet.control.resources import Resource
from meshlet.control.store import Store
from meshlet.control.store.sqlite import SqliteStore
from meshlet.xds.cache import SnapshotCache
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, ROUTE, Snapshot

NODE = sidecar_id("productpage-v1", "127.0.10.1")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "meshlet.db", poll_interval=0.02)
    try:
        yield opened
    finally:
        await opened.close()


async def put_all(store: Store, resources: list[Resource]) -> None:
    for resource in resources:
        await store.put(resource)


def connect(cache: SnapshotCache, node_id: str) -> None:
    """What the ADS server does when a proxy's first request arrives."""
    cache.stream_opened(base_pb2.Node(id=node_id, cluster="bookinfo"), "sotw")


async def until(check: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def route_cluster(snapshot: Snapshot | None, host: str) -> str:
    from envoy.config.route.v3 import route_pb2

    assert snapshot is not None
    resource = snapshot.get(ROUTE, "9080")
    assert resource is not None
    config = route_pb2.RouteConfiguration()
    resource.body.Unpack(config)
    vhost = next(v for v in config.virtual_hosts if v.name == f"{host}:9080")
    action = vhost.routes[0].route
    return action.cluster or ",".join(f"{c.name}={c.weight.value}" for c in action.weighted_clusters.clusters)


@pytest.fixture
async def mesh(store: SqliteStore) -> AsyncIterator[tuple[ConfigPusher, SnapshotCache]]:
    workloads = [workload_doc(n, a, v, addr) for n, a, v, addr in WORKLOADS]
    await put_all(store, load(SERVICES, *workloads, ALL_V1))
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    pusher = ConfigPusher(store, cache, debounce=0.02, max_delay=0.2)
    await pusher.start()
    try:
        yield pusher, cache
    finally:
        await pusher.stop()


REVIEWS = "reviews.default.svc.cluster.local"


async def test_a_connecting_proxy_gets_its_snapshot(mesh: tuple[ConfigPusher, SnapshotCache]) -> None:
    pusher, cache = mesh
    connect(cache, NODE)
    await until(lambda: cache.snapshot(NODE) is not None, "first snapshot")
    assert route_cluster(cache.snapshot(NODE), REVIEWS) == f"outbound|9080|v1|{REVIEWS}"
    status = pusher.status(NODE)
    assert status is not None and status.notes == []


async def test_config_change_reaches_connected_proxies(
        store: SqliteStore, mesh: tuple[ConfigPusher, SnapshotCache]) -> None:
    _pusher, cache = mesh
    others = [sidecar_id(name, address) for name, _a, _v, address in WORKLOADS]
    for node_id in others:
        connect(cache, node_id)
    await until(lambda: all(cache.snapshot(n) is not None for n in others), "snapshots for every proxy")
    before = cache.snapshot(NODE)
    assert before is not None
    await put_all(store, load(FIFTY_FIFTY))
    expected = f"outbound|9080|v1|{REVIEWS}=50,outbound|9080|v3|{REVIEWS}=50"
    await until(lambda: all(route_cluster(cache.snapshot(n), REVIEWS) == expected for n in others),
                "the 50/50 split on every proxy")
    after = cache.snapshot(NODE)
    assert after is not None and after.version(CLUSTER) == before.version(CLUSTER)


async def test_a_revision_is_reported_only_once_its_snapshots_are_published(
        store: SqliteStore) -> None:
    """``pusher.resources.revision`` is what status reports as taken in: when it reaches a
    revision, the cache must publish every connected proxy's snapshot of it already, or a
    proxy still running the previous config looks current at the new revision."""
    workloads = [workload_doc(n, a, v, addr) for n, a, v, addr in WORKLOADS]
    await put_all(store, load(SERVICES, *workloads, ALL_V1))
    # A slow cache debounce: whatever is only staged stays unpublished for a long while.
    cache = SnapshotCache(debounce=2.0, max_delay=4.0)
    pusher = ConfigPusher(store, cache, debounce=0.02, max_delay=0.2)
    await pusher.start()
    try:
        nodes = [sidecar_id(name, address) for name, _a, _v, address in WORKLOADS]
        for node_id in nodes:
            connect(cache, node_id)
        await until(lambda: all(cache.snapshot(n) is not None for n in nodes), "first snapshots")
        changed = await store.put(load(FIFTY_FIFTY)[0])
        revision = int(changed.metadata.resource_version or 0)
        await until(lambda: pusher.resources.revision >= revision, "the change taken in")
        expected = f"outbound|9080|v1|{REVIEWS}=50,outbound|9080|v3|{REVIEWS}=50"
        assert [route_cluster(cache.snapshot(n), REVIEWS) for n in nodes] == [expected] * len(nodes)
    finally:
        await pusher.stop()


async def test_registration_and_health_feed_eds(
        store: SqliteStore, mesh: tuple[ConfigPusher, SnapshotCache]) -> None:
    _pusher, cache = mesh
    connect(cache, NODE)
    await until(lambda: cache.snapshot(NODE) is not None, "first snapshot")
    cluster = f"outbound|9080|v2|{REVIEWS}"

    def endpoints() -> list[tuple[str, int]]:
        from envoy.config.endpoint.v3 import endpoint_pb2

        snapshot = cache.snapshot(NODE)
        resource = snapshot.get(ENDPOINT, cluster) if snapshot is not None else None
        if resource is None:
            return []
        cla = endpoint_pb2.ClusterLoadAssignment()
        resource.body.Unpack(cla)
        return [(e.endpoint.address.socket_address.address, e.health_status)
                for group in cla.endpoints for e in group.lb_endpoints]

    await until(lambda: len(endpoints()) == 1, "reviews-v2's endpoint")
    unhealthy = workload_doc("reviews-v2b", "reviews", "v2", "127.0.10.9", health="UNHEALTHY")
    await put_all(store, load(unhealthy))
    await until(lambda: len(endpoints()) == 2, "a newly registered workload in EDS")
    assert ("127.0.10.9", health_check_pb2.UNHEALTHY) in endpoints()
    await store.delete("Workload", "default", "reviews-v2b")
    await until(lambda: len(endpoints()) == 1, "a deregistered workload gone from EDS")


async def test_bursts_are_debounced(store: SqliteStore, mesh: tuple[ConfigPusher, SnapshotCache]) -> None:
    pusher, cache = mesh
    connect(cache, NODE)
    await until(lambda: cache.snapshot(NODE) is not None, "first snapshot")
    await asyncio.sleep(0.3)
    rebuilds = pusher.rebuilds
    for i in range(20):
        await store.put(load(workload_doc(f"burst-{i}", "details", "v1", f"127.0.20.{i + 1}"))[0])
    cluster = "outbound|9080||details.default.svc.cluster.local"
    await until(lambda: _endpoint_count(cache.snapshot(NODE), cluster) == 21, "every burst workload in EDS")
    # 20 writes, a handful of rebuilds (bounded by max_delay), not 20.
    assert pusher.rebuilds - rebuilds <= 6


def _endpoint_count(snapshot: Snapshot | None, cluster: str) -> int:
    from envoy.config.endpoint.v3 import endpoint_pb2

    resource = snapshot.get(ENDPOINT, cluster) if snapshot is not None else None
    if resource is None:
        return 0
    cla = endpoint_pb2.ClusterLoadAssignment()
    resource.body.Unpack(cla)
    return sum(len(g.lb_endpoints) for g in cla.endpoints)


async def test_unenforced_policy_shows_in_status(
        store: SqliteStore, mesh: tuple[ConfigPusher, SnapshotCache]) -> None:
    pusher, cache = mesh
    connect(cache, NODE)
    await until(lambda: cache.snapshot(NODE) is not None, "first snapshot")
    await put_all(store, load("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all}
spec: {}
"""))

    def noted() -> bool:
        status = pusher.status(NODE)
        return status is not None and any(n.message == "stored, not enforced" for n in status.notes)

    await until(noted, "the unenforced policy in the proxy's status")
    assert pusher.statuses()[NODE]["notes"] == [{"level": "warning",
                                                 "resource": "AuthorizationPolicy default/deny-all",
                                                 "message": "stored, not enforced"}]


async def test_mount_xds_serves_ads_from_the_control_plane_store(tmp_path: Path) -> None:
    import grpc
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from meshlet.control.push import mount_xds, pusher_of
    from meshlet.control.server import ControlPlane, ControlPlaneSettings

    settings = ControlPlaneSettings(store_url=f"sqlite:{tmp_path / 'cp.db'}", api_port=0, xds_port=0)
    plane = ControlPlane(settings)
    await plane.open()
    try:
        await plane.mount([mount_xds])
        await plane.start()
        await put_all(plane.store, load(SERVICES, ALL_V1))
        pusher = pusher_of(plane)
        assert pusher is not None
        await until(lambda: REVIEWS in pusher.resources.services, "the store's services")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.xds_port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
            request.node.id = NODE
            call = stub.StreamAggregatedResources()
            await call.write(request)
            response = await asyncio.wait_for(call.read(), 5)
            names = set()
            for packed in response.resources:
                cluster = cluster_pb2.Cluster()
                packed.Unpack(cluster)
                names.add(cluster.name)
            assert f"outbound|9080|v1|{REVIEWS}" in names
            call.cancel()
    finally:
        await plane.stop()
