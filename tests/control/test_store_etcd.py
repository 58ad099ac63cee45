"""The etcd store against a real 3-member etcd cluster on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from control import store_contract
from control.etcd_cluster import EtcdCluster
from meshlet.control.store import EventType, StoreError, open_store
from meshlet.control.store.etcd import EtcdStore
from meshlet.control.store.etcd_client import prefix_end

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    etcd = EtcdCluster(tmp_path)
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture
async def store(cluster: EtcdCluster) -> AsyncIterator[EtcdStore]:
    opened = await EtcdStore.open(cluster.endpoints)
    try:
        yield opened
    finally:
        await opened.close()


async def test_crud_and_versions(store: EtcdStore) -> None:
    await store_contract.check_crud_and_versions(store)


async def test_optimistic_concurrency(store: EtcdStore) -> None:
    await store_contract.check_optimistic_concurrency(store)


async def test_watch_resumes_from_revision(store: EtcdStore) -> None:
    await store_contract.check_watch_resumes(store)


async def test_reads_writes_and_watches_survive_a_killed_member(cluster: EtcdCluster) -> None:
    # The store starts on member 1, which is then killed under it.
    store = await open_store("etcd:" + ",".join(cluster.endpoints))
    other = await EtcdStore.open(list(reversed(cluster.endpoints)))
    try:
        vs, dr, svc = store_contract.resources()
        watch = store.watch(None, start_revision=await store.revision())
        await store.put(vs)
        (added,) = await store_contract.next_events(watch, 1)
        assert added.type is EventType.ADDED

        cluster.kill(cluster.members[0])

        await store.put(dr)  # fails over to a live member, through the election
        await other.put(svc)
        assert await store.get(*svc.key) is not None
        events = await store_contract.next_events(watch, 2)
        assert [e.resource.kind for e in events] == ["DestinationRule", "Service"]
        snapshot = await other.snapshot()
        assert sorted(r.kind for r in snapshot.resources) == ["DestinationRule", "Service", "VirtualService"]
        await watch.aclose()
    finally:
        await store.close()
        await other.close()


async def test_no_live_endpoint_is_a_clear_error(cluster: EtcdCluster) -> None:
    store = await EtcdStore.open(cluster.endpoints)
    store.client.retry_for = 0.5
    try:
        cluster.stop()
        with pytest.raises(StoreError, match="no endpoint answered"):
            await store.get("VirtualService", "default", "reviews")
    finally:
        await store.close()


def test_prefix_end() -> None:
    assert prefix_end(b"/meshlet/") == b"/meshlet0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"
