"""ADS server over real gRPC streams: SotW and delta, ACK/NACK, subscriptions, removal."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from ads_helpers import RawAdsStream, cluster, endpoints, listener, route
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshlet.xds.cache import SnapshotCache
from meshlet.xds.server import start_ads_server
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot


@pytest.fixture
async def ads() -> AsyncIterator[tuple[SnapshotCache, grpc.aio.Channel]]:
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    server, port = await start_ads_server(cache)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield cache, channel
    finally:
        await channel.close()
        await server.stop(None)


def snap(*, clusters: tuple[str, ...] = ("a", "b"), ports: tuple[int, ...] = (1001,)) -> Snapshot:
    return Snapshot.build({
        CLUSTER: [cluster(n) for n in clusters],
        ENDPOINT: [endpoints(n, *ports) for n in clusters],
        LISTENER: [listener("l1")],
        ROUTE: [route("r1", clusters[0])],
    })


def names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for any_msg in response.resources:
        if any_msg.type_url == CLUSTER:
            c = cluster_pb2.Cluster()
            any_msg.Unpack(c)
            out.append(c.name)
        else:
            e = endpoint_pb2.ClusterLoadAssignment()
            any_msg.Unpack(e)
            out.append(e.cluster_name)
    return out


async def test_sotw_wildcard_ack_and_removal(ads: tuple[SnapshotCache, grpc.aio.Channel]) -> None:
    cache, channel = ads
    cache.set_snapshot("n1", snap())
    stream = RawAdsStream(channel, "n1")
    try:
        stream.sotw(CLUSTER)
        first = await stream.recv()
        assert sorted(names(first)) == ["a", "b"]
        assert first.version_info == snap().version(CLUSTER)
        stream.sotw(CLUSTER, version=first.version_info, nonce=first.nonce)
        assert await cache.wait_acked("n1", CLUSTER, first.version_info, 5)
        await stream.expect_silence()

        cache.set_snapshot("n1", snap(clusters=("a",)))
        second = await stream.recv()
        assert names(second) == ["a"]  # full state: b is gone
        assert second.nonce != first.nonce
        status = cache.node_status("n1")
        assert status is not None and status.connected and status.protocol == "sotw"
    finally:
        stream.close()


async def test_sotw_named_subscription_and_nack(ads: tuple[SnapshotCache, grpc.aio.Channel]) -> None:
    cache, channel = ads
    cache.set_snapshot("n2", snap())
    stream = RawAdsStream(channel, "n2")
    try:
        stream.sotw(ENDPOINT, ["a"])
        first = await stream.recv()
        assert names(first) == ["a"]
        stream.sotw(ENDPOINT, ["a"], version=first.version_info, nonce=first.nonce)
        cache.set_snapshot("n2", snap(ports=(1002,)))
        second = await stream.recv()
        stream.sotw(ENDPOINT, ["a"], version=first.version_info, nonce=second.nonce, error="bad endpoint")
        assert await cache.wait_for(
            lambda: (s := cache.node_status("n2")) is not None
            and s.types[ENDPOINT].last_nack is not None, 5)
        status = cache.node_status("n2")
        assert status is not None
        nack = status.types[ENDPOINT].last_nack
        assert nack is not None and nack.error == "bad endpoint" and nack.version == second.version_info
        assert status.types[ENDPOINT].acked_version == first.version_info
        assert not status.synced()
        await stream.expect_silence()  # the rejected version is not pushed again

        # Subscribing to one more name sends both.
        stream.sotw(ENDPOINT, ["a", "b"], version=first.version_info, nonce=second.nonce)
        third = await stream.recv()
        assert sorted(names(third)) == ["a", "b"]
    finally:
        stream.close()


async def test_sotw_stale_nonce_ignored_and_reconnect_skips_known_version(
    ads: tuple[SnapshotCache, grpc.aio.Channel],
) -> None:
    cache, channel = ads
    cache.set_snapshot("n3", snap())
    stream = RawAdsStream(channel, "n3")
    try:
        stream.sotw(CLUSTER)
        first = await stream.recv()
        stream.sotw(CLUSTER, ["a"], nonce="999")  # stale nonce: ignored
        await stream.expect_silence()
    finally:
        stream.close()
    again = RawAdsStream(channel, "n3")
    try:
        again.sotw(CLUSTER, version=first.version_info)
        await again.expect_silence()
        assert await cache.wait_acked("n3", CLUSTER, first.version_info, 5)
    finally:
        again.close()


async def test_waits_for_a_snapshot(ads: tuple[SnapshotCache, grpc.aio.Channel]) -> None:
    cache, channel = ads
    stream = RawAdsStream(channel, "late")
    try:
        stream.sotw(CLUSTER)
        await stream.expect_silence(0.2)
        cache.set_snapshot("late", snap())
        assert sorted(names(await stream.recv())) == ["a", "b"]
    finally:
        stream.close()


async def test_first_request_without_node_is_refused(ads: tuple[SnapshotCache, grpc.aio.Channel]) -> None:
    _, channel = ads
    stream = RawAdsStream(channel, "")
    try:
        stream.sotw(CLUSTER)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.recv()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stream.close()


def delta_request(type_url: str, subscribe: list[str] | None = None, *, nonce: str = "",
                  unsubscribe: list[str] | None = None, initial: dict[str, str] | None = None,
                  error: str | None = None) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=subscribe or [],
        resource_names_unsubscribe=unsubscribe or [], response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if error is not None:
        req.error_detail.message = error
    return req


async def test_delta_wildcard_updates_and_removals(ads: tuple[SnapshotCache, grpc.aio.Channel]) -> None:
    cache, channel = ads
    cache.set_snapshot("d1", snap())
    stream = RawAdsStream(channel, "d1", delta=True)
    try:
        stream.send(delta_request(CLUSTER))
        first = await stream.recv()
        assert sorted(r.name for r in first.resources) == ["a", "b"]
        stream.send(delta_request(CLUSTER, nonce=first.nonce))
        cache.set_snapshot("d1", snap(clusters=("a", "c")))
        second = await stream.recv()
        assert [r.name for r in second.resources] == ["c"]  # a is unchanged
        assert list(second.removed_resources) == ["b"]
        stream.send(delta_request(CLUSTER, nonce=second.nonce, error="no c for you"))
        assert await cache.wait_for(
            lambda: (s := cache.node_status("d1")) is not None
            and s.types[CLUSTER].last_nack is not None, 5)
        await stream.expect_silence()
    finally:
        stream.close()


async def test_delta_named_subscribe_unsubscribe_and_initial_versions(
    ads: tuple[SnapshotCache, grpc.aio.Channel],
) -> None:
    cache, channel = ads
    snapshot = snap()
    cache.set_snapshot("d2", snapshot)
    stream = RawAdsStream(channel, "d2", delta=True)
    try:
        known = {"a": snapshot.resources(ENDPOINT)["a"].version}
        stream.send(delta_request(ENDPOINT, ["a", "b"], initial=known))
        first = await stream.recv()
        assert [r.name for r in first.resources] == ["b"]  # the proxy already has a
        stream.send(delta_request(ENDPOINT, nonce=first.nonce, unsubscribe=["b"]))
        await stream.expect_silence()
        cache.set_snapshot("d2", snap(ports=(2002,)))
        second = await stream.recv()
        assert [r.name for r in second.resources] == ["a"]
        stream.send(delta_request(ENDPOINT, nonce=second.nonce))
        assert await cache.wait_acked("d2", ENDPOINT, second.system_version_info, 5)
        cache.set_snapshot("d2", snap(clusters=("b",)))
        third = await stream.recv()
        assert list(third.removed_resources) == ["a"] and not third.resources
    finally:
        stream.close()


async def test_debounce_coalesces_a_burst() -> None:
    cache = SnapshotCache(debounce=0.05, max_delay=0.5)
    server, port = await start_ads_server(cache)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = RawAdsStream(channel, "burst")
    try:
        cache.set_snapshot("burst", snap())
        stream.sotw(CLUSTER)
        first = await stream.recv()
        stream.sotw(CLUSTER, version=first.version_info, nonce=first.nonce)
        for i in range(10):
            cache.set_snapshot("burst", snap(ports=(3000 + i,), clusters=("a", f"x{i}")))
        last = await stream.recv()
        assert sorted(names(last)) == ["a", "x9"]
        await stream.expect_silence()
    finally:
        stream.close()
        await channel.close()
        await server.stop(None)
