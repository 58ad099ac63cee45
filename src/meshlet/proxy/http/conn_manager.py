"""The HTTP connection manager (``envoy.filters.network.http_connection_manager``).

``HttpConnectionManager`` is built once per config. For each downstream
connection ``protocol_for`` picks the codec (ALPN, ``codec_type``, or the
HTTP/2 preface); the codec calls ``handle`` once per request, which:

1. applies the request header policy (x-request-id, XFF, x-envoy-* stripping),
2. selects the virtual host and route from the route table,
3. runs the HTTP filters' request phase (any may answer the request),
4. lets the router (terminal filter) produce the response,
5. counts stats and writes access logs.

Every response passes ``Manager.send_head``: response header mutations,
filters' response phase, ``server`` header, status stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from meshlet.config.model import (
    HttpConnectionManagerConfig,
    Route,
    RouteConfiguration,
    VirtualHost,
)
from meshlet.proxy.filters import router as _router  # noqa: F401  (registers the router filter)
from meshlet.proxy.filters.base import (
    FilterChain,
    RequestContext,
    Responder,
    RoutePlan,
    RouterStats,
    RouteStats,
    build_filter_chain,
)
from meshlet.proxy.http.codec_select import HTTP2, DownstreamConnection, choose_codec
from meshlet.proxy.http.headers import RequestHeaderPolicy
from meshlet.proxy.http.local_reply import REQUEST_TIMEOUT, LocalReply, response_head, send_local_reply
from meshlet.proxy.http.stream import CodecSettings, DownstreamStream, RequestHead, ResponseHead, StreamReset
from meshlet.proxy.observe.access_log import AccessLog, ResponseFlag, StreamInfo, build_access_logs
from meshlet.proxy.observe.stats import Counter, Scope
from meshlet.proxy.routing import RouteTable, apply_header_mutation, request_mutations, response_mutations
from meshlet.proxy.transport import ConnectionInfo

if TYPE_CHECKING:
    from meshlet.proxy.runtime import ProxyRuntime

_PROTOCOLS = {"1.0": "HTTP/1.0", "1.1": "HTTP/1.1", "2": "HTTP/2"}
_MAX_STREAM_WINDOW = 1024 * 1024
_MAX_CONNECTION_WINDOW = 16 * 1024 * 1024


class RouteSelector(Protocol):
    """What the manager needs of a route table (``meshlet.proxy.routing.RouteTable``)."""

    def select(self, head: RequestHead) -> tuple[VirtualHost, Route] | None: ...


class HttpStats:
    """``http.<stat_prefix>.*`` (and the listener's per-HCM response classes)."""

    def __init__(self, runtime: ProxyRuntime, stat_prefix: str, listener_stat_prefix: str) -> None:
        scope = runtime.stats.scope("http.", "envoy_http_conn_manager_prefix", stat_prefix)
        self.scope = scope
        self.cx_total = scope.counter("downstream_cx_total")
        self.cx_active = scope.gauge("downstream_cx_active")
        self.cx_destroy = scope.counter("downstream_cx_destroy")
        self.cx_http1_total = scope.counter("downstream_cx_http1_total")
        self.cx_http2_total = scope.counter("downstream_cx_http2_total")
        self.cx_http1_active = scope.gauge("downstream_cx_http1_active")
        self.cx_http2_active = scope.gauge("downstream_cx_http2_active")
        self.rq_total = scope.counter("downstream_rq_total")
        self.rq_active = scope.gauge("downstream_rq_active")
        self.rq_http1_total = scope.counter("downstream_rq_http1_total")
        self.rq_http2_total = scope.counter("downstream_rq_http2_total")
        self.rq_time = scope.histogram("downstream_rq_time")
        self.rq_timeout = scope.counter("downstream_rq_timeout")
        self.rq_rx_reset = scope.counter("downstream_rq_rx_reset")
        self.rq_tx_reset = scope.counter("downstream_rq_tx_reset")
        self.rq_by_class = _class_counters(scope, "downstream_rq_")
        if listener_stat_prefix:
            listener = runtime.stats.scope("listener.", "envoy_listener_address", listener_stat_prefix)
            self.listener_by_class: tuple[Counter, ...] | None = _class_counters(
                listener, f"http.{stat_prefix}.downstream_rq_"
            )
        else:
            self.listener_by_class = None
        self.router = RouterStats(scope)

    def response_class(self, status: int) -> None:
        n = status // 100
        if 1 <= n <= 5:
            self.rq_by_class[n - 1].value += 1
            if self.listener_by_class is not None:
                self.listener_by_class[n - 1].value += 1


def _class_counters(scope: Scope, prefix: str) -> tuple[Counter, ...]:
    return tuple(scope.counter(f"{prefix}{n}xx") for n in range(1, 6))


class HttpConnectionManager(Responder):
    def __init__(
        self,
        config: HttpConnectionManagerConfig,
        runtime: ProxyRuntime,
        listener_stat_prefix: str = "",
        *,
        path: str = "http_connection_manager",
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.stats = HttpStats(runtime, config.stat_prefix, listener_stat_prefix)
        self.router_stats = self.stats.router
        self.allowed_upgrades = config.upgrades
        self.stream_idle_timeout = config.stream_idle_timeout
        self._route_config: RouteConfiguration | None = config.route_config
        self._table: RouteSelector | None = _route_table(config.route_config)
        self._policy = RequestHeaderPolicy(config)
        self._filters: FilterChain = build_filter_chain(config.http_filters, runtime, f"{path}.http_filters")
        self._request_filters = self._filters.request_filters
        self._response_filters = self._filters.response_filters
        self._router = self._filters.terminal
        self._access_logs: tuple[AccessLog, ...] = build_access_logs(config.access_logs, f"{path}.access_log")
        self._route_stats: dict[tuple[str, str, int], RouteStats] = {}
        # Keyed by the route's id; the plan holds the route, so the id stays its own.
        self._plans: dict[int, RoutePlan] = {}
        self._codec_settings: dict[str, CodecSettings] = {}
        self._server_name = config.server_name

    # -- connections ------------------------------------------------------ #

    def protocol_for(self, info: ConnectionInfo) -> asyncio.Protocol:
        """The protocol for a new downstream connection (after its transport
        socket's handshake: ``info.security`` carries the ALPN)."""
        self.stats.cx_total.inc()
        self.stats.cx_active.inc()
        settings = self._settings_for("https" if info.security.tls else "http")
        if self._access_logs:
            settings = dataclasses.replace(settings, on_local_reply=self._codec_reply_logger(info))
        conn: DownstreamConnection

        def make_codec(kind: str) -> asyncio.Protocol:
            if kind == HTTP2:
                from meshlet.proxy.http.h2_server import H2ServerProtocol

                self.stats.cx_http2_total.inc()
                self.stats.cx_http2_active.inc()
                return H2ServerProtocol(conn.guard(self.handle), info, settings)
            from meshlet.proxy.http.h1_server import H1ServerProtocol

            self.stats.cx_http1_total.inc()
            self.stats.cx_http1_active.inc()
            return H1ServerProtocol(conn.guard(self.handle), info, settings)

        kind = choose_codec(self.config.codec_type, info.security.alpn)
        conn = DownstreamConnection(kind, make_codec, self._closed)
        return conn

    def _closed(self, kind: str | None) -> None:
        self.stats.cx_active.dec()
        self.stats.cx_destroy.inc()
        if kind == HTTP2:
            self.stats.cx_http2_active.dec()
        elif kind is not None:
            self.stats.cx_http1_active.dec()

    def _settings_for(self, scheme: str) -> CodecSettings:
        settings = self._codec_settings.get(scheme)
        if settings is None:
            cfg = self.config
            settings = self._codec_settings[scheme] = CodecSettings(
                max_request_headers_kb=cfg.max_request_headers_kb,
                request_headers_timeout=cfg.request_headers_timeout,
                idle_timeout=cfg.idle_timeout,
                scheme=scheme,
                server_name=cfg.server_name,
                max_concurrent_streams=cfg.http2.max_concurrent_streams,
                # Bounded by what we are willing to buffer per stream / connection.
                initial_stream_window_size=min(cfg.http2.initial_stream_window_size, _MAX_STREAM_WINDOW),
                initial_connection_window_size=min(
                    cfg.http2.initial_connection_window_size, _MAX_CONNECTION_WINDOW
                ),
                on_local_reply=self._codec_local_reply,
            )
        return settings

    def _codec_local_reply(self, status: int, detail: str) -> None:
        """A reply the codec made itself (400, 408, 431...): count it as a request."""
        self.stats.rq_total.inc()
        self.stats.response_class(status)

    def _codec_reply_logger(self, info: ConnectionInfo) -> Callable[[int, str], None]:
        """Like ``_codec_local_reply``, and access-logged (the codec knows no
        request head: the line carries the connection and the status)."""

        def on_local_reply(status: int, detail: str) -> None:
            self._codec_local_reply(status, detail)
            stream_info = StreamInfo(connection=info, response_code=status, response_code_details=detail)
            if status == 400:
                stream_info.flags = ResponseFlag.DPE
            stream_info.finish()
            for log in self._access_logs:
                log.log(stream_info)

        return on_local_reply

    # -- requests --------------------------------------------------------- #

    async def handle(self, stream: DownstreamStream, task: asyncio.Task[object] | None = None) -> None:
        """Serve one request (the codecs' handler); ``task`` is the one serving it, if known."""
        stats = self.stats
        head = stream.head
        protocol = _PROTOCOLS.get(head.version, "HTTP/1.1")
        info = StreamInfo(connection=stream.info, request=head, protocol=protocol)
        # Counters as plain stores on the per-request path (no method calls).
        stats.rq_total.value += 1
        stats.rq_active.value += 1
        (stats.rq_http2_total if head.version == "2" else stats.rq_http1_total).value += 1
        internal = self._policy.apply(head, stream.info)
        ctx = RequestContext(stream, info, internal, self._route_config, self, task)
        try:
            await self._process(ctx)
        except (StreamReset, ConnectionError):
            # The client went away (or reset the stream) while we answered.
            info.flags |= ResponseFlag.DC
            stats.rq_rx_reset.inc()
        except asyncio.CancelledError:
            info.flags |= ResponseFlag.DC
            stats.rq_rx_reset.inc()
            raise
        finally:
            stats.rq_active.value -= 1
            info.bytes_received = stream.body.received
            info.finish()
            stats.rq_time.record((info.duration or 0.0) * 1000)
            for log in self._access_logs:
                log.log(info)

    async def _process(self, ctx: RequestContext) -> None:
        table = self._table
        selected = table.select(ctx.head) if table is not None else None
        if selected is not None:
            vhost, route = selected
            ctx.vhost, ctx.route = vhost, route
            ctx.info.route_name = route.name
            plan = self._plans.get(id(route))
            if plan is None or plan.vhost is not vhost:
                plan = self._plan_for(vhost, route)
            ctx.plan = plan
            ctx.response_mutations = plan.response_mutations
        for flt in self._request_filters:
            reply = await flt.on_request(ctx)
            if reply is not None:
                await self.send_local_reply(ctx, reply)
                return
        if self.config.request_timeout:
            try:
                async with asyncio.timeout(self.config.request_timeout):
                    await self._router.serve(ctx)
            except TimeoutError:
                await self._request_timed_out(ctx)
        else:
            await self._router.serve(ctx)

    async def _request_timed_out(self, ctx: RequestContext) -> None:
        self.stats.rq_timeout.inc()
        await self.send_local_reply(ctx, REQUEST_TIMEOUT)

    def _plan_for(self, vhost: VirtualHost, route: Route) -> RoutePlan:
        config = self._route_config
        plan = self._plans[id(route)] = RoutePlan(
            vhost,
            route,
            request_mutations(config, vhost, route) if config else (),
            response_mutations(config, vhost, route) if config else (),
            self.route_stats(vhost, route),
        )
        return plan

    # -- Responder -------------------------------------------------------- #

    async def send_head(self, ctx: RequestContext, head: ResponseHead, end_stream: bool) -> None:
        for mutation in ctx.response_mutations:
            apply_header_mutation(head.headers, mutation)
        for flt in self._response_filters:
            flt.on_response(ctx, head)
        _set_server(head, self._server_name)
        info = ctx.info
        info.response = head
        info.response_code = head.status
        self.stats.response_class(head.status)
        await ctx.stream.send_head(head, end_stream=end_stream)

    async def send_local_reply(self, ctx: RequestContext, reply: LocalReply) -> None:
        info = ctx.info
        info.flags |= reply.flag
        info.response_code_details = reply.details
        if ctx.stream.head_sent:
            ctx.stream.reset("INTERNAL_ERROR")
            return
        head = response_head(reply, self._server_name)
        for mutation in ctx.response_mutations:
            apply_header_mutation(head.headers, mutation)
        for flt in self._response_filters:
            flt.on_response(ctx, head)
        info.response = head
        info.response_code = head.status
        self.stats.response_class(head.status)
        info.bytes_sent += await send_local_reply(ctx.stream, head, reply.body)

    def route_stats(self, vhost: VirtualHost, route: Route) -> RouteStats:
        key = (vhost.name, route.name, route.index)
        found = self._route_stats.get(key)
        if found is None:
            prefix = f"vhost.{vhost.name}.route."
            scope = self.runtime.stats.scope(prefix, "envoy_route", route.name or "default")
            found = self._route_stats[key] = RouteStats(scope)
        return found


def _route_table(config: RouteConfiguration | None) -> RouteSelector | None:
    if config is None:
        return None
    table = config.table
    if table is None:
        return RouteTable.build(config)
    if not hasattr(table, "select"):
        raise TypeError("route_config.table is not a route table")
    return table


def _set_server(head: ResponseHead, server_name: str) -> None:
    headers = head.headers
    for i, (name, _) in enumerate(headers):
        if name == "server":
            headers[i] = ("server", server_name)
            return
    headers.append(("server", server_name))
