"""Active health checking: probe every host of a cluster on a timer.

One task per host. Each check opens its own connection through the cluster
(so TLS clusters are checked over TLS) and either sends a plain HTTP/1.1
request and compares the status with ``expected_statuses``, or, for TCP,
connects and optionally sends bytes and looks for the expected reply
payloads (each must appear, in order, not necessarily contiguous).

State follows Envoy: a host starts as failed (``/failed_active_hc``) until
its first check; the first success makes it healthy at once, later it takes
``healthy_threshold`` successes in a row to come back and
``unhealthy_threshold`` failures in a row to go out. The next check comes
after ``interval`` (``unhealthy_interval`` while the host is failed, and
``no_traffic_interval`` while the cluster has never opened a connection for
traffic), plus jitter. The transition decisions are ``HostHealth.observe``,
free of I/O.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, cast

from meshlet.config.model import Cluster, HealthCheckConfig, HealthCheckKind
from meshlet.proxy.http.h1_client import H1ClientConnection
from meshlet.proxy.http.stream import RequestHead, StreamReset
from meshlet.proxy.observe.stats import Scope
from meshlet.proxy.transport import AppProtocolFactory

# The most a TCP check keeps of the reply while looking for its payloads.
_TCP_RECEIVE_LIMIT = 64 * 1024
_USER_AGENT = "meshlet/hc"


class CheckedHost(Protocol):
    """A host as the checker sees it: hashable, with the active-check flag."""

    failed_active_hc: bool

    def __hash__(self) -> int: ...


HostT = TypeVar("HostT", bound=CheckedHost)
HostIn = TypeVar("HostIn", bound=CheckedHost, contravariant=True)


class ClusterForChecks(Protocol[HostIn]):
    """What a health checker needs of its cluster."""

    config: Cluster

    async def open_connection(
        self, host: HostIn, app_factory: AppProtocolFactory
    ) -> asyncio.BaseProtocol: ...

    @property
    def has_traffic(self) -> bool: ...


class HostHealth:
    """One host's run of check results; decides when it flips."""

    __slots__ = ("checked", "failures", "successes")

    def __init__(self) -> None:
        self.checked = False
        self.successes = 0
        self.failures = 0

    def observe(self, ok: bool, failed_now: bool, cfg: HealthCheckConfig) -> bool | None:
        """Feed one result for a host currently failed (``failed_now``) or
        not. Returns the new "failed" state when it changes, else None."""
        first = not self.checked
        self.checked = True
        if ok:
            self.failures = 0
            self.successes += 1
            if failed_now and (first or self.successes >= cfg.healthy_threshold):
                return False
            return None
        self.successes = 0
        self.failures += 1
        if not failed_now and self.failures >= cfg.unhealthy_threshold:
            return True
        return None


class _Stats:
    def __init__(self, scope: Scope) -> None:
        self.attempt = scope.counter("health_check.attempt")
        self.success = scope.counter("health_check.success")
        self.failure = scope.counter("health_check.failure")
        self.network_failure = scope.counter("health_check.network_failure")
        self.healthy = scope.gauge("health_check.healthy")


