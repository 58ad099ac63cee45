"""The listener manager: bound sockets, per-config listener runtimes, draining.

A config update is two-phase so that the proxy can swap atomically:

- ``prepare(listeners)`` builds everything a new config needs (filter chain
  selectors, transport socket factories, network filters such as the HTTP
  connection manager, new listening sockets bound but not yet serving) and
  raises ``ConfigError`` without touching what runs;
- ``commit(update)`` swaps it in: unchanged listeners keep their runtime and
  socket; a changed listener on the same address keeps its socket and takes
  new connections on the new runtime while existing ones drain on the old;
  removed (or moved) listeners stop accepting and drain.
- ``abort(update)`` throws a prepared update away.

Stats per listener (Envoy names, tag ``envoy_listener_address``):
``listener.<addr>.downstream_cx_total``, ``downstream_cx_active``,
``no_filter_chain_match``, ``downstream_pre_cx_timeout``, ``ssl.*``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from meshlet.config.model import (
    FilterChain,
    HttpConnectionManagerConfig,
    Listener,
    NetworkFilterConfig,
    TcpProxyConfig,
)
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.proxy.listeners.connection import AcceptedConnection, ConnectionRecord
from meshlet.proxy.listeners.filter_chain import ConnectionFacts, FilterChainSelector
from meshlet.proxy.listeners.transport_sockets import make_factory
from meshlet.proxy.observe.stats import Counter, Scope
from meshlet.proxy.runtime import ProxyRuntime
from meshlet.proxy.transport import ConnectionInfo, TransportSocketFactory

log = logging.getLogger(__name__)

_BACKLOG = 1024
SUPPORTED_LISTENER_FILTERS = frozenset({"envoy.filters.listener.tls_inspector"})
# How often connections whose close went unnoticed (a codec replaced our
# tracking protocol) are swept from the books.
_SWEEP_INTERVAL = 2.0


class NetworkApp(Protocol):
    """A terminal network filter: builds the protocol for each connection."""

    def protocol_for(self, info: ConnectionInfo) -> asyncio.Protocol: ...


AppBuilder = Callable[[NetworkFilterConfig, ProxyRuntime, str, str], NetworkApp]
"""``(filter config, runtime, config path, listener stat tag) -> NetworkApp``."""


def build_network_app(
    cfg: NetworkFilterConfig, runtime: ProxyRuntime, path: str, listener_tag: str
) -> NetworkApp:
    """The default ``AppBuilder``: HTTP connection manager or TCP proxy."""
    if isinstance(cfg, HttpConnectionManagerConfig):
        from meshlet.proxy.http.conn_manager import HttpConnectionManager

        return HttpConnectionManager(cfg, runtime, listener_tag, path=path)
    if isinstance(cfg, TcpProxyConfig):
        from meshlet.proxy.tcp import TcpProxy

        return TcpProxy(cfg, runtime, path=path)
    raise UnsupportedConfig(path, f"network filter {type(cfg).__name__} is not supported")


def stat_tag(config: Listener) -> str:
    """Envoy's listener stat name: the stat_prefix, else ``<host>_<port>``."""
    return config.stat_prefix or f"{config.address.host}_{config.address.port}"


class ListenerStats:
    def __init__(self, scope: Scope, global_scope: Scope) -> None:
        self._scope = scope
        self.cx_total = scope.counter("downstream_cx_total")
        self.cx_active = scope.gauge("downstream_cx_active")
        self.cx_destroy = scope.counter("downstream_cx_destroy")
        self.cx_length_ms = scope.histogram("downstream_cx_length_ms")
        self.no_filter_chain_match = scope.counter("no_filter_chain_match")
        self.pre_cx_timeout = scope.counter("downstream_pre_cx_timeout")
        self.ssl_handshake = scope.counter("ssl.handshake")
        self.tls_found = global_scope.counter("tls_inspector.tls_found")
        self.tls_not_found = global_scope.counter("tls_inspector.tls_not_found")
        self.hello_too_large = global_scope.counter("tls_inspector.client_hello_too_large")
        self._ssl: dict[str, Counter] = {}

    def ssl_counter(self, name: str) -> Counter:
        """``ssl.connection_error``, ``ssl.fail_verify_san``, ... (created on first failure)."""
        c = self._ssl.get(name)
        if c is None:
            c = self._ssl[name] = self._scope.counter(f"ssl.{name}")
        return c


@dataclass(slots=True)
class ChainRuntime:
    chain: FilterChain
    transport: TransportSocketFactory
    app: NetworkApp


