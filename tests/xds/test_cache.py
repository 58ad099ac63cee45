"""Snapshots (content versions) and the snapshot cache (debounce, watches, node status)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from ads_helpers import cluster, endpoints
from envoy.config.core.v3 import base_pb2

from meshlet.xds.cache import SnapshotCache
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, Snapshot, pack


def snap(*names: str, port: int = 1000) -> Snapshot:
    return Snapshot.build({
        CLUSTER: [cluster(n) for n in names],
        ENDPOINT: [endpoints(n, port) for n in names],
    })


def test_versions_follow_content() -> None:
    a, b = snap("a", "b"), snap("a", "b")
    assert a.version(CLUSTER) == b.version(CLUSTER)
    assert a.resources(CLUSTER)["a"].version == b.resources(CLUSTER)["a"].version
    moved = snap("a", "b", port=2000)
    assert moved.version(CLUSTER) == a.version(CLUSTER)  # clusters unchanged
    assert moved.version(ENDPOINT) != a.version(ENDPOINT)
    assert moved.resources(ENDPOINT)["a"].version != a.resources(ENDPOINT)["a"].version
    assert snap("a").version(CLUSTER) != a.version(CLUSTER)
    assert a.resources(LISTENER) == {} and a.version(LISTENER) == Snapshot({}).version(LISTENER)


def test_snapshot_refuses_duplicates_and_wrong_types() -> None:
    with pytest.raises(ValueError, match="duplicate cds resource 'a'"):
        Snapshot.build({CLUSTER: [cluster("a"), cluster("a")]})
    with pytest.raises(ValueError, match="not a"):
        Snapshot({LISTENER: [pack(cluster("a"))]})
    with pytest.raises(ValueError, match="has no name"):
        pack(cluster(""))


async def test_first_snapshot_at_once_then_debounced() -> None:
    cache = SnapshotCache(debounce=0.05, max_delay=1.0)
    watch = cache.watch("g")
    cache.set_snapshot("g", snap("a"))
    assert watch.changed.is_set() and cache.snapshot("g") is not None
    watch.changed.clear()
    for i in range(5):
        cache.set_snapshot("g", snap("a", f"b{i}"))
        await asyncio.sleep(0.01)
    assert not watch.changed.is_set()  # still settling
    async with asyncio.timeout(2):
        await watch.changed.wait()
    published = cache.snapshot("g")
    assert published is not None and sorted(published.resources(CLUSTER)) == ["a", "b4"]
    watch.close()


async def test_max_delay_bounds_a_steady_stream_of_changes() -> None:
    cache = SnapshotCache(debounce=0.1, max_delay=0.3)
    cache.set_snapshot("g", snap("a"))
    watch = cache.watch("g")
    loop = asyncio.get_running_loop()
    start = loop.time()
    i = 0
    while not watch.changed.is_set() and loop.time() - start < 2:
        i += 1
        cache.set_snapshot("g", snap("a", f"x{i}"))
        await asyncio.sleep(0.03)  # always within the debounce of the previous change
    assert watch.changed.is_set(), "max_delay did not force a publish"
    watch.close()


async def test_set_snapshot_from_another_thread() -> None:
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    cache.set_snapshot("g", snap("a"))
    watch = cache.watch("g")
    thread = threading.Thread(target=cache.set_snapshot, args=("g", snap("a", "b")))
    thread.start()
    thread.join(5)
    async with asyncio.timeout(2):
        await watch.changed.wait()
    published = cache.snapshot("g")
    assert published is not None and sorted(published.resources(CLUSTER)) == ["a", "b"]


def test_set_before_any_event_loop_publishes_at_once() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("g", snap("a"))
    cache.set_snapshot("g", snap("b"))
    published = cache.snapshot("g")
    assert published is not None and list(published.resources(CLUSTER)) == ["b"]
    cache.clear_snapshot("g")
    assert cache.snapshot("g") is None


def test_node_status_tracks_acks_nacks_and_connections() -> None:
    now = [100.0]
    cache = SnapshotCache(clock=lambda: now[0], group_of=lambda node: str(node.cluster))
    seen: list[str] = []
    cache.add_connect_listener(lambda node, status: seen.append(node.id))
    acks: list[tuple[str, str]] = []
    cache.add_ack_listener(lambda status, type_url, version: acks.append((type_url, version)))
    status = cache.stream_opened(base_pb2.Node(id="n1", cluster="web"), "sotw")
    assert seen == ["n1"] and status.group == "web" and status.connected_since == 100.0
    cache.record_sent(status, CLUSTER, "v1", "1")
    assert not status.synced() and status.types[CLUSTER].pending
    now[0] = 101.0
    cache.record_ack(status, CLUSTER, "v1")
    assert status.synced() and acks == [(CLUSTER, "v1")]
    cache.record_sent(status, CLUSTER, "v2", "2")
    cache.record_nack(status, CLUSTER, "v2", "2", "bad cluster")
    assert not status.synced() and not status.types[CLUSTER].pending
    dumped = status.as_dict()
    cds = dumped["types"]["cds"]  # type: ignore[index]
    assert cds["acked_version"] == "v1" and cds["last_nack"]["error"] == "bad cluster"
    cache.stream_closed(status)
    assert not status.connected and status.disconnected_at == 101.0
    assert cache.status() == [status]


def test_status_forgets_oldest_disconnected_nodes_beyond_the_bound() -> None:
    cache = SnapshotCache(max_nodes=2)
    first = cache.stream_opened(base_pb2.Node(id="a"), "sotw")
    cache.stream_closed(first)
    cache.stream_opened(base_pb2.Node(id="b"), "sotw")
    cache.stream_opened(base_pb2.Node(id="c"), "delta")
    assert sorted(s.node_id for s in cache.status()) == ["b", "c"]


def test_cache_rejects_bad_timing() -> None:
    with pytest.raises(ValueError):
        SnapshotCache(debounce=1.0, max_delay=0.5)
