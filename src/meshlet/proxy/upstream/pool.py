"""Connection pools: one per (host, protocol).

The pool hands out ``Lease``s on upstream connections and takes them back.
HTTP/1.1 connections carry one request at a time and are reused while
keep-alive lasts; HTTP/2 connections carry up to ``max_streams`` at once, so
the pool opens a new one only when every open connection is full. Requests
beyond ``max_connections`` wait in a bounded queue (Envoy's
``max_pending_requests`` circuit breaker); the wait is bounded by the
caller's timeout. With a cluster's ``ResourceManager`` the connection and
pending limits are the cluster-wide circuit breakers, shared by every pool
of the cluster.

Connecting itself is a callable given by the cluster (TCP connect, transport
socket handshake, codec), bounded by the cluster's ``connect_timeout``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from meshlet.proxy.http.stream import UpstreamConnection
from meshlet.proxy.observe.stats import Counter, Gauge
from meshlet.proxy.upstream.circuit_breaker import ResourceManager

# Envoy's default circuit-breaker thresholds.
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PENDING = 1024
# Event-loop timers can fire up to a clock tick before their due time.
_CLOCK_SLACK = 0.002


class UpstreamConnectError(Exception):
    """No connection could be had. ``reason`` is Envoy's reset-reason text
    ("connection failure", "connection timeout", "overflow")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(slots=True)
class HostCounters:
    """Per-host numbers shown by the admin ``/clusters`` page."""

    rq_total: int = 0
    rq_error: int = 0
    rq_active: int = 0
    cx_total: int = 0
    cx_active: int = 0
    cx_connect_fail: int = 0


@dataclass(slots=True)
class ConnectionStats:
    """The cluster-wide connection stats a pool updates (Envoy names)."""

    cx_total: Counter = field(default_factory=Counter)
    cx_active: Gauge = field(default_factory=Gauge)
    cx_connect_fail: Counter = field(default_factory=Counter)
    cx_connect_timeout: Counter = field(default_factory=Counter)
    cx_destroy: Counter = field(default_factory=Counter)
    cx_idle_timeout: Counter = field(default_factory=Counter)
    cx_max_requests: Counter = field(default_factory=Counter)
    rq_pending_total: Counter = field(default_factory=Counter)
    rq_pending_overflow: Counter = field(default_factory=Counter)
    rq_pending_active: Gauge = field(default_factory=Gauge)


LostFn = Callable[[UpstreamConnection], None]
ConnectFn = Callable[[LostFn], Awaitable[UpstreamConnection]]
"""Opens a connection; the callback is called when that connection closes."""


class Lease:
    """One request's hold on a connection; ``release`` exactly once when the
    exchange is over (response fully read, or the stream abandoned)."""

    __slots__ = ("_pool", "_released", "connection")

    def __init__(self, pool: ConnectionPool, connection: UpstreamConnection) -> None:
        self._pool = pool
        self.connection = connection
        self._released = False

    def release(self, *, reusable: bool = True) -> None:
        """``reusable=False`` when the exchange broke off mid-way: the
        connection is closed instead of going back to the idle set."""
        if self._released:
            return
        self._released = True
        self._pool._release(self.connection, reusable)


