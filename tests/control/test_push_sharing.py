"""Structural sharing between sidecars' snapshots: the mesh-wide tables built, versioned and
encoded once per resource set and held by every sidecar; a change rebuilds only what it
touches; a sidecar's own parts are reused while what they are built from holds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_push import connect, put_all, until
from translate_helpers import (
    ALL_V1,
    FIFTY_FIFTY,
    SERVICES,
    WORKLOADS,
    bookinfo,
    load,
    node_of,
    sidecar_id,
    workload_doc,
)

from meshlet.control.push import ConfigPusher
from meshlet.control.store.sqlite import SqliteStore
from meshlet.control.translate import ResourceSet, translate_with_status
from meshlet.xds.cache import SnapshotCache
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, LayeredTable, ResourceTable, Snapshot

DESTINATION_RULE_V4 = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details}
spec:
  host: details
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v4, labels: {version: v4}}
"""


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "meshlet.db", poll_interval=0.02)
    try:
        yield opened
    finally:
        await opened.close()


def shared_table(snapshot: Snapshot, type_url: str) -> ResourceTable:
    table = snapshot.table(type_url)
    if isinstance(table, LayeredTable):
        return table.shared
    assert isinstance(table, ResourceTable)
    return table


def snapshots(rs: ResourceSet, *names: str) -> list[Snapshot]:
    return [translate_with_status(node_of(name), rs).snapshot for name in names]


def test_sidecars_share_the_mesh_tables_and_their_encoding() -> None:
    rs = bookinfo(ALL_V1)
    one, two = snapshots(rs, "productpage-v1", "reviews-v2")
    for type_url in (CLUSTER, ENDPOINT, ROUTE):
        assert shared_table(one, type_url) is shared_table(two, type_url)
    # Each has its own inbound cluster on top of the shared ones, and its own listeners
    # (outbound addresses differ), but the clusters' encoding is one object.
    assert isinstance(one.table(CLUSTER), LayeredTable)
    assert one.version(CLUSTER) != two.version(CLUSTER)
    assert one.sotw_body(CLUSTER, None).parts[1] is two.sotw_body(CLUSTER, None).parts[1]
    assert one.sotw_body(ROUTE, None).encoded() is two.sotw_body(ROUTE, None).encoded()
    assert shared_table(one, LISTENER) is not shared_table(two, LISTENER)


def later(rs: ResourceSet, *texts: str) -> ResourceSet:
    """The resource set after ``texts`` were added, inheriting ``rs``'s shared parts."""
    base = bookinfo(ALL_V1, *texts)
    base.inherit_parts(rs)
    return base


def test_a_route_change_keeps_the_cluster_table_and_rebuilds_routes_once() -> None:
    rs = bookinfo(ALL_V1)
    [before] = snapshots(rs, "productpage-v1")
    encoded = before.sotw_body(CLUSTER, None).parts[1]
    changed = later(rs, FIFTY_FIFTY)
    one, two = snapshots(changed, "productpage-v1", "reviews-v2")
    # Clusters did not change: the very table of the earlier set, with its encoding.
    assert shared_table(one, CLUSTER) is shared_table(before, CLUSTER)
    assert one.sotw_body(CLUSTER, None).parts[1] is encoded
    # Routes did: one new table, held (and so encoded) once for both sidecars.
    assert shared_table(one, ROUTE) is not shared_table(before, ROUTE)
    assert shared_table(one, ROUTE) is shared_table(two, ROUTE)
    assert one.version(ROUTE) != before.version(ROUTE)


def test_a_change_to_one_service_rebuilds_the_cluster_table_once() -> None:
    rs = bookinfo(ALL_V1)
    [before] = snapshots(rs, "productpage-v1")
    changed = later(rs, DESTINATION_RULE_V4)
    nodes = snapshots(changed, *(name for name, *_ in WORKLOADS))
    tables = {id(shared_table(s, CLUSTER)) for s in nodes}
    assert len(tables) == 1 and shared_table(nodes[0], CLUSTER) is not shared_table(before, CLUSTER)
    assert "outbound|9080|v4|details.default.svc.cluster.local" in nodes[0].resources(CLUSTER)
    chunks = {id(s.sotw_body(CLUSTER, None).parts[1]) for s in nodes}
    assert len(chunks) == 1


def test_own_parts_are_reused_while_their_inputs_hold() -> None:
    rs = bookinfo(ALL_V1)
    node = node_of("reviews-v1")
    first = translate_with_status(node, rs)
    assert first.own is not None
    again = translate_with_status(node, later(rs, FIFTY_FIFTY), None, first.own)
    assert again.own is first.own
    assert again.snapshot.version(LISTENER) == first.snapshot.version(LISTENER)
    # Its workload moved to another app port: the inbound parts are built anew.
    moved = ResourceSet.of(load(SERVICES, ALL_V1, *[
        workload_doc(name, app, version, address, annotations={"meshlet.dev/app-ports": "http=29080"})
        for name, app, version, address in WORKLOADS]))
    rebuilt = translate_with_status(node, moved, None, first.own)
    fresh = translate_with_status(node, moved)
    assert rebuilt.own is not first.own
    assert rebuilt.snapshot.version(CLUSTER) == fresh.snapshot.version(CLUSTER)
    assert rebuilt.snapshot.version(CLUSTER) != first.snapshot.version(CLUSTER)


async def test_pushed_snapshots_share_tables_across_a_change(store: SqliteStore) -> None:
    workloads = [workload_doc(n, a, v, addr) for n, a, v, addr in WORKLOADS]
    await put_all(store, load(SERVICES, *workloads, ALL_V1))
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    pusher = ConfigPusher(store, cache, debounce=0.02, max_delay=0.2)
    await pusher.start()
    try:
        nodes = [sidecar_id(name, address) for name, _a, _v, address in WORKLOADS]
        for node_id in nodes:
            connect(cache, node_id)
        await until(lambda: all(cache.snapshot(n) is not None for n in nodes), "snapshots for every proxy")
        first = [cache.snapshot(n) for n in nodes]
        await put_all(store, load(FIFTY_FIFTY))
        await until(lambda: all(cache.snapshot(n) is not s for n, s in zip(nodes, first, strict=True)),
                    "the change on every proxy")
        after = [s for n in nodes if (s := cache.snapshot(n)) is not None]
        assert len({id(shared_table(s, ROUTE)) for s in after}) == 1
        assert len({id(shared_table(s, CLUSTER)) for s in after + first if s is not None}) == 1
        assert set(pusher.statuses()) == set(nodes)
    finally:
        await pusher.stop()
