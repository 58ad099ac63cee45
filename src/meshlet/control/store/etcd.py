"""The store on etcd v3, for control-plane replicas sharing one cluster.

Each resource is one key, ``/meshlet/resources/<kind>/<namespace>/<name>``,
whose value is the resource's JSON without ``resourceVersion``: that is the
key's ``mod_revision``, filled in on read, so the store's revision is etcd's
cluster revision and a watch resumes with etcd's ``start_revision``. Writes
are transactions comparing the key's ``mod_revision`` to the one read, which
gives ``expected_version`` its compare-and-swap meaning and keeps
``generation`` exact when replicas write concurrently.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence

from meshlet.control.resources import Resource
from meshlet.control.store.base import (
    Compacted,
    Conflict,
    Event,
    EventType,
    NotFound,
    Snapshot,
    check_expected,
    check_kind,
    decode,
    encode,
    kinds_filter,
    stamp,
)
from meshlet.control.store.etcd_client import EtcdClient, EtcdCompacted, KeyValue, b64, prefix_end

log = logging.getLogger(__name__)

PREFIX = b"/meshlet/resources/"
PAGE = 500
# Unconditional writes retry this often when another writer got in between.
PUT_ATTEMPTS = 8

Resources = list[Resource]


class EtcdStore:
    """``Store`` on an etcd v3 cluster. Open with ``await EtcdStore.open(endpoints)``."""

    def __init__(self, client: EtcdClient, prefix: bytes = PREFIX) -> None:
        self.client = client
        self.prefix = prefix

    @classmethod
    async def open(cls, endpoints: Sequence[str], prefix: bytes = PREFIX) -> EtcdStore:
        store = cls(EtcdClient(endpoints), prefix)
        try:
            await store.revision()  # fail now if no endpoint answers
        except BaseException:
            await store.close()
            raise
        return store

    # -- Store interface ----------------------------------------------------- #

    async def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        check_kind(kind)
        kvs, _, _ = await self.client.range(self._key(kind, namespace, name))
        return self._decode(kvs[0]) if kvs else None

    async def list(self, kind: str, namespace: str | None = None) -> Resources:
        check_kind(kind)
        prefix = self.prefix + f"{kind}/".encode() + (f"{namespace}/".encode() if namespace else b"")
        resources, _ = await self._range_all(prefix)
        return resources

    async def snapshot(self, kinds: Iterable[str] | None = None) -> Snapshot:
        chosen = kinds_filter(kinds)
        resources, revision = await self._range_all(self.prefix)
        if chosen is not None:
            resources = [r for r in resources if r.kind in chosen]
        return Snapshot(resources, revision)

    async def put(self, resource: Resource, expected_version: str | None = None) -> Resource:
        check_kind(resource.key[0])
        key = self._key(*resource.key)
        for _ in range(PUT_ATTEMPTS):
            kvs, _, _ = await self.client.range(key)
            current = kvs[0] if kvs else None
            check_expected(resource.key, _version(current), expected_version)
            previous = self._decode(current) if current is not None else None
            stored = stamp(resource, previous, 0, str(uuid.uuid4())).with_metadata(resource_version=None)
            succeeded, result = await self.client.txn(
                [_same_mod_revision(key, current)],
                [{"request_put": {"key": b64(key), "value": b64(encode(stored).encode())}}])
            if succeeded:
                return stored.with_metadata(resource_version=result["header"]["revision"])
            if expected_version is not None:
                kvs, _, _ = await self.client.range(key)
                check_expected(resource.key, _version(kvs[0] if kvs else None), expected_version)
        raise Conflict(f"{resource.resource_id}: gave up after {PUT_ATTEMPTS} concurrent modifications")

    async def delete(self, kind: str, namespace: str, name: str,
                     expected_version: str | None = None) -> Resource:
        check_kind(kind)
        key = self._key(kind, namespace, name)
        for _ in range(PUT_ATTEMPTS):
            kvs, _, _ = await self.client.range(key)
            if not kvs:
                raise NotFound(f"{kind} {namespace}/{name} not found")
            check_expected((kind, namespace, name), _version(kvs[0]), expected_version)
            succeeded, _ = await self.client.txn(
                [_same_mod_revision(key, kvs[0])], [{"request_delete_range": {"key": b64(key)}}])
            if succeeded:
                return self._decode(kvs[0])
        raise Conflict(f"{kind} {namespace}/{name}: gave up after {PUT_ATTEMPTS} concurrent modifications")

    async def watch(self, kinds: Iterable[str] | None = None,
                    start_revision: int | None = None) -> AsyncIterator[Event]:
        chosen = kinds_filter(kinds)
        after = start_revision if start_revision is not None else await self.revision()
        try:
            async for change in self.client.watch(self.prefix, prefix_end(self.prefix), after + 1):
                if change.deleted:
                    if change.prev_kv is None:
                        log.warning("etcd delete of %r without its previous value; skipped", change.kv.key)
                        continue
                    resource = self._decode(change.prev_kv)
                    event_type = EventType.DELETED
                else:
                    resource = self._decode(change.kv)
                    added = change.kv.create_revision == change.kv.mod_revision
                    event_type = EventType.ADDED if added else EventType.MODIFIED
                if chosen is None or resource.kind in chosen:
                    yield Event(event_type, resource, change.kv.mod_revision)
        except EtcdCompacted as exc:
            raise Compacted(f"revision {after} is compacted (etcd kept from {exc.compact_revision})") from exc

    async def revision(self) -> int:
        _, revision, _ = await self.client.range(self.prefix, prefix_end(self.prefix), limit=1)
        return revision

    async def close(self) -> None:
        await self.client.close()

    # -- helpers --------------------------------------------------------------- #

    def _key(self, kind: str, namespace: str, name: str) -> bytes:
        return self.prefix + f"{kind}/{namespace}/{name}".encode()

    def _decode(self, kv: KeyValue) -> Resource:
        return decode(kv.value).with_metadata(resource_version=str(kv.mod_revision))

    async def _range_all(self, prefix: bytes) -> tuple[Resources, int]:
        """Every resource under ``prefix`` at one revision, read in pages."""
        end = prefix_end(prefix)
        resources: Resources = []
        start, revision = prefix, 0
        while True:
            kvs, header_revision, more = await self.client.range(start, end, revision=revision, limit=PAGE)
            revision = revision or header_revision
            resources.extend(self._decode(kv) for kv in kvs)
            if not more or not kvs:
                return resources, revision
            start = kvs[-1].key + b"\0"


def _version(kv: KeyValue | None) -> str | None:
    return str(kv.mod_revision) if kv is not None else None


def _same_mod_revision(key: bytes, current: KeyValue | None) -> dict[str, str]:
    # An absent key has mod_revision 0, so this also expresses "still absent".
    return {"key": b64(key), "result": "EQUAL", "target": "MOD",
            "mod_revision": str(current.mod_revision if current is not None else 0)}
