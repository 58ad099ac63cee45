"""One cluster's live state: hosts, load balancer, pools, stats.

``ClusterRuntime`` is built from a ``config.model.Cluster`` and lives as long
as that config does. Hosts come from the static load assignment or from
STRICT_DNS resolution; each host owns one connection pool per upstream
protocol. Connecting is TCP (``loop.create_connection``), then the cluster's
transport socket (plain or TLS), then the HTTP/1.1 or HTTP/2 client codec
(with ALPN deciding for ``auto``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from meshlet.config.model import (
    Cluster,
    DiscoveryType,
    Endpoint,
    HealthStatus,
    TransportSocketConfig,
    UpstreamProtocol,
)
from meshlet.errors import UnsupportedConfig
from meshlet.proxy.http.h1_client import H1ClientConnection
from meshlet.proxy.http.h2_client import H2ClientConnection
from meshlet.proxy.http.stream import UpstreamConnection
from meshlet.proxy.observe.stats import Counter, Scope
from meshlet.proxy.transport import (
    PLAIN,
    AppProtocolFactory,
    HandshakeError,
    SecurityInfo,
    TransportSocketFactory,
)
from meshlet.proxy.upstream.dns import DnsRefresher
from meshlet.proxy.upstream.lb import LoadBalancer, make_lb
from meshlet.proxy.upstream.pool import (
    ConnectionPool,
    ConnectionStats,
    HostCounters,
    LostFn,
    UpstreamConnectError,
)

if TYPE_CHECKING:
    from meshlet.proxy.runtime import ProxyRuntime

_HEALTHY = frozenset({HealthStatus.UNKNOWN, HealthStatus.HEALTHY, HealthStatus.DEGRADED})

# Pool kinds: the codec a pool's connections speak.
HTTP1 = "http1"
HTTP2 = "http2"
AUTO = "auto"  # ALPN decides per connection (TLS only)


class ClusterStats:
    """``cluster.<name>.*`` stats, looked up once per cluster."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope
        self.rq_total = scope.counter("upstream_rq_total")
        self.rq_completed = scope.counter("upstream_rq_completed")
        self.rq_active = scope.gauge("upstream_rq_active")
        self.rq_timeout = scope.counter("upstream_rq_timeout")
        self.rq_rx_reset = scope.counter("upstream_rq_rx_reset")
        self.rq_tx_reset = scope.counter("upstream_rq_tx_reset")
        self.rq_time = scope.histogram("upstream_rq_time")
        self.cx_none_healthy = scope.counter("upstream_cx_none_healthy")
        self.membership_total = scope.gauge("membership_total")
        self.membership_healthy = scope.gauge("membership_healthy")
        self.update_attempt = scope.counter("update_attempt")
        self.update_success = scope.counter("update_success")
        self.update_failure = scope.counter("update_failure")
        self.connections = ConnectionStats(
            cx_total=scope.counter("upstream_cx_total"),
            cx_active=scope.gauge("upstream_cx_active"),
            cx_connect_fail=scope.counter("upstream_cx_connect_fail"),
            cx_connect_timeout=scope.counter("upstream_cx_connect_timeout"),
            cx_destroy=scope.counter("upstream_cx_destroy"),
            cx_idle_timeout=scope.counter("upstream_cx_idle_timeout"),
            cx_max_requests=scope.counter("upstream_cx_max_requests"),
            rq_pending_total=scope.counter("upstream_rq_pending_total"),
            rq_pending_overflow=scope.counter("upstream_rq_pending_overflow"),
            rq_pending_active=scope.gauge("upstream_rq_pending_active"),
        )
        self._by_code: dict[int, tuple[Counter, Counter]] = {}

    def response(self, status: int, elapsed_ms: float) -> None:
        """Count a response from upstream: ``upstream_rq_<code>`` and ``_<N>xx``."""
        pair = self._by_code.get(status)
        if pair is None:
            pair = self._by_code[status] = (
                self._scope.counter(f"upstream_rq_{status}"),
                self._scope.counter(f"upstream_rq_{status // 100}xx"),
            )
        pair[0].inc()
        pair[1].inc()
        self.rq_completed.inc()
        self.rq_time.record(elapsed_ms)


