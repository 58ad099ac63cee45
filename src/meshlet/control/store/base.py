"""The store interface every backend implements (SQLite, etcd).

A store keeps resources by (kind, namespace, name) under one global,
increasing revision. Each write bumps the revision; a resource's
``metadata.resourceVersion`` is the revision of its last write (as in
Kubernetes), so ``put(resource, expected_version=...)`` is a compare-and-swap.
``watch(kinds, start_revision)`` yields every change after
``start_revision`` in revision order, so a watcher that lists with
``snapshot()`` and then watches from the snapshot's revision misses nothing.
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from meshlet.control.resources import KINDS, Resource, parse_resource
from meshlet.errors import MeshletError

# expected_version meaning "the resource must not exist yet" (etcd's
# mod_revision of an absent key).
MUST_NOT_EXIST = "0"


class StoreError(MeshletError):
    """The backend failed (unreachable, corrupt, timed out)."""


class Conflict(StoreError):
    """A compare-and-swap failed: the resource changed (or exists, or is gone) since it was read."""


class NotFound(StoreError):
    """The resource does not exist."""


class Compacted(StoreError):
    """A watch asked to resume from a revision the store no longer keeps; list again."""


class EventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True, slots=True)
class Event:
    """One change. For DELETED, ``resource`` is the last stored state."""

    type: EventType
    resource: Resource
    revision: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    resources: list[Resource]
    revision: int


@runtime_checkable
class Store(Protocol):
    async def get(self, kind: str, namespace: str, name: str) -> Resource | None: ...

    async def list(self, kind: str, namespace: str | None = None) -> list[Resource]: ...

    async def snapshot(self, kinds: Iterable[str] | None = None) -> Snapshot:
        """Every resource of ``kinds`` (all kinds when None) and the revision they are current at."""
        ...

    async def put(self, resource: Resource, expected_version: str | None = None) -> Resource:
        """Create or replace; returns the stored resource with resourceVersion, generation,
        creationTimestamp and uid set. ``expected_version``: None = unconditional,
        ``MUST_NOT_EXIST`` = create only, else the resourceVersion that must be current.
        Raises ``Conflict``."""
        ...

    async def delete(self, kind: str, namespace: str, name: str,
                     expected_version: str | None = None) -> Resource:
        """Remove and return the last stored state. Raises ``NotFound`` or ``Conflict``."""
        ...

    def watch(self, kinds: Iterable[str] | None = None,
              start_revision: int | None = None) -> AsyncIterator[Event]:
        """Changes after ``start_revision`` for ``kinds`` (all when None). Without a
        start revision, from the revision current when iteration begins (an async
        generator runs at its first ``anext``), so pass the revision of the
        ``snapshot()`` the watcher built its state from."""
        ...

    async def revision(self) -> int: ...

    async def close(self) -> None: ...


# -- helpers the backends share --------------------------------------------- #


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise NotFound(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")


def kinds_filter(kinds: Iterable[str] | None) -> frozenset[str] | None:
    if kinds is None:
        return None
    chosen = frozenset(kinds)
    for kind in chosen:
        check_kind(kind)
    return chosen


def stamp(resource: Resource, previous: Resource | None, revision: int, uid: str) -> Resource:
    """The resource as stored at ``revision``: generation bumps when the spec changes;
    creationTimestamp and uid survive updates."""
    if previous is None:
        return resource.with_metadata(
            resource_version=str(revision), generation=1,
            creation_timestamp=datetime.now(UTC).replace(microsecond=0), uid=uid)
    generation = (previous.metadata.generation or 1) + (0 if resource.same_spec(previous) else 1)
    return resource.with_metadata(
        resource_version=str(revision), generation=generation,
        creation_timestamp=previous.metadata.creation_timestamp, uid=previous.metadata.uid)


def encode(resource: Resource) -> str:
    return json.dumps(resource.model_dump(mode="json", by_alias=True, exclude_none=True),
                      separators=(",", ":"))


def decode(text: str | bytes) -> Resource:
    return parse_resource(json.loads(text))


def check_expected(key: tuple[str, str, str], current_version: str | None,
                   expected_version: str | None) -> None:
    if expected_version is None:
        return
    actual = current_version or MUST_NOT_EXIST
    if actual != expected_version:
        kind, namespace, name = key
        if expected_version == MUST_NOT_EXIST:
            raise Conflict(f"{kind} {namespace}/{name} already exists (resourceVersion {actual})")
        if current_version is None:
            raise Conflict(f"{kind} {namespace}/{name} no longer exists (expected resourceVersion "
                           f"{expected_version})")
        raise Conflict(f"{kind} {namespace}/{name} was modified: resourceVersion is {actual}, "
                       f"expected {expected_version}")
