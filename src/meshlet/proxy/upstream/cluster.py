"""One cluster's live state: hosts, load balancer, pools, stats.

``ClusterRuntime`` is built from a ``config.model.Cluster`` and lives as long
as that config does. Hosts come from the static load assignment or from
STRICT_DNS resolution; each host owns one connection pool per upstream
protocol. Connecting is TCP (``loop.create_connection``), then the cluster's
transport socket (plain or TLS), then the HTTP/1.1 or HTTP/2 client codec
(with ALPN deciding for ``auto``).

A host is healthy when its EDS status allows it, active health checking has
not failed it (``health.py``) and outlier detection has not ejected it
(``outlier.py``); every change of those rebuilds the load balancer
(``lb.py``). Circuit breakers (``circuit_breaker.py``) bound connections,
pending requests, requests and retries per priority.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from meshlet.config.model import (
    Cluster,
    DiscoveryType,
    Endpoint,
    HealthStatus,
    LocalityEndpoints,
    TransportSocketConfig,
    UpstreamProtocol,
)
from meshlet.errors import UnsupportedConfig
from meshlet.proxy.http.h1_client import H1ClientConnection
from meshlet.proxy.http.stream import UpstreamConnection
from meshlet.proxy.observe.stats import Counter, Scope
from meshlet.proxy.transport import (
    PLAIN,
    AppProtocolFactory,
    HandshakeError,
    SecurityInfo,
    TransportSocketFactory,
)
from meshlet.proxy.upstream.circuit_breaker import CircuitBreakerSet, ResourceManager
from meshlet.proxy.upstream.dns import DnsRefresher
from meshlet.proxy.upstream.health import HealthChecker
from meshlet.proxy.upstream.lb import ClusterLoadBalancer, LbContext
from meshlet.proxy.upstream.outlier import OutlierDetector, OutlierState
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
        pair[0].value += 1
        pair[1].value += 1
        self.rq_completed.value += 1
        self.rq_time.record(elapsed_ms)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an endpoint sits in its cluster: priority and locality."""

    priority: int = 0
    locality: str = ""
    locality_weight: int | None = None


NO_PLACEMENT = Placement()


