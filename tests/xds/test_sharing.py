"""Snapshots from shared parts: the mesh-wide resources versioned and encoded once for
every proxy holding them, a proxy's own added on top, over SotW and delta streams."""

from __future__ import annotations

import pytest
from ads_helpers import cluster, endpoints
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshlet.xds.cache import SnapshotCache
from meshlet.xds.loadgen import Fleet
from meshlet.xds.server import start_ads_server
from meshlet.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LayeredTable,
    ResourceTable,
    SharedParts,
    Snapshot,
    pack,
)
from meshlet.xds.streams import DeltaStream, Outgoing, SotwStream


def mesh(*names: str, port: int = 1000) -> SharedParts:
    return SharedParts.build({CLUSTER: [cluster(n) for n in names],
                              ENDPOINT: [endpoints(n, port) for n in names]})


def node_snapshot(shared: SharedParts, own_cluster: str) -> Snapshot:
    return Snapshot.from_parts(shared, {CLUSTER: [pack(cluster(own_cluster, eds=False))]})


def decode(out: Outgoing) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse.FromString(out.encode())


def cluster_names(response: discovery_pb2.DiscoveryResponse) -> set[str]:
    names = set()
    for body in response.resources:
        c = cluster_pb2.Cluster()
        assert body.Unpack(c)
        names.add(c.name)
    return names


def test_streams_sharing_a_body_share_its_encoding_with_the_nonce() -> None:
    shared = mesh("a", "b")
    cache = SnapshotCache()
    outs = []
    for node in ("n1", "n2"):
        stream = SotwStream(cache, cache.stream_opened(base_pb2.Node(id=node), "sotw"))
        request = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT)
        [out] = stream.on_request(request, node_snapshot(shared, node))
        outs.append(out)
    assert outs[0].nonce == outs[1].nonce
    assert outs[0].encode() is outs[1].encode()
    assert decode(outs[0]).nonce == outs[0].nonce


def test_two_nodes_share_one_encoding_of_the_mesh_clusters() -> None:
    shared = mesh("a", "b")
    one, two = node_snapshot(shared, "inbound-1"), node_snapshot(shared, "inbound-2")
    body_one, body_two = one.sotw_body(CLUSTER, None), two.sotw_body(CLUSTER, None)
    # Parts: header, the shared clusters, the node's own; the shared part is one object.
    assert body_one.parts[1] is body_two.parts[1]
    assert body_one.parts[2] != body_two.parts[2]
    # A type only the shared parts have is the very same table, and so the same response.
    assert one.table(ENDPOINT) is two.table(ENDPOINT) is shared.tables[ENDPOINT]
    assert one.sotw_body(ENDPOINT, None).parts[1] is two.sotw_body(ENDPOINT, None).parts[1]
    assert isinstance(one.table(CLUSTER), LayeredTable)
    assert one.version(CLUSTER) != two.version(CLUSTER)
    assert one.version(ENDPOINT) == two.version(ENDPOINT) == shared.version(ENDPOINT)


def test_a_layered_response_carries_shared_and_own_resources() -> None:
    snapshot = node_snapshot(mesh("a", "b"), "inbound-1")
    response = decode(Outgoing(snapshot.sotw_body(CLUSTER, None).parts, "7"))
    assert cluster_names(response) == {"a", "b", "inbound-1"}
    assert response.version_info == snapshot.version(CLUSTER)
    assert (response.type_url, response.nonce) == (CLUSTER, "7")
    named = decode(Outgoing(snapshot.sotw_body(CLUSTER, frozenset({"b", "inbound-1", "zz"})).parts, "8"))
    assert cluster_names(named) == {"b", "inbound-1"}
    assert set(snapshot.resources(CLUSTER)) == {"a", "b", "inbound-1"}
    assert len(snapshot.resources(CLUSTER)) == 3 and "inbound-1" in snapshot.resources(CLUSTER)


def test_layered_versions_follow_either_layer() -> None:
    base = node_snapshot(mesh("a"), "own")
    assert node_snapshot(mesh("a"), "own").version(CLUSTER) == base.version(CLUSTER)
    assert node_snapshot(mesh("a", "b"), "own").version(CLUSTER) != base.version(CLUSTER)
    assert node_snapshot(mesh("a"), "other").version(CLUSTER) != base.version(CLUSTER)
    # Endpoints moved: clusters keep their version, endpoints do not.
    moved = Snapshot.from_parts(mesh("a", port=2000), {CLUSTER: [pack(cluster("own", eds=False))]})
    assert moved.version(CLUSTER) == base.version(CLUSTER)
    assert moved.version(ENDPOINT) != base.version(ENDPOINT)


def test_own_resources_may_not_shadow_shared_ones() -> None:
    with pytest.raises(ValueError, match="duplicate cds resource 'a'"):
        node_snapshot(mesh("a"), "a")


