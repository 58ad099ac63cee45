"""The HTTP filter interface and the per-request context filters share.

A connection manager runs, per request, each filter's ``on_request`` in
config order; a filter either lets the request continue (returns None) or
answers it with a ``LocalReply`` (authz deny, rate limited, injected fault).
The last filter is terminal (the router): it produces the response. On the
way back every filter's ``on_response`` may edit the response head before
it is sent (in reverse order, as Envoy's encoder filters).

Filter objects are built once per config (``build_filter_chain``) and must
keep per-request state in the ``RequestContext``, never on themselves.

Runtime filter factories register in the extension registry under category
``"http_filter_instance"``, keyed by the filter's name and ``typed_config``
type URLs: ``factory(config: HttpFilterConfig, runtime: ProxyRuntime, path: str) -> HttpFilter``.
(The config compiler's own category ``"http_filter"`` compiles the protobuf
into ``HttpFilterConfig.config``; this one builds the live filter from it.)
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshlet.config.model import HeaderMutation, HttpFilterConfig, Route, RouteConfiguration, VirtualHost
from meshlet.errors import ConfigError
from meshlet.proxy.http.local_reply import LocalReply
from meshlet.proxy.http.stream import DownstreamStream, RequestHead, ResponseHead
from meshlet.proxy.observe.access_log import StreamInfo
from meshlet.proxy.observe.stats import Scope
from meshlet.registry import registry

if TYPE_CHECKING:
    from meshlet.proxy.runtime import ProxyRuntime

CATEGORY = "http_filter_instance"
ROUTER_NAME = "envoy.filters.http.router"
ROUTER_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class RoutePlan:
    """What the manager and the router derive from a selected (virtual host,
    route) pair, built once per route and config: header mutations in
    Envoy's order, and the route's stats."""

    __slots__ = ("request_mutations", "response_mutations", "route", "stats", "vhost")

    def __init__(
        self,
        vhost: VirtualHost,
        route: Route,
        request_mutations: tuple[HeaderMutation, ...],
        response_mutations: tuple[HeaderMutation, ...],
        stats: RouteStats,
    ) -> None:
        self.vhost = vhost
        self.route = route
        self.request_mutations = request_mutations
        self.response_mutations = response_mutations
        self.stats = stats


class RequestContext:
    """One request as the filters see it. ``head`` is mutable: filters and the
    router edit it in place before it goes upstream."""

    __slots__ = (
        "filter_state",
        "head",
        "info",
        "internal",
        "plan",
        "responder",
        "response_mutations",
        "route",
        "route_config",
        "stream",
        "task",
        "vhost",
    )

    def __init__(
        self,
        stream: DownstreamStream,
        info: StreamInfo,
        internal: bool,
        route_config: RouteConfiguration | None,
        responder: Responder,
        task: asyncio.Task[object] | None = None,
    ) -> None:
        self.stream = stream
        # The task serving the request (what a timeout cancels); None: unknown.
        self.task = task
        self.head: RequestHead = stream.head
        self.info = info
        self.internal = internal
        self.route_config = route_config
        self.vhost: VirtualHost | None = None
        self.route: Route | None = None
        self.response_mutations: tuple[HeaderMutation, ...] = ()
        # Set with the route by the connection manager (None: no route, or a
        # responder that derives nothing ahead).
        self.plan: RoutePlan | None = None
        self.responder = responder
        # Free-form per-request data filters hand to each other (Envoy's filter state).
        self.filter_state: dict[str, object] = {}

    async def send_head(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        """Send the response head through every filter's ``on_response``."""
        await self.responder.send_head(self, head, end_stream)

    async def send_local_reply(self, reply: LocalReply) -> None:
        await self.responder.send_local_reply(self, reply)


class RouteStats:
    """``vhost.<vhost>.route.<route>.*`` (tagged with the route name)."""

    __slots__ = ("_by_class", "rq_time", "rq_total")

    def __init__(self, scope: Scope) -> None:
        self.rq_total = scope.counter("upstream_rq_total")
        self.rq_time = scope.histogram("upstream_rq_time")
        self._by_class = tuple(scope.counter(f"upstream_rq_{n}xx") for n in range(1, 6))

    def response(self, status: int, elapsed_ms: float) -> None:
        n = status // 100
        if 1 <= n <= 5:
            self._by_class[n - 1].value += 1
        self.rq_time.record(elapsed_ms)