class ConnectionPool:
    def __init__(
        self,
        connect: ConnectFn,
        *,
        stats: ConnectionStats,
        host: HostCounters,
        multiplexed: bool,
        max_streams: int = 1,
        stream_limit: Callable[[UpstreamConnection], int] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_pending: int = DEFAULT_MAX_PENDING,
        idle_timeout: float | None = None,
        max_requests_per_connection: int | None = None,
        resources: ResourceManager | None = None,
    ) -> None:
        self._connect = connect
        self._stats = stats
        self._host = host
        self.multiplexed = multiplexed
        self.max_streams = max_streams if multiplexed else 1
        # Streams one connection may carry; with ALPN ("auto") it depends on
        # what each connection negotiated.
        self._stream_limit = stream_limit or (lambda _conn: self.max_streams)
        self._limits: dict[UpstreamConnection, int] = {}
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.idle_timeout = idle_timeout
        self.max_requests_per_connection = max_requests_per_connection
        self._resources = resources
        if resources is not None:
            resources.share_connections_with(self)
        self._leases: dict[UpstreamConnection, int] = {}
        self._served: dict[UpstreamConnection, int] = {}
        # Idle HTTP/1.1 connections, most recently used last: a request takes
        # one in O(1) instead of scanning every connection of the pool.
        self._idle: list[UpstreamConnection] = []
        # When each idle connection went idle; one sweep timer per pool closes
        # those idle for ``idle_timeout`` (no timer armed/cancelled per request).
        self._idle_since: dict[UpstreamConnection, float] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._draining = False
        self._closed = False

    # -- introspection ---------------------------------------------------- #

    @property
    def connection_count(self) -> int:
        return len(self._leases)

    @property
    def active_requests(self) -> int:
        return sum(self._leases.values())

    @property
    def idle(self) -> bool:
        return self._connecting == 0 and not self._waiters and self.active_requests == 0

    # -- acquire / release ------------------------------------------------ #

    def acquire_now(self) -> Lease | None:
        """A lease on a connection with room right now, or None (then
        ``acquire`` opens or waits): the common case without a coroutine."""
        if self._closed or self._draining:
            return None
        conn = self._pop_idle() or self._find_available()
        return self._lease(conn) if conn is not None else None

    async def acquire(self, timeout: float | None = None) -> Lease:
        """A lease on a connection with room for one more request. Raises
        ``UpstreamConnectError`` (connect failure/timeout, queue overflow) or
        ``TimeoutError`` when ``timeout`` passes while queued."""
        if self._closed or self._draining:
            raise UpstreamConnectError("connection failure", "pool is draining")
        conn = self._pop_idle() or self._find_available()
        if conn is not None:
            return self._lease(conn)  # the common case: no timer needed
        async with asyncio.timeout(timeout):
            while True:
                conn = self._pop_idle() or self._find_available()
                if conn is not None:
                    return self._lease(conn)
                if self._may_open():
                    return self._lease(await self._open())
                await self._wait_for_room()

    def _pop_idle(self) -> UpstreamConnection | None:
        """The most recently idled connection still fit for a request (stale
        entries, for connections since closed or discarded, are dropped)."""
        idle = self._idle
        leases = self._leases
        while idle:
            conn = idle.pop()
            if leases.get(conn) == 0 and not conn.closed and conn.available and not self._retired(conn):
                return conn
        return None

    def _find_available(self) -> UpstreamConnection | None:
        dead: list[UpstreamConnection] = []
        found: UpstreamConnection | None = None
        for conn, leases in self._leases.items():
            if conn.closed:
                if leases == 0:
                    dead.append(conn)  # the peer closed it while idle
            elif leases < self._limits[conn] and conn.available and not self._retired(conn):
                found = conn
                break
        for conn in dead:
            self._discard(conn)
        return found

    def _may_open(self) -> bool:
        if len(self._leases) + self._connecting >= self.max_connections:
            return False
        # An HTTP/2 connection on its way will have room for the waiters.
        if self.multiplexed and self._connecting:
            return False
        # Takes the cluster's connection resource; _open owns it from here.
        if self._resources is None:
            return True
        empty = not self._leases and not self._connecting
        return self._resources.acquire_connection(pool_is_empty=empty)

    async def _open(self) -> UpstreamConnection:
        self._connecting += 1
        try:
            conn = await self._connect(self._connection_lost)
        except BaseException:
            self._connecting -= 1
            if self._resources is not None:
                self._resources.release_connection()
            self._stats.cx_connect_fail.inc()
            self._host.cx_connect_fail += 1
            # A slot freed up: the next waiter may try its own connection.
            self._wake_one()
            raise
        self._connecting -= 1
        self._leases[conn] = 0
        self._served[conn] = 0
        self._limits[conn] = self._stream_limit(conn)
        self._stats.cx_total.inc()
        self._stats.cx_active.inc()
        self._host.cx_total += 1
        self._host.cx_active += 1
        if self.multiplexed:
            self._wake_all()
        return conn

    async def _wait_for_room(self) -> None:
        resources = self._resources
        if len(self._waiters) >= self.max_pending:
            self._stats.rq_pending_overflow.inc()
            raise UpstreamConnectError("overflow", "too many requests waiting for a connection")
        if resources is not None and not resources.try_acquire_pending():
            raise UpstreamConnectError("overflow", "too many requests waiting for a connection")
        try:
            await self._wait_in_line()
        finally:
            if resources is not None:
                resources.release_pending()

    async def _wait_in_line(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._stats.rq_pending_total.inc()
        self._stats.rq_pending_active.inc()
        try:
            await waiter
        finally:
            self._stats.rq_pending_active.dec()
            if not waiter.done():
                waiter.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
        if self._closed or self._draining:
            raise UpstreamConnectError("connection failure", "pool closed while waiting")

    def _lease(self, conn: UpstreamConnection) -> Lease:
        self._leases[conn] += 1
        self._served[conn] += 1
        self._idle_since.pop(conn, None)
        return Lease(self, conn)

    def _release(self, conn: UpstreamConnection, reusable: bool) -> None:
        if conn not in self._leases:
            return
        self._leases[conn] -= 1
        idle = self._leases[conn] == 0
        if not reusable and self._limits[conn] > 1 and not conn.closed:
            # One abandoned stream does not condemn a multiplexed connection.
            reusable = True
        retired = self._retired(conn)
        if not reusable or conn.closed:
            self._discard(conn)
        elif retired or self._draining or self._closed:
            if idle:
                if retired:
                    self._stats.cx_max_requests.inc()
                self._discard(conn)
        elif idle:
            if not self.multiplexed:
                self._idle.append(conn)
            self._arm_idle_timer(conn)
        self._wake_one()

    def _retired(self, conn: UpstreamConnection) -> bool:
        """Served its ``max_requests_per_connection``: no new requests on it."""
        limit = self.max_requests_per_connection
        return limit is not None and self._served[conn] >= limit

    # -- connection lifecycle --------------------------------------------- #

    def _arm_idle_timer(self, conn: UpstreamConnection) -> None:
        timeout = self.idle_timeout
        if timeout is None:
            return
        # The pool's connections live on one loop: looked up once (each
        # get_running_loop is a getpid system call on Python 3.11).
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._idle_since[conn] = loop.time()
        if self._sweep is None:
            self._sweep = loop.call_later(timeout, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close the connections idle for ``idle_timeout``; re-arm for the
        next one due."""
        self._sweep = None
        timeout = self.idle_timeout
        if timeout is None or not self._idle_since:
            return
        loop = asyncio.get_running_loop()
        # Timers may fire a clock tick early: a connection due within it counts as due.
        now = loop.time() + _CLOCK_SLACK
        next_due: float | None = None
        for conn, since in list(self._idle_since.items()):
            due = since + timeout
            if due <= now:
                del self._idle_since[conn]
                if self._leases.get(conn) == 0:
                    self._stats.cx_idle_timeout.inc()
                    self._discard(conn)
            elif next_due is None or due < next_due:
                next_due = due
        if next_due is not None:
            self._sweep = loop.call_at(next_due, self._sweep_idle)

    def _connection_lost(self, conn: UpstreamConnection) -> None:
        """The peer (or the network) closed a connection: forget it at once if
        idle, so stats and the idle set stay true; a busy one is forgotten
        when its request releases it."""
        if self._leases.get(conn) == 0:
            self._discard(conn)
            self._wake_one()

    def _discard(self, conn: UpstreamConnection) -> None:
        if self._leases.pop(conn, None) is None:
            return
        self._served.pop(conn, None)
        self._limits.pop(conn, None)
        self._idle_since.pop(conn, None)
        self._stats.cx_active.dec()
        self._stats.cx_destroy.inc()
        self._host.cx_active -= 1
        if self._resources is not None:
            self._resources.release_connection()
        conn.close()

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def wake_one(self) -> None:
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def drain(self) -> None:
        """Stop taking requests; close idle connections now and busy ones
        as their requests finish."""
        self._draining = True
        for conn in [c for c, n in self._leases.items() if n == 0]:
            self._discard(conn)
        self._wake_all()

    def close(self) -> None:
        """Close every connection now (shutdown)."""
        self._closed = True
        for conn in list(self._leases):
            self._discard(conn)
        self._idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._wake_all()