def test_unchanged_tables_are_carried_over_with_their_encodings() -> None:
    before = mesh("a", "b")
    encoded = Snapshot.from_parts(before, {}).sotw_body(CLUSTER, None).parts[1]
    after = mesh("a", "b", port=2000).carry_over(before)
    assert after.tables[CLUSTER] is before.tables[CLUSTER]
    assert after.tables[ENDPOINT] is not before.tables[ENDPOINT]
    assert Snapshot.from_parts(after, {}).sotw_body(CLUSTER, None).parts[1] is encoded
    assert isinstance(after.tables[CLUSTER], ResourceTable)


def test_sotw_stream_sends_only_when_the_layered_content_changes() -> None:
    cache = SnapshotCache()
    stream = SotwStream(cache, cache.stream_opened(base_pb2.Node(id="n1"), "sotw"))
    shared = mesh("a")
    first = node_snapshot(shared, "own")
    [out] = stream.on_request(discovery_pb2.DiscoveryRequest(type_url=CLUSTER), first)
    assert cluster_names(decode(out)) == {"a", "own"}
    ack = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, version_info=first.version(CLUSTER),
                                         response_nonce=out.nonce)
    assert stream.on_request(ack, first) == []
    assert stream.on_snapshot(node_snapshot(mesh("a", port=2000), "own")) == []  # only endpoints moved
    [changed] = stream.on_snapshot(node_snapshot(mesh("a", "b"), "own"))
    assert cluster_names(decode(changed)) == {"a", "b", "own"}


def test_delta_stream_diffs_across_layers() -> None:
    cache = SnapshotCache()
    stream = DeltaStream(cache, cache.stream_opened(base_pb2.Node(id="n1"), "delta"))
    [out] = stream.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER),
                              node_snapshot(mesh("a"), "own"))
    first = discovery_pb2.DeltaDiscoveryResponse.FromString(out.encode())
    assert {r.name for r in first.resources} == {"a", "own"}
    [out] = stream.on_snapshot(node_snapshot(mesh("a", "b"), "other"))
    diff = discovery_pb2.DeltaDiscoveryResponse.FromString(out.encode())
    assert {r.name for r in diff.resources} == {"b", "other"}
    assert list(diff.removed_resources) == ["own"]


async def test_fleet_of_nodes_on_one_shared_part_gets_each_own_config() -> None:
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    shared = mesh("a", "b")
    nodes = [f"p{i}" for i in range(6)]
    for node in nodes:
        cache.set_snapshot(node, node_snapshot(shared, f"inbound-{node}"))
    server, port = await start_ads_server(cache)
    fleet = Fleet(f"127.0.0.1:{port}", channels=2)
    try:
        proxies = [fleet.add(node, delta=i % 2 == 1) for i, node in enumerate(nodes)]
        assert await cache.wait_for(lambda: len(cache.status()) == 6 and all(
            s.synced() and CLUSTER in s.types for s in cache.status()), 10)
        for node, proxy in zip(nodes, proxies, strict=True):
            assert proxy.latest[CLUSTER] == cache.snapshot(node).version(CLUSTER)  # type: ignore[union-attr]
        changed = mesh("a", "b", "c")
        for node in nodes:
            cache.set_snapshot(node, node_snapshot(changed, f"inbound-{node}"))
        for node, proxy in zip(nodes, proxies, strict=True):
            version = node_snapshot(changed, f"inbound-{node}").version(CLUSTER)
            assert await cache.wait_acked(node, CLUSTER, version, 10)
            assert proxy.latest[CLUSTER] == version
        assert all(p.error is None for p in proxies)
    finally:
        await fleet.close()
        await server.stop(None)


def delta_first(node: str, snapshot: Snapshot, cache: SnapshotCache) -> tuple[DeltaStream, Outgoing]:
    stream = DeltaStream(cache, cache.stream_opened(base_pb2.Node(id=node), "delta"))
    [out] = stream.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER), snapshot)
    return stream, out


def test_delta_streams_share_the_encoding_of_the_shared_layer() -> None:
    cache = SnapshotCache()
    shared = mesh("a", "b")
    _, one = delta_first("n1", node_snapshot(shared, "own-1"), cache)
    _, two = delta_first("n2", node_snapshot(shared, "own-2"), cache)
    assert isinstance(one.body, tuple) and isinstance(two.body, tuple)
    assert one.body[1] is two.body[1]  # the shared clusters, encoded once
    names = {r.name for r in discovery_pb2.DeltaDiscoveryResponse.FromString(two.encode()).resources}
    assert names == {"a", "b", "own-2"}


def test_delta_a_resource_moving_between_layers_is_not_removed() -> None:
    cache = SnapshotCache()
    stream, _ = delta_first("n1", node_snapshot(mesh("a"), "x"), cache)
    moved = Snapshot.from_parts(SharedParts({CLUSTER: [pack(cluster("a")), pack(cluster("x", eds=False))]}),
                                {CLUSTER: [pack(cluster("own", eds=False))]})
    [out] = stream.on_snapshot(moved)
    diff = discovery_pb2.DeltaDiscoveryResponse.FromString(out.encode())
    assert list(diff.removed_resources) == []
    assert "own" in {r.name for r in diff.resources}