class RouterStats:
    """The router's ``http.<stat_prefix>.*`` counters."""

    __slots__ = (
        "no_cluster",
        "no_route",
        "rq_direct_response",
        "rq_redirect",
        "rq_reset_after_downstream_response_started",
    )

    def __init__(self, scope: Scope) -> None:
        self.no_route = scope.counter("no_route")
        self.no_cluster = scope.counter("no_cluster")
        self.rq_redirect = scope.counter("rq_redirect")
        self.rq_direct_response = scope.counter("rq_direct_response")
        self.rq_reset_after_downstream_response_started = scope.counter(
            "rq_reset_after_downstream_response_started"
        )


class Responder(ABC):
    """What the connection manager gives the context: answering the request,
    and the per-config facts and stats the router needs."""

    allowed_upgrades: frozenset[str] = frozenset()
    stream_idle_timeout: float | None = None
    router_stats: RouterStats

    @abstractmethod
    async def send_head(self, ctx: RequestContext, head: ResponseHead, end_stream: bool) -> None: ...

    @abstractmethod
    async def send_local_reply(self, ctx: RequestContext, reply: LocalReply) -> None: ...

    @abstractmethod
    def route_stats(self, vhost: VirtualHost, route: Route) -> RouteStats:
        """Looked up once per route and config, then cached."""


class HttpFilter:
    """Base of every HTTP filter; the default hooks do nothing."""

    name: str = ""
    # Set False by filters with no request phase, so the manager skips the await.
    has_request_phase: bool = True
    has_response_phase: bool = True

    async def on_request(self, ctx: RequestContext) -> LocalReply | None:
        """None to continue, or a reply that ends the request here."""
        return None

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        """Edit ``head`` (status, headers) before it is sent to the client."""


class TerminalFilter(HttpFilter):
    """The last filter: answers the request (the router)."""

    has_request_phase = False
    has_response_phase = False

    @abstractmethod
    async def serve(self, ctx: RequestContext) -> None:
        """Produce the whole response through ``ctx``."""


@dataclass(frozen=True, slots=True)
class FilterChain:
    filters: tuple[HttpFilter, ...]  # non-terminal, in config order
    terminal: TerminalFilter

    @property
    def request_filters(self) -> tuple[HttpFilter, ...]:
        return tuple(f for f in self.filters if f.has_request_phase)

    @property
    def response_filters(self) -> tuple[HttpFilter, ...]:
        return tuple(f for f in reversed(self.filters) if f.has_response_phase)


HttpFilterFactory = Callable[[HttpFilterConfig, "ProxyRuntime", str], HttpFilter]


def register_http_filter(name: str, factory: HttpFilterFactory, type_urls: Iterable[str] = ()) -> None:
    registry.register(CATEGORY, name, factory, type_urls)


def build_filter_chain(
    configs: tuple[HttpFilterConfig, ...], runtime: ProxyRuntime, path: str
) -> FilterChain:
    """Build the live filters for ``http_filters``. The last one must be
    terminal; an empty list means just the router."""
    if not configs:
        configs = (HttpFilterConfig(name=ROUTER_NAME, type_url=ROUTER_TYPE_URL),)
    built: list[HttpFilter] = []
    for i, cfg in enumerate(configs):
        item_path = f"{path}[{i}]"
        if cfg.disabled:
            continue
        ext = registry.lookup(CATEGORY, name=cfg.name, type_url=cfg.type_url, path=item_path)
        flt = ext.factory(cfg, runtime, item_path)
        if not isinstance(flt, HttpFilter):
            raise ConfigError(item_path, f"http filter {cfg.name!r} did not build a filter")
        terminal = isinstance(flt, TerminalFilter)
        if terminal != (i == len(configs) - 1):
            where = "must be the last filter" if terminal else "is not a terminal filter"
            raise ConfigError(item_path, f"http filter {cfg.name!r} {where}")
        built.append(flt)
    last = built.pop() if built else None
    if not isinstance(last, TerminalFilter):
        raise ConfigError(path, "the last http filter must be a terminal filter (envoy.filters.http.router)")
    return FilterChain(tuple(built), last)