class _TcpProbe(asyncio.Protocol):
    """Collects what the server sends (bounded) for a TCP check."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.changed = asyncio.Event()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        room = _TCP_RECEIVE_LIMIT - len(self.received)
        self.received += data[:room]
        self.changed.set()

    def eof_received(self) -> bool:
        self.closed = True
        self.changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()


def payloads_found(received: bytes, expected: tuple[bytes, ...]) -> bool:
    """Every expected block occurs in ``received``, in order."""
    at = 0
    for block in expected:
        found = received.find(block, at)
        if found < 0:
            return False
        at = found + len(block)
    return True


class HealthChecker(Generic[HostT]):
    """Checks every host of one cluster per one ``HealthCheckConfig``."""

    def __init__(
        self,
        config: HealthCheckConfig,
        cluster: ClusterForChecks[HostT],
        scope: Scope,
        on_change: Callable[[HostT | None], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._cluster = cluster
        self._stats = _Stats(scope)
        self._on_change = on_change
        self._clock = clock
        self._rng = rng or random.Random()
        self._state: dict[HostT, HostHealth] = {}
        self._tasks: dict[HostT, asyncio.Task[None]] = {}
        self._running = False

    @property
    def first_round_done(self) -> bool:
        return all(s.checked for s in self._state.values())

    def set_hosts(self, hosts: list[HostT]) -> None:
        wanted = set(hosts)
        for host in [h for h in self._state if h not in wanted]:
            del self._state[host]
            task = self._tasks.pop(host, None)
            if task is not None:
                task.cancel()
        for host in hosts:
            if host not in self._state:
                self._state[host] = HostHealth()
                if self._running:
                    self._spawn(host)
        self._publish()

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        for host in self._state:
            self._spawn(host)

    def stop(self) -> None:
        self._running = False
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    def _spawn(self, host: HostT) -> None:
        self._tasks[host] = asyncio.get_running_loop().create_task(self._run(host))

    async def _run(self, host: HostT) -> None:
        cfg = self.config
        if cfg.initial_jitter:
            await asyncio.sleep(self._rng.random() * cfg.initial_jitter)
        while True:
            ok = await self.check_once(host)
            self._record(host, ok)
            await asyncio.sleep(self.next_interval(host))

    def _record(self, host: HostT, ok: bool) -> None:
        state = self._state.get(host)
        if state is None:  # removed while its check ran
            return
        first = not state.checked
        (self._stats.success if ok else self._stats.failure).inc()
        flipped = state.observe(ok, host.failed_active_hc, self.config)
        if flipped is not None:
            host.failed_active_hc = flipped
            self._publish()
            self._on_change(host)
        elif first and self.first_round_done:
            # Lets the cluster see that the first round is complete.
            self._on_change(None)

    def _publish(self) -> None:
        self._stats.healthy.set(sum(1 for h in self._state if not h.failed_active_hc))

    def next_interval(self, host: HostT) -> float:
        cfg = self.config
        if not self._cluster.has_traffic:
            base = cfg.no_traffic_interval
            if not host.failed_active_hc and cfg.no_traffic_healthy_interval is not None:
                base = cfg.no_traffic_healthy_interval
        elif host.failed_active_hc and cfg.unhealthy_interval is not None:
            base = cfg.unhealthy_interval
        else:
            base = cfg.interval
        jitter = self._rng.random() * cfg.interval_jitter
        jitter += base * cfg.interval_jitter_percent / 100.0 * self._rng.random()
        return base + jitter

    # -- one check ---------------------------------------------------------- #

    async def check_once(self, host: HostT) -> bool:
        """One probe of ``host``, bounded by the check's timeout."""
        self._stats.attempt.inc()
        try:
            async with asyncio.timeout(self.config.timeout):
                if self.config.kind is HealthCheckKind.HTTP:
                    return await self._http_check(host)
                return await self._tcp_check(host)
        except (TimeoutError, StreamReset):
            return False
        except Exception:  # connect failures and anything the network throws
            self._stats.network_failure.inc()
            return False

    async def _http_check(self, host: HostT) -> bool:
        cfg, cluster = self.config, self._cluster
        buffer_limit = cluster.config.per_connection_buffer_limit_bytes
        conn = await cluster.open_connection(
            host, lambda _sec: H1ClientConnection(buffer_limit=buffer_limit)
        )
        assert isinstance(conn, H1ClientConnection)
        try:
            headers = [
                (name, value)
                for name, value in cfg.request_headers
                if name not in cfg.request_headers_to_remove
            ]
            if "user-agent" not in cfg.request_headers_to_remove:
                headers.append(("user-agent", _USER_AGENT))
            headers.append(("connection", "close"))
            scheme = "https" if cluster.config.transport_socket.tls is not None else "http"
            head = RequestHead(cfg.method, scheme, cfg.host or cluster.config.name, cfg.path, headers)
            response = await conn.request(head, None)
            status = response.head.status
            return any(start <= status < end for start, end in cfg.expected_statuses)
        finally:
            conn.close()

    async def _tcp_check(self, host: HostT) -> bool:
        cfg = self.config
        probe = await self._cluster.open_connection(host, lambda _sec: _TcpProbe())
        assert isinstance(probe, _TcpProbe)
        try:
            if cfg.send and probe.transport is not None:
                probe.transport.write(cfg.send)
            while not payloads_found(bytes(probe.received), cfg.receive):
                if probe.closed or len(probe.received) >= _TCP_RECEIVE_LIMIT:
                    return False
                probe.changed.clear()
                await probe.changed.wait()
            return True
        finally:
            if probe.transport is not None:
                probe.transport.close()
