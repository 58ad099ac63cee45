"""Behaviour every Store backend must have; the SQLite and etcd tests run it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from meshlet.control.resources import Resource, load_documents
from meshlet.control.store import MUST_NOT_EXIST, Conflict, Event, EventType, NotFound, Store

DOCS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v1}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: reviews, namespace: other}
spec: {ports: [{name: http, number: 9080}]}
"""


def resources() -> list[Resource]:
    return load_documents(DOCS)


def with_subset(resource: Resource, subset: str) -> Resource:
    text = DOCS.split("---")[0].replace("subset: v1", f"subset: {subset}")
    return load_documents(text)[0]


async def next_events(watch: AsyncIterator[Event], count: int, timeout: float = 10.0) -> list[Event]:
    async def take() -> list[Event]:
        return [await anext(watch) for _ in range(count)]

    return await asyncio.wait_for(take(), timeout)


async def check_crud_and_versions(store: Store) -> None:
    vs, dr, svc = resources()
    stored = await store.put(vs)
    assert stored.metadata.resource_version is not None
    assert stored.metadata.generation == 1 and stored.metadata.creation_timestamp is not None
    assert await store.get(*vs.key) == stored
    assert await store.get("VirtualService", "default", "missing") is None

    # Same spec: new resourceVersion, same generation; new spec: generation 2.
    again = await store.put(vs)
    assert int(again.metadata.resource_version or 0) > int(stored.metadata.resource_version or 0)
    assert again.metadata.generation == 1
    assert again.metadata.uid == stored.metadata.uid
    changed = await store.put(with_subset(vs, "v2"))
    assert changed.metadata.generation == 2
    assert changed.metadata.creation_timestamp == stored.metadata.creation_timestamp

    await store.put(dr)
    await store.put(svc)
    assert [r.kind for r in await store.list("VirtualService")] == ["VirtualService"]
    assert await store.list("Service", "default") == []
    assert [r.name for r in await store.list("Service", "other")] == ["reviews"]
    snapshot = await store.snapshot(["VirtualService", "DestinationRule"])
    assert sorted(r.kind for r in snapshot.resources) == ["DestinationRule", "VirtualService"]
    assert snapshot.revision == await store.revision()

    removed = await store.delete(*dr.key)
    assert removed.name == "reviews" and await store.get(*dr.key) is None
    with pytest.raises(NotFound):
        await store.delete(*dr.key)


async def check_optimistic_concurrency(store: Store) -> None:
    vs = resources()[0]
    first = await store.put(vs, expected_version=MUST_NOT_EXIST)
    with pytest.raises(Conflict, match="already exists"):
        await store.put(vs, expected_version=MUST_NOT_EXIST)
    second = await store.put(with_subset(vs, "v2"), expected_version=first.metadata.resource_version)
    with pytest.raises(Conflict, match="was modified"):
        await store.put(with_subset(vs, "v3"), expected_version=first.metadata.resource_version)
    with pytest.raises(Conflict):
        await store.delete(*vs.key, expected_version=first.metadata.resource_version)
    await store.delete(*vs.key, expected_version=second.metadata.resource_version)


async def check_watch_resumes(store: Store) -> None:
    vs, dr, _ = resources()
    start = await store.revision()
    watch = store.watch(["VirtualService"], start_revision=start)
    created = await store.put(vs)
    await store.put(dr)  # another kind: filtered out
    modified = await store.put(with_subset(vs, "v2"))
    await store.delete(*vs.key)
    events = await next_events(watch, 3)
    assert [e.type for e in events] == [EventType.ADDED, EventType.MODIFIED, EventType.DELETED]
    assert events[0].revision == int(created.metadata.resource_version or 0)
    assert events[1].resource == modified
    assert events[2].resource.name == "reviews"
    assert events[0].revision < events[1].revision < events[2].revision
    await watch.aclose()

    # Resuming from the middle replays exactly what followed.
    resumed = store.watch(None, start_revision=events[0].revision)
    replay = await next_events(resumed, 3)
    assert [e.resource.kind for e in replay] == ["DestinationRule", "VirtualService", "VirtualService"]
    assert replay[-1].type is EventType.DELETED
    await resumed.aclose()