class Host:
    """One upstream endpoint and its pools."""

    __slots__ = ("_cluster", "_pools", "address", "counters", "health", "hostname", "weight")

    def __init__(self, cluster: ClusterRuntime, endpoint: Endpoint) -> None:
        self._cluster = cluster
        self.address = endpoint.address
        self.weight = max(endpoint.weight, 1)
        self.health = endpoint.health_status
        self.hostname = endpoint.hostname
        self.counters = HostCounters()
        self._pools: dict[str, ConnectionPool] = {}

    @property
    def healthy(self) -> bool:
        return self.health in _HEALTHY

    @property
    def active_requests(self) -> int:
        return self.counters.rq_active

    @property
    def address_text(self) -> str:
        return str(self.address)

    def pool(self, kind: str) -> ConnectionPool:
        pool = self._pools.get(kind)
        if pool is None:
            pool = self._pools[kind] = self._cluster.new_pool(self, kind)
        return pool

    @property
    def connection_count(self) -> int:
        return sum(p.connection_count for p in self._pools.values())

    def drain(self) -> None:
        for pool in self._pools.values():
            pool.drain()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()

    def describe(self) -> dict[str, object]:
        c = self.counters
        return {
            "address": self.address_text,
            "hostname": self.hostname,
            "weight": self.weight,
            "health": self.health.value,
            "healthy": self.healthy,
            "active_requests": c.rq_active,
            "connections": self.connection_count,
            "rq_total": c.rq_total,
            "rq_error": c.rq_error,
            "cx_active": c.cx_active,
            "cx_total": c.cx_total,
            "cx_connect_fail": c.cx_connect_fail,
        }


CodecFactory = Callable[[str, Cluster, SecurityInfo], asyncio.BaseProtocol]


def default_codec(kind: str, cluster: Cluster, security: SecurityInfo) -> asyncio.BaseProtocol:
    """The client codec for a new connection: HTTP/2 for ``http2`` and for
    ``auto`` when ALPN chose h2, HTTP/1.1 otherwise."""
    buffer_limit = cluster.per_connection_buffer_limit_bytes
    if kind == HTTP2 or (kind == AUTO and security.alpn == "h2"):
        return H2ClientConnection(cluster.http2, buffer_limit=buffer_limit)
    return H1ClientConnection(buffer_limit=buffer_limit)


def transport_factory(cfg: TransportSocketConfig, default_engine: str) -> TransportSocketFactory:
    if cfg.tls is None:
        return PLAIN
    from meshlet.proxy.listeners.transport_sockets import make_factory

    return make_factory(cfg, default_engine=default_engine)


# Bytes a server may send before its connection is handed over (servers
# that speak first: SMTP, MySQL...); past this, reading pauses.
_EARLY_DATA_LIMIT = 64 * 1024


class _PreHandshake(asyncio.Protocol):
    """Holds a fresh TCP connection until the transport socket takes it over,
    keeping what the server sends in the meantime."""

    def __init__(self) -> None:
        self.early = bytearray()
        self.eof = False
        self.lost = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.early += data
        if len(self.early) >= _EARLY_DATA_LIMIT and self._transport is not None:
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the application protocol decides once it is installed

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class _LossNotifier(asyncio.Protocol):
    """Sits in front of a client codec to tell the pool when its connection
    closes (codecs have no close callback of their own)."""

    __slots__ = ("_on_lost", "codec")

    def __init__(self, codec: asyncio.BaseProtocol, on_lost: LostFn) -> None:
        self.codec = cast(asyncio.Protocol, codec)
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.codec.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.codec.data_received(data)

    def eof_received(self) -> bool | None:
        return self.codec.eof_received()

    def pause_writing(self) -> None:
        self.codec.pause_writing()

    def resume_writing(self) -> None:
        self.codec.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.codec.connection_lost(exc)
        self._on_lost(cast(UpstreamConnection, self.codec))