class ListenerRuntime:
    """One listener config, built: chains with their transport sockets and network filters."""

    def __init__(
        self, config: Listener, proxy: ProxyRuntime, builder: AppBuilder, path: str
    ) -> None:
        self.config = config
        self.proxy = proxy
        for i, name in enumerate(config.listener_filters):
            if name not in SUPPORTED_LISTENER_FILTERS:
                raise UnsupportedConfig(
                    f"{path}.listener_filters[{i}]", f"listener filter {name!r} is not supported"
                )
        try:
            self.selector = FilterChainSelector(config.filter_chains, config.default_filter_chain)
        except ConfigError as exc:
            raise exc.under(path) from None
        self.stats = ListenerStats(
            proxy.stats.scope("listener.", "envoy_listener_address", stat_tag(config)),
            proxy.stats.scope(""),
        )
        self.connections: set[ConnectionRecord] = set()
        self._chains: dict[int, ChainRuntime] = {}
        chains = list(config.filter_chains)
        if config.default_filter_chain is not None:
            chains.append(config.default_filter_chain)
        for i, chain in enumerate(chains):
            where = f"{path}.filter_chains[{i}]"
            if i == len(config.filter_chains):
                where = f"{path}.default_filter_chain"
            self._chains[id(chain)] = self._build_chain(chain, builder, where)

    def _build_chain(self, chain: FilterChain, builder: AppBuilder, path: str) -> ChainRuntime:
        if not chain.filters:
            raise ConfigError(f"{path}.filters", "a filter chain needs a terminal network filter")
        if len(chain.filters) > 1:
            raise UnsupportedConfig(
                f"{path}.filters", "only a single terminal network filter per chain is supported"
            )
        try:
            transport = make_factory(chain.transport_socket, default_engine=self.proxy.settings.tls_engine)
        except ConfigError as exc:
            raise exc.under(path) from None
        where = f"{path}.filters[0]"
        try:
            app = builder(chain.filters[-1], self.proxy, where, stat_tag(self.config))
        except ConfigError as exc:
            raise (exc if exc.path.startswith("listeners[") else exc.under(where)) from None
        return ChainRuntime(chain, transport, app)

    def select(self, facts: ConnectionFacts) -> ChainRuntime | None:
        chain = self.selector.select(facts)
        return None if chain is None else self._chains[id(chain)]

    def drain(self) -> None:
        for record in list(self.connections):
            record.drain()

    def abort(self) -> None:
        for record in list(self.connections):
            record.abort()

    def sweep(self) -> None:
        for record in list(self.connections):
            if record.app is not None and record.raw.is_closing():
                record.finish()


