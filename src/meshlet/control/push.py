"""Keeping every proxy's snapshot current: store and registry changes in, snapshots out.

``ConfigPusher`` lists the store, then follows its watch (config and
``Workload`` registrations live in the same store, so one watch carries
both). Changes are debounced: a burst of events becomes one rebuild,
``debounce`` seconds after the last of them and never later than
``max_delay`` after the first. A rebuild indexes the resources once
(``ResourceSet``), translates the snapshot of every connected proxy (the
parts all proxies share are built once) and hands to the ``SnapshotCache``
only those that changed; the cache's content-hash versions then make each
stream send only what differs. A proxy that connects gets its snapshot at
once from the current resources.

When the watch fails (store unreachable, history compacted) the pusher
lists again after a back-off; meanwhile proxies keep the snapshots they have.

``mount_xds`` attaches ADS and a pusher to the control-plane process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshlet.control.resources import Resource
from meshlet.control.store import Event, EventType, Store, StoreError
from meshlet.control.translate import (
    OwnParts,
    ProxyNode,
    ResourceSet,
    TranslationStatus,
    translate_with_status,
)
from meshlet.control.translate.identity import IssuingIdentity
from meshlet.control.translate.security import MeshIdentity
from meshlet.xds.cache import NodeStatus, SnapshotCache
from meshlet.xds.server import add_ads_servicer
from meshlet.xds.snapshot import Snapshot

if TYPE_CHECKING:
    from meshlet.control.server import ControlPlane

log = logging.getLogger(__name__)

DEFAULT_DEBOUNCE = 0.05
DEFAULT_MAX_DELAY = 0.5
RETRY_BASE = 0.2
RETRY_CAP = 5.0
# How often the node watcher looks again even without a connect notice.
NODE_POLL = 1.0
# Longest sleep between looks at certificate renewals.
RENEWAL_POLL = 60.0
STOP_TIMEOUT = 5.0
# Proxies translated in one go before their snapshots go to the cache.
TRANSLATE_BATCH = 250
# The cache's own debounce under the pusher, which debounces store events already.
CACHE_DEBOUNCE = 0.01
# Allocations between young-generation garbage collections in the control plane.
GC_YOUNG_THRESHOLD = 50_000


def _same(a: Snapshot | None, b: Snapshot) -> bool:
    if a is None:
        return False
    types = set(a.type_urls()) | set(b.type_urls())
    return all(a.version(t) == b.version(t) for t in types)


class ConfigPusher:
    """Translates the store's resources into each connected proxy's snapshot."""

    def __init__(
        self,
        store: Store,
        cache: SnapshotCache,
        *,
        identity: MeshIdentity | None = None,
        debounce: float = DEFAULT_DEBOUNCE,
        max_delay: float = DEFAULT_MAX_DELAY,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if debounce < 0 or max_delay < debounce:
            raise ValueError("need 0 <= debounce <= max_delay")
        self.store = store
        self.cache = cache
        self._identity = identity
        self.debounce = debounce
        self.max_delay = max_delay
        self._rand = rand
        self._objects: dict[tuple[str, str, str], Resource] = {}
        self._revision = 0
        # The set snapshots are built from now (a proxy that connects gets one from it).
        self._latest = ResourceSet()
        # The set every connected proxy's snapshot was built from and published by the
        # cache: its revision is the one status reports as taken in (see ``_rebuild``).
        self.resources = self._latest
        self._statuses: dict[str, TranslationStatus] = {}
        self._pushed: dict[str, Snapshot] = {}
        # Node id -> the ResourceSet its snapshot was built from.
        self._built_from: dict[str, ResourceSet] = {}
        # Node id -> its own (inbound) parts, used again while what they are built from holds.
        self._own: dict[str, OwnParts] = {}
        self._dirty = asyncio.Event()
        self._connected = asyncio.Event()
        self._first_dirty_at: float | None = None
        self._synced = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.rebuilds = 0

    # -- life cycle ---------------------------------------------------------------------- #

    async def start(self) -> None:
        """List the store and start following it (returns once the first list is in)."""
        self.cache.add_connect_listener(self._on_connect)
        await self._list()
        await self._rebuild()
        self._tasks = [
            asyncio.create_task(self._follow_store(), name="meshlet-push-watch"),
            asyncio.create_task(self._debounced_rebuilds(), name="meshlet-push-rebuild"),
            asyncio.create_task(self._new_nodes(), name="meshlet-push-nodes"),
            asyncio.create_task(self._renewals(), name="meshlet-push-renewals"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, STOP_TIMEOUT)
        self._tasks = []

    # -- what others call ------------------------------------------------------------------ #

    def status(self, node_id: str) -> TranslationStatus | None:
        """What the last translation for ``node_id`` noted."""
        return self._statuses.get(node_id)

    def statuses(self) -> dict[str, dict[str, object]]:
        """Per node id, its translation notes (JSON-ready, for ``meshlet status``)."""
        return {node_id: status.as_dict() for node_id, status in self._statuses.items()}

    def set_identity(self, identity: MeshIdentity | None) -> None:
        self._identity = identity
        self.invalidate()

    def invalidate(self) -> None:
        """Rebuild every snapshot soon (certificates changed outside the store)."""
        self._mark_dirty()

    # -- the store ---------------------------------------------------------------------------- #

    async def _list(self) -> None:
        snapshot = await self.store.snapshot()
        self._objects = {r.key: r for r in snapshot.resources}
        self._revision = snapshot.revision

    async def _follow_store(self) -> None:
        attempt = 0
        while True:
            try:
                async for event in self.store.watch(None, self._revision):
                    self._apply(event)
                    attempt = 0
                log.warning("store watch ended; listing again")
            except StoreError as exc:
                log.warning("store watch failed (%s); listing again", exc)
            attempt += 1
            await asyncio.sleep(self._backoff(attempt))
            try:
                await self._list()
                self._mark_dirty()
            except StoreError as exc:
                log.warning("listing the store failed (%s); proxies keep their config", exc)

    def _apply(self, event: Event) -> None:
        if event.type is EventType.DELETED:
            self._objects.pop(event.resource.key, None)
        else:
            self._objects[event.resource.key] = event.resource
        self._revision = max(self._revision, event.revision)
        self._mark_dirty()

    def _backoff(self, attempt: int) -> float:
        ceiling = min(RETRY_CAP, RETRY_BASE * 2.0 ** min(attempt, 16))
        return ceiling / 2 + ceiling / 2 * self._rand()

    # -- debounced rebuilds ---------------------------------------------------------------------- #

    def _mark_dirty(self) -> None:
        if self._first_dirty_at is None:
            self._first_dirty_at = time.monotonic()
        self._dirty.set()

    async def _debounced_rebuilds(self) -> None:
        while True:
            await self._dirty.wait()
            await self._quiet_period()
            self._dirty.clear()
            self._first_dirty_at = None
            try:
                await self._rebuild()
            except Exception:
                # A translation bug must not stop config pushes for good; the
                # next change tries again, and proxies keep what they have.
                log.exception("rebuilding snapshots failed")

    async def _quiet_period(self) -> None:
        """Wait until no change came for ``debounce`` s, or ``max_delay`` s after the first."""
        first = self._first_dirty_at if self._first_dirty_at is not None else time.monotonic()
        while True:
            self._dirty.clear()
            remaining = first + self.max_delay - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._dirty.wait(), min(self.debounce, remaining))
            except TimeoutError:
                return

    async def _rebuild(self) -> None:
        resources = ResourceSet.of(self._objects.values(), self._revision)
        # Shared tables that did not change keep their encodings (made for the proxies already).
        resources.inherit_parts(self._latest)
        self._latest = resources
        self.rebuilds += 1
        await self._translate([s for s in self.cache.status() if s.connected], resources)
        # Only now is the revision taken in: status compares each proxy's ACKs with the
        # snapshot the cache publishes, so a revision reported while its snapshots were
        # still being translated (or waited in the cache's debounce) made proxies that
        # still ran the previous config look current at the new revision.
        self.cache.flush()
        self.resources = resources

    # -- proxies ----------------------------------------------------------------------------------- #

    def _on_connect(self, _node: object, status: NodeStatus) -> None:
        # A reconnecting proxy may have missed nothing, but its snapshot may
        # have been built for an older resource set: build it again.
        self._built_from.pop(status.node_id, None)
        self._connected.set()

    async def _new_nodes(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), NODE_POLL)
            self._connected.clear()
            resources = self._latest
            pending = [s for s in self.cache.status() if s.connected and self._unbuilt(s)]
            if pending:
                await self._translate(pending, resources)

    def _unbuilt(self, status: NodeStatus) -> bool:
        return self._built_from.get(status.node_id) is not self._latest

    async def _renewals(self) -> None:
        """Rebuild when an issued certificate is due for renewal (``prepare`` renews it)."""
        while True:
            identity = self._identity
            due = identity.next_renewal() if isinstance(identity, IssuingIdentity) else None
            wait = RENEWAL_POLL if due is None else min(RENEWAL_POLL, max(0.0, due - time.time()))
            await asyncio.sleep(wait)
            if due is not None and time.time() >= due:
                self._mark_dirty()

    async def _prepare_identities(self, nodes: list[NodeStatus], resources: ResourceSet) -> None:
        identity = self._identity
        if not isinstance(identity, IssuingIdentity):
            return
        for status in nodes:
            node = ProxyNode.parse(status.node_id, status.cluster)
            workload = resources.workload_of(node.id, node.name, node.namespace)
            account = workload.spec.service_account if workload is not None else (
                node.name if node.is_gateway else "default")
            try:
                await identity.prepare(node, account)
            except Exception as exc:
                # The proxy keeps what it has; its mTLS listeners wait for a certificate.
                log.warning("issuing a certificate for node %s failed: %s", status.node_id, exc)

    async def _translate(self, nodes: list[NodeStatus], resources: ResourceSet) -> None:
        if not nodes:
            return
        async with self._lock:
            # Another translation may have built some while this one waited for the lock.
            nodes = [s for s in nodes if self._built_from.get(s.node_id) is not resources]
            if not nodes:
                return
            await self._prepare_identities(nodes, resources)
            # Translation is CPU work: off the event loop, so ADS streams keep flowing. In
            # batches, each handed to the cache when done: the first proxies get the change
            # (and the network carries it) while the others are still being translated.
            for start in range(0, len(nodes), TRANSLATE_BATCH):
                batch = nodes[start:start + TRANSLATE_BATCH]
                self._hand_over(await asyncio.to_thread(self._translate_all, batch, resources), resources)
        self._forget_gone()

    def _hand_over(self, results: list[tuple[NodeStatus, Snapshot, TranslationStatus]],
                   resources: ResourceSet) -> None:
        for status, snapshot, notes in results:
            self._statuses[status.node_id] = notes
            self._built_from[status.node_id] = resources
            if not _same(self._pushed.get(status.group), snapshot):
                self._pushed[status.group] = snapshot
                self.cache.set_snapshot(status.group, snapshot)

    def _translate_all(self, nodes: list[NodeStatus],
                       resources: ResourceSet) -> list[tuple[NodeStatus, Snapshot, TranslationStatus]]:
        out = []
        for status in nodes:
            node = ProxyNode.parse(status.node_id, status.cluster)
            try:
                translation = translate_with_status(node, resources, self._identity,
                                                    self._own.get(status.node_id))
            except Exception:
                log.exception("translating the config of node %s failed", status.node_id)
                continue
            if translation.own is not None:
                self._own[status.node_id] = translation.own
            out.append((status, translation.snapshot, translation.status))
        return out

    def _forget_gone(self) -> None:
        known = {s.node_id for s in self.cache.status()}
        for node_id in [n for n in self._statuses if n not in known]:
            self._statuses.pop(node_id, None)
            self._built_from.pop(node_id, None)
            self._own.pop(node_id, None)


# -- the control-plane mount -------------------------------------------------------------------- #

_MOUNTED: weakref.WeakKeyDictionary[ControlPlane, ConfigPusher] = weakref.WeakKeyDictionary()


async def mount_xds(plane: ControlPlane) -> None:
    """ADS on the control plane's gRPC server, fed by a ``ConfigPusher`` over its store."""
    cache = SnapshotCache(debounce=CACHE_DEBOUNCE)
    add_ads_servicer(plane.grpc_server, cache)
    pusher = ConfigPusher(plane.store, cache)
    await pusher.start()
    tune_collector()
    _MOUNTED[plane] = pusher
    plane.on_stop.append(pusher.stop)


def tune_collector() -> None:
    """Collect garbage cycles less often than CPython's default (every 700 allocations).

    A control plane holds a large, long-lived config graph (every proxy's snapshot, the
    mesh's clusters and routes) and allocates many objects per push: by default the
    collector runs hundreds of times per push and scans that graph again and again,
    about a third of a push's translation time. Objects are still freed by reference
    counting at once; only cycles wait longer."""
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(max(_young, GC_YOUNG_THRESHOLD), middle, old)


def pusher_of(plane: ControlPlane) -> ConfigPusher | None:
    """The pusher ``mount_xds`` attached to ``plane``."""
    return _MOUNTED.get(plane)
