"""The sans-IO ADS stream logic, request by request."""

from __future__ import annotations

from ads_helpers import cluster
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshlet.xds.cache import SnapshotCache
from meshlet.xds.snapshot import CLUSTER, Snapshot
from meshlet.xds.streams import DeltaStream, Outgoing, SotwStream


def snap(*names: str, timeout: int = 1) -> Snapshot:
    clusters = [cluster(n) for n in names]
    for c in clusters:
        c.connect_timeout.FromSeconds(timeout)
    return Snapshot.build({CLUSTER: clusters})


def delta_stream(cache: SnapshotCache, node: str) -> DeltaStream:
    return DeltaStream(cache, cache.stream_opened(base_pb2.Node(id=node), "delta"))


def decode_delta(out: Outgoing) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse.FromString(out.encode())


def test_nonce_is_appended_to_a_shared_body() -> None:
    body = snap("a").sotw_body(CLUSTER, None)
    long_nonce = "n" * 300  # a two-byte length
    response = discovery_pb2.DiscoveryResponse.FromString(Outgoing(body.data, long_nonce).encode())
    assert response.nonce == long_nonce and len(response.resources) == 1


def test_delta_streams_in_different_states_get_their_own_diffs() -> None:
    cache = SnapshotCache()
    before, after = snap("a", "b"), snap("a", "c", timeout=2)
    up_to_date = [delta_stream(cache, f"n{i}") for i in range(2)]
    for stream in up_to_date:
        [first] = stream.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER), before)
        assert sorted(r.name for r in decode_delta(first).resources) == ["a", "b"]
    # A third proxy reconnects declaring an old version of "a" and nothing else.
    stale = delta_stream(cache, "stale")
    assert [r.name for r in decode_delta(stale.on_request(discovery_pb2.DeltaDiscoveryRequest(
        type_url=CLUSTER, initial_resource_versions={"a": "old"}), before)[0]).resources] == ["a", "b"]
    stale_too = delta_stream(cache, "stale-too")
    stale_too.on_request(discovery_pb2.DeltaDiscoveryRequest(
        type_url=CLUSTER, resource_names_subscribe=["a", "b"]), before)

    diffs = [decode_delta(s.on_snapshot(after)[0]) for s in up_to_date]
    for diff in diffs:
        assert sorted(r.name for r in diff.resources) == ["a", "c"]  # timeouts changed
        assert list(diff.removed_resources) == ["b"]
    named = decode_delta(stale_too.on_snapshot(after)[0])
    assert [r.name for r in named.resources] == ["a"] and list(named.removed_resources) == ["b"]
    assert stale.on_snapshot(after) != []
    assert all(s.on_snapshot(after) == [] for s in [*up_to_date, stale, stale_too])


def test_sotw_named_resource_that_appears_later() -> None:
    cache = SnapshotCache()
    stream = SotwStream(cache, cache.stream_opened(base_pb2.Node(id="g"), "sotw"))
    [first] = stream.on_request(
        discovery_pb2.DiscoveryRequest(type_url=CLUSTER, resource_names=["later"]), snap("other")
    )
    response = discovery_pb2.DiscoveryResponse.FromString(first.encode())
    assert len(response.resources) == 0  # the first answer says it does not exist (yet)
    ack = discovery_pb2.DiscoveryRequest(
        type_url=CLUSTER, resource_names=["later"], version_info=response.version_info,
        response_nonce=response.nonce,
    )
    assert stream.on_request(ack, snap("other")) == []
    assert stream.on_snapshot(snap("other", "more")) == []  # nothing it asked for changed
    [update] = stream.on_snapshot(snap("other", "later"))
    assert len(discovery_pb2.DiscoveryResponse.FromString(update.encode()).resources) == 1
