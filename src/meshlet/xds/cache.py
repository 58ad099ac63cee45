"""The snapshot cache: what each proxy should run, change notifications, and sync status.

The translator calls ``set_snapshot(group, snapshot)``; ADS streams watch their
node's group and push the difference when it changes. A group is a node id by
default, or whatever ``group_of(node)`` says (proxies of one service may share
one snapshot, which keeps memory flat with thousands of proxies).

Changes are debounced: a snapshot set while others keep arriving is published
``debounce`` seconds after the last of them, but never later than ``max_delay``
after the first, so a burst of store events becomes one push and a steady
stream of them cannot starve the proxies.

Per node the cache keeps a ``NodeStatus``: connected since, and per type the
last version sent, the last ACKed version and the last NACK with the proxy's
error detail (``meshlet status`` shows it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshlet.xds.snapshot import SHORT_NAMES, Snapshot

log = logging.getLogger(__name__)

SOTW = "sotw"
DELTA = "delta"


def node_id_group(node: Any) -> str:
    """The default grouping: every node on its own snapshot, keyed by node id."""
    return str(node.id)


@dataclass(frozen=True, slots=True)
class Nack:
    """A response the proxy rejected, with its reason."""

    version: str
    nonce: str
    error: str
    at: float


@dataclass(slots=True)
class TypeStatus:
    """One resource type on one node's stream."""

    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float = 0.0
    acked_version: str = ""
    acked_at: float = 0.0
    last_nack: Nack | None = None

    @property
    def pending(self) -> bool:
        """A response is out and neither ACKed nor NACKed yet."""
        return bool(self.sent_nonce) and self.sent_version != self.acked_version and not self._nacked_last()

    def _nacked_last(self) -> bool:
        return self.last_nack is not None and self.last_nack.nonce == self.sent_nonce


