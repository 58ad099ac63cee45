"""The TCP proxy (``envoy.filters.network.tcp_proxy``).

For each downstream connection: pick a host of the cluster, connect to it
through the cluster's transport socket, then pump bytes both ways.

- Backpressure: when one side's write buffer passes its high-water mark
  (``pause_writing``), reading from the other side pauses until it drains.
- Half-close: EOF from one side becomes ``write_eof`` on the other; the
  opposite direction stays open until its own EOF. The connection closes
  when both directions are done (or either side goes away).
- Idle timeout: no bytes either way for ``idle_timeout`` closes both sides.
- Connect failure (after ``max_connect_attempts`` hosts): downstream is closed.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from meshlet.config.model import TcpProxyConfig
from meshlet.proxy.observe.access_log import AccessLog, ResponseFlag, StreamInfo, build_access_logs
from meshlet.proxy.observe.stats import Counter, Gauge
from meshlet.proxy.runtime import ProxyRuntime
from meshlet.proxy.transport import ConnectionInfo, SecurityInfo
from meshlet.proxy.upstream.circuit_breaker import ResourceManager
from meshlet.proxy.upstream.cluster import ClusterRuntime, Host
from meshlet.proxy.upstream.pool import UpstreamConnectError

# Bytes read from downstream before the upstream connection is up; past it,
# downstream reading pauses.
_EARLY_DATA_LIMIT = 64 * 1024


class TcpProxyStats:
    """``tcp.<stat_prefix>.*``."""

    def __init__(self, runtime: ProxyRuntime, stat_prefix: str) -> None:
        scope = runtime.stats.scope("tcp.", "envoy_tcp_prefix", stat_prefix)
        self.cx_total: Counter = scope.counter("downstream_cx_total")
        self.cx_no_route: Counter = scope.counter("downstream_cx_no_route")
        self.cx_rx_bytes: Counter = scope.counter("downstream_cx_rx_bytes_total")
        self.cx_tx_bytes: Counter = scope.counter("downstream_cx_tx_bytes_total")
        self.cx_rx_buffered: Gauge = scope.gauge("downstream_cx_rx_bytes_buffered")
        self.paused_reading: Counter = scope.counter("downstream_flow_control_paused_reading_total")
        self.resumed_reading: Counter = scope.counter("downstream_flow_control_resumed_reading_total")
        self.idle_timeout: Counter = scope.counter("idle_timeout")
        self.upstream_flush_total: Counter = scope.counter("upstream_flush_total")
        self.upstream_flush_active: Gauge = scope.gauge("upstream_flush_active")


class TcpProxy:
    """One ``tcp_proxy`` filter config; ``protocol_for`` serves a new connection."""

    def __init__(self, config: TcpProxyConfig, runtime: ProxyRuntime, *, path: str = "tcp_proxy") -> None:
        self.config = config
        self.runtime = runtime
        self.stats = TcpProxyStats(runtime, config.stat_prefix)
        self.access_logs: tuple[AccessLog, ...] = build_access_logs(config.access_logs, f"{path}.access_log")

    def protocol_for(self, info: ConnectionInfo) -> asyncio.Protocol:
        return TcpProxySession(self, info)


class _Side(asyncio.Protocol):
    """One end of the pipe; forwards its events to the session."""

    def __init__(self, session: TcpProxySession, upstream: bool) -> None:
        self._session = session
        self._upstream = upstream

    def data_received(self, data: bytes) -> None:
        self._session.on_data(self._upstream, data)

    def eof_received(self) -> bool:
        return self._session.on_eof(self._upstream)

    def pause_writing(self) -> None:
        self._session.on_write_pressure(self._upstream, True)

    def resume_writing(self) -> None:
        self._session.on_write_pressure(self._upstream, False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._session.on_lost(self._upstream)


class TcpProxySession(asyncio.Protocol):
    """One proxied connection. It is itself the downstream protocol."""

    def __init__(self, proxy: TcpProxy, info: ConnectionInfo) -> None:
        self._proxy = proxy
        self._info = StreamInfo(connection=info)
        self._info.upstream_cluster = proxy.config.cluster
        self._down: asyncio.Transport | None = None
        self._up: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._eof_from = {False: False, True: False}  # keyed by "is upstream"
        self._closed = False
        self._connect_task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_activity = time.monotonic()
        self._cluster: ClusterRuntime | None = None
        self._host: Host | None = None
        # The cluster's max_connections circuit breaker, held for the session.
        self._breaker: ResourceManager | None = None

    # -- downstream protocol callbacks ------------------------------------ #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._down = cast(asyncio.Transport, transport)
        self._proxy.stats.cx_total.inc()
        self._connect_task = asyncio.get_running_loop().create_task(self._connect())
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self.on_data(False, data)

    def eof_received(self) -> bool:
        return self.on_eof(False)

    def pause_writing(self) -> None:
        self.on_write_pressure(False, True)

    def resume_writing(self) -> None:
        self.on_write_pressure(False, False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(False)

    # -- connecting -------------------------------------------------------- #

    async def _connect(self) -> None:
        cluster = self._proxy.runtime.cluster_manager().get(self._proxy.config.cluster)
        if cluster is None:
            self._proxy.stats.cx_no_route.inc()
            self._info.flags |= ResponseFlag.NC
            self._close()
            return
        self._cluster = cluster
        breaker = cluster.resources()
        if not breaker.try_acquire_connection():
            self._info.flags |= ResponseFlag.UO
            self._close()
            return
        self._breaker = breaker
        attempts = max(self._proxy.config.max_connect_attempts, 1)
        for attempt in range(attempts):
            host = cluster.choose_host()
            if host is None:
                self._info.flags |= ResponseFlag.UH
                break
            self._info.upstream_host = host.address_text
            cluster.stats.connections.cx_total.inc()
            host.counters.cx_total += 1
            try:
                await cluster.open_connection(host, self._upstream_protocol)
            except UpstreamConnectError as exc:
                cluster.stats.connections.cx_connect_fail.inc()
                host.counters.cx_connect_fail += 1
                self._info.flags |= ResponseFlag.UF
                self._info.upstream_failure_reason = str(exc)
                host.record_result(503)  # outlier detection: a gateway failure
                if attempt + 1 == attempts and attempts > 1:
                    self._info.flags |= ResponseFlag.URX
                continue
            host.record_result(200)  # connected: ends a run of failures
            cluster.stats.connections.cx_active.inc()
            host.counters.cx_active += 1
            self._host = host
            if self._closed:
                if self._up is not None:
                    self._up.close()
                return
            self._on_upstream_ready()
            return
        self._close()

    def _upstream_protocol(self, security: SecurityInfo) -> asyncio.BaseProtocol:
        return _UpstreamSide(self)

    def attach_upstream(self, transport: asyncio.Transport) -> None:
        self._up = transport

    def _on_upstream_ready(self) -> None:
        up = self._up
        if up is None:
            return
        if self._early:
            up.write(b"".join(self._early))
            self._early.clear()
            self._early_size = 0
        down = self._down
        if self._eof_from[False] and up.can_write_eof():
            up.write_eof()
        elif down is not None and not self._closed:
            down.resume_reading()

    # -- the pump ------------------------------------------------------------ #

    def on_data(self, from_upstream: bool, data: bytes) -> None:
        self._last_activity = time.monotonic()
        if from_upstream:
            self._info.bytes_sent += len(data)
            self._proxy.stats.cx_tx_bytes.inc(len(data))
            if self._down is not None:
                self._down.write(data)
            return
        self._info.bytes_received += len(data)
        self._proxy.stats.cx_rx_bytes.inc(len(data))
        if self._up is not None:
            self._up.write(data)
            return
        # Upstream not connected yet: hold a bounded amount, then stop reading.
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size >= _EARLY_DATA_LIMIT and self._down is not None:
            self._down.pause_reading()

    def on_eof(self, from_upstream: bool) -> bool:
        self._eof_from[from_upstream] = True
        other = self._down if from_upstream else self._up
        if other is not None and not other.is_closing():
            if other.can_write_eof():
                other.write_eof()
            else:
                # TLS cannot half-close: closing is the only way to pass EOF on.
                self._close()
                return False
        if self._eof_from[True] and self._eof_from[False]:
            self._close()
            return False
        return True  # keep the other direction open

    def on_write_pressure(self, upstream_is_full: bool, paused: bool) -> None:
        """``upstream_is_full``: the upstream write buffer passed high water
        (so stop reading downstream), else the downstream one did."""
        source = self._down if upstream_is_full else self._up
        if source is None or source.is_closing():
            return
        if paused:
            source.pause_reading()
            if upstream_is_full:
                self._proxy.stats.paused_reading.inc()
        else:
            source.resume_reading()
            if upstream_is_full:
                self._proxy.stats.resumed_reading.inc()

    def on_lost(self, upstream: bool) -> None:
        if upstream:
            self._up = None
            self._release_upstream_stats()
        else:
            self._down = None
        self._close()

    # -- idle timeout -------------------------------------------------------- #

    def _arm_idle_timer(self) -> None:
        timeout = self._proxy.config.idle_timeout
        if timeout is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        due = self._last_activity + timeout
        delay = max(due - time.monotonic(), 0.0)
        self._idle_timer = loop.call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        timeout = self._proxy.config.idle_timeout
        if timeout is None or self._closed:
            return
        if time.monotonic() - self._last_activity >= timeout:
            self._proxy.stats.idle_timeout.inc()
            self._close()
        else:
            self._arm_idle_timer()

    # -- teardown ------------------------------------------------------------ #

    def _release_upstream_stats(self) -> None:
        cluster, host = self._cluster, self._host
        if cluster is None or host is None:
            return
        cluster.stats.connections.cx_active.dec()
        cluster.stats.connections.cx_destroy.inc()
        host.counters.cx_active -= 1
        self._host = None

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._breaker is not None:
            self._breaker.release_connection()
            self._breaker = None
        task = self._connect_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        # close() (not abort) so bytes already queued still reach each side.
        if self._down is not None:
            self._down.close()
        if self._up is not None:
            self._up.close()
        self._info.finish()
        for log in self._proxy.access_logs:
            log.log(self._info)


class _UpstreamSide(_Side):
    def __init__(self, session: TcpProxySession) -> None:
        super().__init__(session, upstream=True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._session.attach_upstream(cast(asyncio.Transport, transport))