class Host:
    """One upstream endpoint and its pools."""

    __slots__ = (
        "_cluster",
        "_pools",
        "address",
        "address_key",
        "counters",
        "failed_active_hc",
        "health",
        "healthy",
        "hostname",
        "locality",
        "locality_weight",
        "outlier",
        "priority",
        "slow_start_since",
        "was_healthy",
        "weight",
    )

    def __init__(
        self, cluster: ClusterRuntime, endpoint: Endpoint, placement: Placement = NO_PLACEMENT
    ) -> None:
        self._cluster = cluster
        self.address = endpoint.address
        self.address_key = str(endpoint.address)
        self.weight = max(endpoint.weight, 1)
        self.health = endpoint.health_status
        self.hostname = endpoint.hostname
        self.priority = placement.priority
        self.locality = placement.locality
        self.locality_weight = placement.locality_weight
        self.counters = HostCounters()
        # Active health checking starts every host as failed until its first
        # check passes (Envoy's FAILED_ACTIVE_HC on a new host).
        self.failed_active_hc = bool(cluster.config.health_checks)
        self.outlier = OutlierState()
        # When the host's weight ramp (slow start) began; None: not ramping.
        self.slow_start_since: float | None = None
        self.healthy = True
        # Whether it ever was healthy: its first health check passing is not
        # a return to service (no slow start for the initial membership).
        self.was_healthy = False
        self._pools: dict[str, ConnectionPool] = {}
        self.update_health()

    def update_health(self) -> bool:
        """Recompute ``healthy`` from the EDS status, active health checking
        and outlier ejection; True when it changed."""
        healthy = self.health in _HEALTHY and not self.failed_active_hc and not self.outlier.ejected
        changed = healthy != self.healthy
        self.healthy = healthy
        return changed

    def mark_seen_healthy(self) -> bool:
        """Note that the host is healthy now; True if it had been before."""
        before = self.was_healthy
        self.was_healthy = self.was_healthy or self.healthy
        return before

    def record_result(self, status: int) -> None:
        """One request's outcome for outlier detection: the upstream's status
        code, or the 5xx the proxy answered for a failure (503 for connect
        failures and resets, 504 for timeouts)."""
        detector = self._cluster.outlier
        if detector is not None:
            detector.record(self, status)

    @property
    def health_flags(self) -> str:
        """Envoy's ``/clusters`` health_flags text."""
        flags = ""
        if self.failed_active_hc:
            flags += "/failed_active_hc"
        if self.outlier.ejected:
            flags += "/failed_outlier_check"
        if self.health not in _HEALTHY:
            flags += "/failed_eds_health"
        return flags or "healthy"

    @property
    def active_requests(self) -> int:
        return self.counters.rq_active

    @property
    def address_text(self) -> str:
        # Formatted once (in __init__): the router sets it on every request's stream info.
        return self.address_key

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
            "health_flags": self.health_flags,
            "failed_active_health_check": self.failed_active_hc,
            "failed_outlier_check": self.outlier.ejected,
            "priority": self.priority,
            "locality": self.locality,
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
        # Imported with the first HTTP/2 upstream: h2 and hpack cost a proxy
        # that never speaks HTTP/2 upstream about 5 MB resident.
        from meshlet.proxy.http.h2_client import H2ClientConnection

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.discovery is DiscoveryType.EDS and config.load_assignment is None:
            raise UnsupportedConfig("type", "an EDS cluster needs its endpoints from EDS")
        self.name = config.name
        self.config = config
        self._clock = clock
        scope = runtime.stats.scope("cluster.", "envoy_cluster_name", config.name)
        self.stats = ClusterStats(scope)
        self.transport = transport or transport_factory(config.transport_socket, runtime.settings.tls_engine)
        self._codec_factory = codec_factory
        self._lb: ClusterLoadBalancer[Host] = ClusterLoadBalancer(config.lb_policy, config.lb, clock=clock)
        self.circuit_breakers = CircuitBreakerSet(config.circuit_breakers, scope)
        self.outlier: OutlierDetector[Host] | None = None
        if config.outlier_detection is not None:
            self.outlier = OutlierDetector(
                config.outlier_detection, scope, self._ejection_changed, clock=clock
            )
        self.health_checkers = [
            HealthChecker(hc, self, scope, self._health_changed, clock=clock) for hc in config.health_checks
        ]
        self.hosts: list[Host] = []
        self._dns: DnsRefresher | None = None
        self._ready = asyncio.Event()
        self._has_hosts = False
        self._closed = False
        localities = config.load_assignment.localities if config.load_assignment else ()
        self._placements = _placements(localities, by_name=config.discovery is DiscoveryType.STRICT_DNS)
        endpoints = config.load_assignment.all_endpoints() if config.load_assignment else ()
        if config.discovery is not DiscoveryType.STRICT_DNS:
            # STATIC, or EDS: the xDS client compiled the assignment into the config.
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
        """Start background work (DNS refresh, health checks, outlier
        sweeps). Needs a running loop."""
        if self._dns is not None:
            self._dns.start()
        for checker in self.health_checkers:
            checker.start()
        if self.outlier is not None:
            self.outlier.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout: float | None) -> bool:
        """Wait for the first host set (STRICT_DNS) and, with active health
        checking, the first check of every host; True once that happened."""
        if self._ready.is_set():
            return True
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _update_ready(self) -> None:
        if self._has_hosts and all(c.first_round_done for c in self.health_checkers):
            self._ready.set()

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace membership, keeping Host objects (and their pools, health
        and outlier state) for addresses still present; removed hosts drain.
        Hosts added after the first set ramp up under slow start."""
        current = {h.address: h for h in self.hosts}
        hosts: list[Host] = []
        for ep in endpoints:
            host = current.pop(ep.address, None)
            placement = self._placement_of(ep)
            if host is None:
                host = Host(self, ep, placement)
                host.mark_seen_healthy()
                if self._has_hosts:
                    host.slow_start_since = self._clock()
            else:
                host.weight = max(ep.weight, 1)
                host.health = ep.health_status
                host.priority = placement.priority
                host.locality = placement.locality
                host.locality_weight = placement.locality_weight
                host.update_health()
            hosts.append(host)
        for gone in current.values():
            gone.drain()
        self.hosts = hosts
        self._has_hosts = True
        for checker in self.health_checkers:
            checker.set_hosts(hosts)
        if self.outlier is not None:
            self.outlier.set_hosts(hosts)
        self._rebuild_lb()
        self._update_ready()

    def _placement_of(self, ep: Endpoint) -> Placement:
        placements = self._placements
        if not placements:
            return NO_PLACEMENT
        return placements.get((ep.hostname or ep.address.host, ep.address.port)) or placements.get(
            (ep.address.host, ep.address.port), NO_PLACEMENT
        )

    def _ejection_changed(self, host: Host) -> None:
        """Outlier detection ejected or re-admitted a host (no slow start:
        as in Envoy, only new hosts and passed health checks ramp up)."""
        host.update_health()
        self._rebuild_lb()

    def _health_changed(self, host: Host | None = None) -> None:
        """Active health checking changed a host's state (None: a first
        round of checks completed without changing anything)."""
        if host is not None:
            became_healthy = not host.healthy
            if host.update_health() and became_healthy:
                returning = host.mark_seen_healthy()
                if returning and self._lb_slow_start:
                    host.slow_start_since = self._clock()
        self._rebuild_lb()
        self._update_ready()

    @property
    def _lb_slow_start(self) -> bool:
        return self.config.lb.slow_start is not None

    def _rebuild_lb(self) -> None:
        self._lb.set_hosts(self.hosts)
        self.stats.membership_total.set(len(self.hosts))
        self.stats.membership_healthy.set(sum(1 for h in self.hosts if h.healthy))

    def choose_host(self, context: LbContext | None = None) -> Host | None:
        """A host for one request. With a context that lists hosts already
        tried, up to ``host_selection_attempts`` picks avoid them (the last
        pick stands even if it was tried)."""
        lb = self._lb
        host = lb.choose(context)
        if context is not None and context.tried:
            attempts = max(context.host_selection_attempts, 1)
            while host is not None and host in context.tried and context.attempt + 1 < attempts:
                context.attempt += 1
                host = lb.choose(context)
            context.attempt = 0
        if host is None:
            self.stats.cx_none_healthy.inc()
        return host

    def resources(self, priority: str = "DEFAULT") -> ResourceManager:
        """The circuit breakers of ``priority`` ("DEFAULT" or "HIGH")."""
        return self.circuit_breakers.for_priority(priority)

    @property
    def in_panic(self) -> bool:
        return self._lb.in_panic

    @property
    def has_traffic(self) -> bool:
        """Whether the cluster ever opened a connection for traffic (health
        checks use ``no_traffic_interval`` until it has)."""
        return self.stats.connections.cx_total.value > 0

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
            resources=self.circuit_breakers.default,
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

    def _stop_background(self) -> None:
        if self._dns is not None:
            self._dns.stop()
        for checker in self.health_checkers:
            checker.stop()
        if self.outlier is not None:
            self.outlier.stop()

    def drain(self) -> None:
        """The cluster was removed or replaced: finish in-flight requests, then close."""
        self._closed = True
        self._stop_background()
        for host in self.hosts:
            host.drain()

    def close(self) -> None:
        self._closed = True
        self._stop_background()
        for host in self.hosts:
            host.close()

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "type": self.config.discovery.value,
            "lb_policy": self.config.lb_policy.value,
            "protocol": self.config.protocol.value,
            "in_panic": self.in_panic,
            "hosts": [h.describe() for h in self.hosts],
        }


PlacementKey = tuple[str, int]


def _placements(localities: Sequence[LocalityEndpoints], *, by_name: bool) -> dict[PlacementKey, Placement]:
    """Each endpoint's placement by (address or DNS name, port); empty when
    every endpoint is in one unnamed P0 locality (nothing to look up)."""
    out: dict[PlacementKey, Placement] = {}
    for loc in localities:
        placement = Placement(loc.priority, loc.locality, loc.weight)
        if placement == NO_PLACEMENT:
            continue
        for ep in loc.endpoints:
            name = ep.hostname if by_name and ep.hostname else ep.address.host
            out[(name, ep.address.port)] = placement
            out.setdefault((ep.address.host, ep.address.port), placement)
    return out


def _is_multiplexed(conn: UpstreamConnection) -> bool:
    # No HTTP/2 client connection exists before its module was imported.
    h2_client = sys.modules.get("meshlet.proxy.http.h2_client")
    return h2_client is not None and isinstance(conn, h2_client.H2ClientConnection)