@dataclass(slots=True)
class NodeStatus:
    """What the control plane knows about one proxy's config sync."""

    node_id: str
    cluster: str
    group: str
    protocol: str
    connected_since: float
    connected: bool = True
    disconnected_at: float | None = None
    types: dict[str, TypeStatus] = field(default_factory=dict)

    def type_status(self, type_url: str) -> TypeStatus:
        status = self.types.get(type_url)
        if status is None:
            status = self.types[type_url] = TypeStatus()
        return status

    def synced(self) -> bool:
        """Every type sent to this node is ACKed at the version sent."""
        return all(t.acked_version == t.sent_version for t in self.types.values() if t.sent_nonce)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, type URLs shortened to lds/rds/cds/eds/sds."""
        return {
            "node_id": self.node_id,
            "cluster": self.cluster,
            "group": self.group,
            "protocol": self.protocol,
            "connected": self.connected,
            "connected_since": self.connected_since,
            "disconnected_at": self.disconnected_at,
            "synced": self.synced(),
            "types": {SHORT_NAMES.get(url, url): _type_dict(t) for url, t in self.types.items()},
        }


def _type_dict(t: TypeStatus) -> dict[str, object]:
    nack = t.last_nack
    return {
        "sent_version": t.sent_version,
        "acked_version": t.acked_version,
        "acked_at": t.acked_at or None,
        "last_nack": None if nack is None else {"version": nack.version, "error": nack.error, "at": nack.at},
    }


class Watch:
    """One stream's interest in its group's snapshot: ``changed`` is set on each publish."""

    __slots__ = ("_cache", "changed", "group")

    def __init__(self, cache: SnapshotCache, group: str) -> None:
        self._cache = cache
        self.group = group
        self.changed = asyncio.Event()

    def close(self) -> None:
        self._cache._drop_watch(self)


class SnapshotCache:
    """Snapshots by group, debounced publishing, watches and per-node status."""

    def __init__(
        self,
        *,
        debounce: float = 0.1,
        max_delay: float = 1.0,
        group_of: Callable[[Any], str] = node_id_group,
        clock: Callable[[], float] = time.time,
        max_nodes: int = 100_000,
    ) -> None:
        if debounce < 0 or max_delay < debounce:
            raise ValueError("need 0 <= debounce <= max_delay")
        self.debounce = debounce
        self.max_delay = max_delay
        self.group_of = group_of
        self._clock = clock
        self._max_nodes = max_nodes
        self._published: dict[str, Snapshot] = {}
        self._pending: dict[str, Snapshot | None] = {}
        self._first_pending_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watches: dict[str, set[Watch]] = {}
        self._nodes: dict[str, NodeStatus] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._ack_listeners: list[Callable[[NodeStatus, str, str], None]] = []
        self._connect_listeners: list[Callable[[Any, NodeStatus], None]] = []
        self._lock = threading.Lock()

    # -- snapshots -------------------------------------------------------- #

    def set_snapshot(self, group: str, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the config of ``group`` (published after the debounce).

        Safe to call from any thread; the change is applied on the cache's event loop.
        """
        self._submit(group, snapshot)

    def clear_snapshot(self, group: str) -> None:
        """Forget ``group``'s snapshot (its streams keep what they have)."""
        self._submit(group, None)

    def snapshot(self, group: str) -> Snapshot | None:
        """The published snapshot of ``group``."""
        return self._published.get(group)

    def groups(self) -> list[str]:
        return list(self._published)

    def flush(self) -> None:
        """Publish pending snapshots now (must run on the cache's event loop, if it has one)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        self._first_pending_at = None
        for group, snapshot in pending.items():
            self._publish(group, snapshot)

    def _publish(self, group: str, snapshot: Snapshot | None) -> None:
        if snapshot is None:
            self._published.pop(group, None)
        else:
            self._published[group] = snapshot
        for watch in self._watches.get(group, ()):
            watch.changed.set()

    def _submit(self, group: str, snapshot: Snapshot | None) -> None:
        loop = self._loop
        running = _running_loop()
        if loop is None or loop.is_closed():
            if running is None:
                # No event loop yet, so no stream to notify: publish at once.
                self._pending[group] = snapshot
                self.flush()
                return
            self._bind(running)
            loop = running
        if running is loop:
            self._stage(group, snapshot)
        else:
            loop.call_soon_threadsafe(self._stage, group, snapshot)

    def _stage(self, group: str, snapshot: Snapshot | None) -> None:
        if snapshot is not None and group not in self._published and group not in self._pending:
            # A group's first snapshot goes out at once: its proxies are waiting for any config.
            self._publish(group, snapshot)
            return
        self._pending[group] = snapshot
        loop = self._require_loop()
        now = loop.time()
        if self._first_pending_at is None:
            self._first_pending_at = now
        if self.debounce == 0:
            self.flush()
            return
        deadline = min(now + self.debounce, self._first_pending_at + self.max_delay)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(deadline, self.flush)

    # -- watches ---------------------------------------------------------- #

    def watch(self, group: str) -> Watch:
        """Notice changes to ``group``'s snapshot (``close()`` the watch when done)."""
        self._bind(asyncio.get_running_loop())
        watch = Watch(self, group)
        self._watches.setdefault(group, set()).add(watch)
        return watch

    def _drop_watch(self, watch: Watch) -> None:
        watches = self._watches.get(watch.group)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.group]

    # -- node status ------------------------------------------------------ #

    def stream_opened(self, node: Any, protocol: str) -> NodeStatus:
        """Called by the server when a node's first request arrives."""
        node_id = str(node.id)
        status = NodeStatus(
            node_id=node_id,
            cluster=str(node.cluster),
            group=self.group_of(node),
            protocol=protocol,
            connected_since=self._clock(),
        )
        self._nodes.pop(node_id, None)
        self._nodes[node_id] = status
        self._forget_oldest_disconnected()
        self._notify_status()
        for listener in self._connect_listeners:
            listener(node, status)
        return status

    def stream_closed(self, status: NodeStatus) -> None:
        status.connected = False
        status.disconnected_at = self._clock()
        self._notify_status()

    def record_sent(self, status: NodeStatus, type_url: str, version: str, nonce: str) -> None:
        t = status.type_status(type_url)
        t.sent_version, t.sent_nonce, t.sent_at = version, nonce, self._clock()

    def record_ack(self, status: NodeStatus, type_url: str, version: str) -> None:
        t = status.type_status(type_url)
        t.acked_version, t.acked_at = version, self._clock()
        for listener in self._ack_listeners:
            listener(status, type_url, version)
        self._notify_status()

    def record_nack(self, status: NodeStatus, type_url: str, version: str, nonce: str, error: str) -> None:
        t = status.type_status(type_url)
        t.last_nack = Nack(version=version, nonce=nonce, error=error, at=self._clock())
        log.warning(
            "node %s rejected %s version %s: %s (its previous config stays in force)",
            status.node_id, SHORT_NAMES.get(type_url, type_url), version, error,
        )
        self._notify_status()

    def add_connect_listener(self, listener: Callable[[Any, NodeStatus], None]) -> None:
        """Call ``listener(node, node_status)`` when a node opens a stream (``node`` is its
        ``envoy.config.core.v3.Node``): the translator builds a snapshot for a new node."""
        self._connect_listeners.append(listener)

    def add_ack_listener(self, listener: Callable[[NodeStatus, str, str], None]) -> None:
        """Call ``listener(node_status, type_url, version)`` on every ACK (push-latency probes)."""
        self._ack_listeners.append(listener)

    def node_status(self, node_id: str) -> NodeStatus | None:
        return self._nodes.get(node_id)

    def status(self) -> list[NodeStatus]:
        """Every node seen, connected ones and the recently disconnected."""
        return list(self._nodes.values())

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``predicate()`` holds, checked on each status change."""
        if predicate():
            return True
        loop = asyncio.get_running_loop()
        self._bind(loop)
        waiter: tuple[Callable[[], bool], asyncio.Future[None]] = (predicate, loop.create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter[1]
            return True
        except TimeoutError:
            return predicate()
        finally:
            self._waiters.remove(waiter)

    async def wait_acked(self, node_id: str, type_url: str, version: str, timeout: float) -> bool:
        """Wait until ``node_id`` ACKed ``version`` of ``type_url``."""

        def acked() -> bool:
            status = self._nodes.get(node_id)
            return status is not None and type_url in status.types and (
                status.types[type_url].acked_version == version
            )

        return await self.wait_for(acked, timeout)

    def _notify_status(self) -> None:
        # Checked in place: no task per change, however many ACKs a push brings.
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)

    def _forget_oldest_disconnected(self) -> None:
        if len(self._nodes) <= self._max_nodes:
            return
        for node_id, status in list(self._nodes.items()):
            if not status.connected:
                del self._nodes[node_id]
                if len(self._nodes) <= self._max_nodes:
                    return

    # -- loop binding ----------------------------------------------------- #

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._loop is loop:
                return
            if self._loop is not None and not self._loop.is_closed() and self._loop.is_running():
                raise RuntimeError("a SnapshotCache serves one event loop")
            self._loop = loop
            self._timer = None

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the cache has no event loop yet")
        return self._loop


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def snapshot_map(cache: SnapshotCache) -> Mapping[str, Snapshot]:
    """Published snapshots by group (for dumps and tests)."""
    return {group: snap for group in cache.groups() if (snap := cache.snapshot(group)) is not None}