class ClusterRuntime:
    def __init__(
        self,
        config: Cluster,
        runtime: ProxyRuntime,
        *,
        transport: TransportSocketFactory | None = None,
        codec_factory: CodecFactory = default_codec,
    ) -> None:
        if config.discovery is DiscoveryType.EDS:
            raise UnsupportedConfig("type", "EDS clusters are not supported yet")
        self.name = config.name
        self.config = config
        self.stats = ClusterStats(runtime.stats.scope("cluster.", "envoy_cluster_name", config.name))
        self.transport = transport or transport_factory(config.transport_socket, runtime.settings.tls_engine)
        self._codec_factory = codec_factory
        self._lb: LoadBalancer[Host] = cast(LoadBalancer[Host], make_lb(config.lb_policy))
        self.hosts: list[Host] = []
        self._dns: DnsRefresher | None = None
        self._ready = asyncio.Event()
        self._closed = False
        endpoints = config.load_assignment.all_endpoints() if config.load_assignment else ()
        if config.discovery is DiscoveryType.STATIC:
            self.set_endpoints(endpoints)
        else:
            self._dns = DnsRefresher(
                endpoints,
                lookup_family=config.dns_lookup_family,
                refresh_rate=config.dns_refresh_rate,
                on_update=self.set_endpoints,
                attempts=self.stats.update_attempt,
                successes=self.stats.update_success,
                failures=self.stats.update_failure,
            )

    # -- membership -------------------------------------------------------- #

    def start(self) -> None:
        """Start background work (DNS refresh). Needs a running loop."""
        if self._dns is not None:
            self._dns.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout: float | None) -> bool:
        """Wait for the first host set (STRICT_DNS); True once there is one."""
        if self._ready.is_set():
            return True
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace membership, keeping Host objects (and their pools) for
        addresses still present; removed hosts drain."""
        current = {h.address: h for h in self.hosts}
        hosts: list[Host] = []
        for ep in endpoints:
            host = current.pop(ep.address, None)
            if host is None:
                host = Host(self, ep)
            else:
                host.weight = max(ep.weight, 1)
                host.health = ep.health_status
            hosts.append(host)
        for gone in current.values():
            gone.drain()
        self.hosts = hosts
        self._lb.set_hosts(hosts)
        self.stats.membership_total.set(len(hosts))
        self.stats.membership_healthy.set(sum(1 for h in hosts if h.healthy))
        self._ready.set()

    def choose_host(self) -> Host | None:
        host = self._lb.choose()
        if host is None:
            self.stats.cx_none_healthy.inc()
        return host

    # -- pools ------------------------------------------------------------- #

    def pool_kind(self, downstream_version: str) -> str:
        """Which codec to use upstream for a request that arrived as ``downstream_version``."""
        proto = self.config.protocol
        if proto is UpstreamProtocol.HTTP2:
            return HTTP2
        if proto is UpstreamProtocol.DOWNSTREAM:
            return HTTP2 if downstream_version == "2" else HTTP1
        if proto is UpstreamProtocol.AUTO and self.transport.is_tls:
            return AUTO
        return HTTP1

    def new_pool(self, host: Host, kind: str) -> ConnectionPool:
        cfg = self.config
        max_streams = min(cfg.http2.max_concurrent_streams, 1 << 20)

        def stream_limit(conn: UpstreamConnection) -> int:
            return max_streams if _is_multiplexed(conn) else 1

        return ConnectionPool(
            lambda on_lost: self._connect(host, kind, on_lost),
            stats=self.stats.connections,
            host=host.counters,
            multiplexed=kind == HTTP2,
            max_streams=max_streams,
            stream_limit=stream_limit,
            idle_timeout=cfg.idle_timeout,
            max_requests_per_connection=cfg.max_requests_per_connection,
        )

    async def _connect(self, host: Host, kind: str, on_lost: LostFn) -> UpstreamConnection:
        def codec(security: SecurityInfo) -> asyncio.BaseProtocol:
            return _LossNotifier(self._codec_factory(kind, self.config, security), on_lost)

        notifier = await self.open_connection(host, codec)
        assert isinstance(notifier, _LossNotifier)
        return cast(UpstreamConnection, notifier.codec)

    async def open_connection(self, host: Host, app_factory: AppProtocolFactory) -> asyncio.BaseProtocol:
        """TCP connect to ``host`` and run the cluster's transport socket, all
        within ``connect_timeout``; returns the protocol ``app_factory`` built.
        Raises ``UpstreamConnectError``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.connect_timeout
        addr = host.address
        try:
            raw, _ = await asyncio.wait_for(
                loop.create_connection(_PreHandshake, addr.host, addr.port), self.config.connect_timeout
            )
        except TimeoutError:
            self.stats.connections.cx_connect_timeout.inc()
            raise UpstreamConnectError("connection timeout", f"connecting to {addr}") from None
        except OSError as exc:
            raise UpstreamConnectError("connection failure", f"{addr}: {exc.strerror or exc}") from None
        pre = cast(_PreHandshake, raw.get_protocol())
        try:
            return await self._hand_over(raw, pre, app_factory, self._sni(host), deadline - loop.time())
        except TimeoutError:
            raw.abort()
            self.stats.connections.cx_connect_timeout.inc()
            raise UpstreamConnectError("connection timeout", f"handshake with {addr}") from None
        except Exception as exc:
            raw.abort()
            raise UpstreamConnectError("connection failure", f"{addr}: {exc}") from None

    async def _hand_over(
        self,
        raw: asyncio.Transport,
        pre: _PreHandshake,
        app_factory: AppProtocolFactory,
        sni: str | None,
        timeout: float,
    ) -> asyncio.BaseProtocol:
        """Start the transport socket on ``raw`` with whatever the server sent
        already, and wait for the application protocol."""
        if pre.lost:
            raise ConnectionError("closed by the upstream before the handshake")
        done: asyncio.Future[asyncio.BaseProtocol] = asyncio.get_running_loop().create_future()

        def factory(security: SecurityInfo) -> asyncio.BaseProtocol:
            proto = app_factory(security)
            if not done.done():
                done.set_result(proto)
            return proto

        def failed(err: HandshakeError) -> None:
            if not done.done():
                done.set_exception(err)

        early = bytes(pre.early)
        self.transport.create(server_hostname=sni).start(raw, factory, initial_data=early, on_failure=failed)
        if len(early) >= _EARLY_DATA_LIMIT:
            raw.resume_reading()
        if pre.eof:
            current = raw.get_protocol()
            if isinstance(current, asyncio.Protocol) and not current.eof_received():
                raw.close()
        return await asyncio.wait_for(done, max(timeout, 0.001))

    def _sni(self, host: Host) -> str | None:
        tls = self.config.transport_socket.tls
        if tls is None:
            return None
        return tls.sni or host.hostname or None

    # -- lifecycle --------------------------------------------------------- #

    def drain(self) -> None:
        """The cluster was removed or replaced: finish in-flight requests, then close."""
        self._closed = True
        if self._dns is not None:
            self._dns.stop()
        for host in self.hosts:
            host.drain()

    def close(self) -> None:
        self._closed = True
        if self._dns is not None:
            self._dns.stop()
        for host in self.hosts:
            host.close()

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "type": self.config.discovery.value,
            "lb_policy": self.config.lb_policy.value,
            "protocol": self.config.protocol.value,
            "hosts": [h.describe() for h in self.hosts],
        }


def _is_multiplexed(conn: UpstreamConnection) -> bool:
    return isinstance(conn, H2ClientConnection)