class ListenerSocket:
    """A bound listening socket; new connections go to its current runtime."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.server: asyncio.Server | None = None
        self._bound: tuple[str, int] | None = None

    async def bind(self) -> None:
        cfg = self.runtime.config
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                lambda: AcceptedConnection(self.runtime),
                cfg.address.host, cfg.address.port,
                reuse_address=True, reuse_port=cfg.reuse_port or None,
                backlog=_BACKLOG, start_serving=False,
                family=socket.AF_INET6 if ":" in cfg.address.host else socket.AF_INET,
            )
        except OSError as exc:
            raise ConfigError(
                f"listeners[{cfg.name}].address", f"cannot listen on {cfg.address}: {exc.strerror or exc}"
            ) from None

        host, port = self.server.sockets[0].getsockname()[:2]
        self._bound = (host, port)

    @property
    def bound(self) -> tuple[str, int] | None:
        """The bound address (the real port when configured with 0), kept after close."""
        return self._bound

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start_serving()

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass
class ListenerUpdate:
    """A prepared, not yet committed, listener set."""

    runtimes: dict[str, ListenerRuntime] = field(default_factory=dict)
    # Listeners that need a new socket (new or moved), bound but not serving.
    new_sockets: dict[str, ListenerSocket] = field(default_factory=dict)


class ListenerManager:
    def __init__(self, runtime: ProxyRuntime, *, app_builder: AppBuilder = build_network_app) -> None:
        self._proxy = runtime
        self._builder = app_builder
        self._sockets: dict[str, ListenerSocket] = {}
        # Runtimes no longer taking connections, until their connections end.
        self._retired: list[ListenerRuntime] = []
        self._retire_tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._accepting = True
        stats = runtime.stats
        self.listeners_active = stats.gauge("listener_manager.total_listeners_active")
        self.listener_added = stats.counter("listener_manager.listener_added")
        self.listener_modified = stats.counter("listener_manager.listener_modified")
        self.listener_removed = stats.counter("listener_manager.listener_removed")

    # -- config updates --------------------------------------------------- #

    async def prepare(self, listeners: dict[str, Listener]) -> ListenerUpdate:
        update = ListenerUpdate()
        try:
            for name, cfg in listeners.items():
                current = self._sockets.get(name)
                if current is not None and current.runtime.config == cfg:
                    update.runtimes[name] = current.runtime
                    continue
                rt = ListenerRuntime(cfg, self._proxy, self._builder, f"listeners[{name}]")
                update.runtimes[name] = rt
                if current is None or current.runtime.config.address != cfg.address:
                    sock = ListenerSocket(rt)
                    update.new_sockets[name] = sock
                    await sock.bind()
        except BaseException:
            self.abort(update)
            raise
        return update

    def abort(self, update: ListenerUpdate) -> None:
        for sock in update.new_sockets.values():
            sock.stop_accepting()

    async def commit(self, update: ListenerUpdate) -> None:
        old = self._sockets
        fresh: dict[str, ListenerSocket] = {}
        for name, rt in update.runtimes.items():
            sock = update.new_sockets.get(name) or old[name]
            previous = sock.runtime
            sock.runtime = rt  # new connections use the new chains from here on
            if previous is not rt and sock is old.get(name):
                self._retire(previous)
            if name not in old:
                self.listener_added.inc()
            elif previous is not rt or sock is not old[name]:
                self.listener_modified.inc()
            fresh[name] = sock
        for name, sock in old.items():
            if fresh.get(name) is not sock:
                sock.stop_accepting()
                self._retire(sock.runtime)
                if name not in fresh:
                    self.listener_removed.inc()
        self._sockets = fresh
        if self._accepting:
            for sock in update.new_sockets.values():
                await sock.start()
        self.listeners_active.set(len(fresh))
        self._ensure_sweeper()

    async def update(self, listeners: dict[str, Listener]) -> None:
        await self.commit(await self.prepare(listeners))

    def _retire(self, rt: ListenerRuntime) -> None:
        """Existing connections of a superseded runtime finish, bounded by the drain time."""
        self._retired.append(rt)
        rt.drain()
        task = asyncio.get_running_loop().create_task(self._reap(rt, self._proxy.settings.drain_time))
        self._retire_tasks.add(task)
        task.add_done_callback(self._retire_tasks.discard)

    async def _reap(self, rt: ListenerRuntime, timeout: float) -> None:
        await _wait_empty([rt], timeout)
        rt.abort()
        if rt in self._retired:
            self._retired.remove(rt)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            for rt in self._all_runtimes():
                rt.sweep()

    # -- lifecycle -------------------------------------------------------- #

    def _all_runtimes(self) -> list[ListenerRuntime]:
        return [s.runtime for s in self._sockets.values()] + list(self._retired)

    async def start(self) -> None:
        self._accepting = True
        for sock in self._sockets.values():
            await sock.start()

    def stop_accepting(self) -> None:
        """Close the listening sockets (new connections are refused); live ones go on."""
        self._accepting = False
        for sock in self._sockets.values():
            sock.stop_accepting()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, ask every connection to finish, wait up to ``timeout``.

        Returns True when all connections ended in time; the rest are aborted.
        """
        self.stop_accepting()
        runtimes = self._all_runtimes()
        for rt in runtimes:
            rt.drain()
        clean = await _wait_empty(runtimes, timeout)
        for rt in runtimes:
            rt.abort()
        return clean

    async def close(self) -> None:
        self.stop_accepting()
        for rt in self._all_runtimes():
            rt.abort()
        for task in [*self._retire_tasks, *([self._sweeper] if self._sweeper else [])]:
            task.cancel()
        await asyncio.gather(*self._retire_tasks, return_exceptions=True)
        if self._sweeper is not None:
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for sock in self._sockets.values():
            if sock.server is not None:
                await asyncio.wait_for(sock.server.wait_closed(), 5)
        self._sockets = {}
        self.listeners_active.set(0)

    # -- introspection ---------------------------------------------------- #

    def address(self, name: str) -> tuple[str, int] | None:
        """Where listener ``name`` is bound (the real port when configured with 0)."""
        sock = self._sockets.get(name)
        return sock.bound if sock is not None else None

    @property
    def active_connections(self) -> int:
        return sum(len(rt.connections) for rt in self._all_runtimes())

    def describe(self) -> list[dict[str, object]]:
        """For the admin ``/listeners`` page."""
        out: list[dict[str, object]] = []
        for name, sock in self._sockets.items():
            cfg = sock.runtime.config
            host, port = sock.bound or (cfg.address.host, cfg.address.port)
            out.append({
                "name": name,
                "local_address": {"socket_address": {"address": host, "port_value": port}},
                "filter_chains": [c.name for c in cfg.filter_chains],
                "active_connections": len(sock.runtime.connections),
                "accepting": sock.server is not None and sock.server.is_serving(),
            })
        return out


async def _wait_empty(runtimes: list[ListenerRuntime], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(rt.connections for rt in runtimes):
        if time.monotonic() >= deadline:
            return False
        for rt in runtimes:
            rt.sweep()
        await asyncio.sleep(0.02)
    return True
