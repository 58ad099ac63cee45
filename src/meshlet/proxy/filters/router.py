"""The router (``envoy.filters.http.router``): the terminal HTTP filter.

For the selected route it answers a direct response or a redirect itself,
or forwards to the route's cluster: host by the cluster's load balancer,
connection from the host's pool, request body streamed up and response
streamed down (never buffered whole), trailers both ways, upgrades tunnelled.
Failures become local replies (``meshlet.proxy.http.local_reply``) while no
response has started, and a stream reset after.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from meshlet.config.model import ClusterAction, DirectResponseAction, HttpFilterConfig, RedirectAction, Route
from meshlet.proxy.filters.base import (
    ROUTER_NAME,
    ROUTER_TYPE_URL,
    RequestContext,
    RouteStats,
    TerminalFilter,
    register_http_filter,
)
from meshlet.proxy.http.local_reply import (
    CLUSTER_NOT_FOUND,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    STREAM_IDLE_TIMEOUT,
    UPGRADE_REFUSED,
    UPSTREAM_TIMEOUT,
    LocalReply,
    direct,
    redirect,
    reset_reason,
    upstream_reset,
)
from meshlet.proxy.http.stream import BodyStream, RequestHead, StreamReset, UpstreamResponse
from meshlet.proxy.observe.access_log import ResponseFlag
from meshlet.proxy.routing import apply_header_mutation, redirect_location, request_mutations, rewrite_path
from meshlet.proxy.upstream.cluster import ClusterRuntime, Host
from meshlet.proxy.upstream.pool import Lease, UpstreamConnectError

if TYPE_CHECKING:
    from meshlet.proxy.runtime import ProxyRuntime

ROUTE_TIMEOUT = "route"
IDLE_TIMEOUT = "idle"
# While a request body is still arriving, how often the watchdog looks at it.
_UPLOAD_CHECK = 1.0


class Watchdog:
    """One timer per request enforcing both the route timeout and the stream
    idle timeout; when either passes it cancels the request's task and
    records which one fired.

    As in Envoy the route timeout counts from the end of the downstream
    request: while the request body is still arriving the deadline is held
    off (checked every ``_UPLOAD_CHECK`` seconds, so it starts at most that
    late), and body progress counts as activity for the idle timeout. The
    response side reports activity with ``touch``. Nothing here runs per
    chunk except that assignment.
    """

    __slots__ = (
        "_body",
        "_body_seen",
        "_deadline",
        "_idle",
        "_last",
        "_loop",
        "_route_timeout",
        "_task",
        "_timer",
        "fired",
    )

    def __init__(self, route_timeout: float | None, idle_timeout: float | None, body: BodyStream) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        now = self._loop.time()
        self._route_timeout = route_timeout or None
        self._body: BodyStream | None = None if body.ended else body
        self._body_seen = body.received
        self._deadline = now + route_timeout if route_timeout and self._body is None else None
        self._idle = idle_timeout or None
        self._last = now
        self._timer: asyncio.TimerHandle | None = None
        self.fired = ""
        self._arm()

    def touch(self) -> None:
        self._last = self._loop.time()

    def drop_deadline(self) -> None:
        """Tunnels (upgrades) outlive the route timeout; bytes from the client
        still count as activity against the idle timeout."""
        self._route_timeout = None
        self._deadline = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def absorb(self) -> str:
        """After a CancelledError: which timeout caused it ("" if none did),
        with the cancellation withdrawn so the request can still answer."""
        if self.fired and self._task is not None:
            self._task.uncancel()
        return self.fired

    def _arm(self) -> None:
        due = self._deadline
        if self._body is not None and self._route_timeout is not None:
            due = self._loop.time() + min(_UPLOAD_CHECK, self._route_timeout)
        if self._idle is not None:
            idle_due = self._last + self._idle
            due = idle_due if due is None else min(due, idle_due)
        self._timer = self._loop.call_at(due, self._check) if due is not None else None

    def _watch_upload(self, now: float) -> None:
        body = self._body
        if body is None:
            return
        if body.received != self._body_seen:
            self._body_seen = body.received
            self._last = now
        if body.ended:
            self._body = None
            if self._route_timeout is not None:
                self._deadline = now + self._route_timeout

    def _check(self) -> None:
        now = self._loop.time()
        self._watch_upload(now)
        if self._deadline is not None and now >= self._deadline:
            self.fired = ROUTE_TIMEOUT
        elif self._idle is not None and now - self._last >= self._idle:
            self.fired = IDLE_TIMEOUT
        else:
            self._arm()
            return
        self._timer = None
        if self._task is not None:
            self._task.cancel()


def upgrade_type(head: RequestHead) -> str:
    """"websocket" etc. for upgrade requests (HTTP/1.1 Upgrade or HTTP/2
    extended CONNECT), "connect" for plain CONNECT, "" otherwise."""
    if head.method == "CONNECT":
        return head.protocol.lower() if head.protocol else "connect"
    value = head.get("upgrade")
    return value.lower() if value else ""


def request_body(body: BodyStream) -> BodyStream | None:
    """None for a request that has no body at all (lets codecs end the stream with the head)."""
    if body.ended and body.buffered == 0 and not body.trailers and body.received == 0:
        return None
    return body


class Router(TerminalFilter):
    name = ROUTER_NAME

    def __init__(self, runtime: ProxyRuntime, *, suppress_envoy_headers: bool = False) -> None:
        self._runtime = runtime
        self._envoy_headers = not suppress_envoy_headers

    async def serve(self, ctx: RequestContext) -> None:
        route = ctx.route
        stats = ctx.responder.router_stats
        if route is None:
            stats.no_route.inc()
            await ctx.send_local_reply(NO_ROUTE)
            return
        action = route.action
        if isinstance(action, ClusterAction):
            await self._forward(ctx, route, action)
        elif isinstance(action, DirectResponseAction):
            stats.rq_direct_response.inc()
            await ctx.send_local_reply(direct(action.status, action.body))
        elif isinstance(action, RedirectAction):
            stats.rq_redirect.inc()
            await ctx.send_local_reply(redirect(action.response_code, redirect_location(ctx.head, route)))

    async def _forward(self, ctx: RequestContext, route: Route, action: ClusterAction) -> None:
        ctx.info.upstream_cluster = action.cluster
        cluster = self._runtime.cluster_manager().get(action.cluster)
        if cluster is None:
            ctx.responder.router_stats.no_cluster.inc()
            await ctx.send_local_reply(CLUSTER_NOT_FOUND)
            return
        upgrade = upgrade_type(ctx.head)
        if upgrade and upgrade not in action.upgrades and upgrade not in ctx.responder.allowed_upgrades:
            await ctx.send_local_reply(UPGRADE_REFUSED)
            return
        if not cluster.ready:
            await cluster.wait_ready(cluster.config.connect_timeout)
        host = cluster.choose_host()
        if host is None:
            await ctx.send_local_reply(NO_HEALTHY_UPSTREAM)
            return
        self._finalize_request(ctx, route, action, host, self._envoy_headers)
        assert ctx.vhost is not None
        route_stats = ctx.responder.route_stats(ctx.vhost, route)
        exchange = _Exchange(ctx, cluster, host, route_stats, self._envoy_headers)
        idle_timeout = action.idle_timeout or ctx.responder.stream_idle_timeout
        await exchange.run(self._timeout(ctx, action), idle_timeout)

    @staticmethod
    def _finalize_request(
        ctx: RequestContext, route: Route, action: ClusterAction, host: Host, envoy_headers: bool
    ) -> None:
        head = ctx.head
        if action.prefix_rewrite is not None:
            new_path = rewrite_path(head.path, route)
            if new_path != head.path:
                if envoy_headers:
                    head.headers.append(("x-envoy-original-path", head.path))
                head.path = new_path
        if action.host_rewrite_literal:
            head.authority = action.host_rewrite_literal
        elif action.auto_host_rewrite and host.hostname:
            head.authority = host.hostname
        if ctx.route_config is not None and ctx.vhost is not None:
            for mutation in request_mutations(ctx.route_config, ctx.vhost, route):
                apply_header_mutation(head.headers, mutation)

    @staticmethod
    def _timeout(ctx: RequestContext, action: ClusterAction) -> float | None:
        """The route timeout; an internal caller may override it with
        ``x-envoy-upstream-rq-timeout-ms`` (external requests had it stripped)."""
        if ctx.internal:
            value = ctx.head.get("x-envoy-upstream-rq-timeout-ms")
            if value is not None and value.isdigit():
                return int(value) / 1000 or None
        return action.timeout


class _Exchange:
    """One attempt at one upstream host."""

    __slots__ = (
        "_cluster",
        "_ctx",
        "_envoy_headers",
        "_host",
        "_lease",
        "_response",
        "_route_stats",
        "_sent_at",
        "_watchdog",
    )

    def __init__(
        self,
        ctx: RequestContext,
        cluster: ClusterRuntime,
        host: Host,
        route_stats: RouteStats,
        envoy_headers: bool,
    ) -> None:
        self._ctx = ctx
        self._envoy_headers = envoy_headers
        self._cluster = cluster
        self._host = host
        self._route_stats = route_stats
        self._lease: Lease | None = None
        self._response: UpstreamResponse | None = None
        self._watchdog: Watchdog | None = None
        self._sent_at = 0.0

    async def run(self, route_timeout: float | None, idle_timeout: float | None) -> None:
        ctx, cluster, host = self._ctx, self._cluster, self._host
        ctx.info.upstream_host = host.address_text
        cluster.stats.rq_total.inc()
        cluster.stats.rq_active.inc()
        self._route_stats.rq_total.inc()
        counters = host.counters
        counters.rq_total += 1
        counters.rq_active += 1
        self._watchdog = Watchdog(route_timeout, idle_timeout, ctx.stream.body)
        completed = False
        try:
            completed = await self._attempt()
        except asyncio.CancelledError:
            fired = self._watchdog.absorb()
            if not fired:
                ctx.info.flags |= ResponseFlag.DC
                raise
            await self._timed_out(fired)
        finally:
            self._watchdog.stop()
            cluster.stats.rq_active.dec()
            counters.rq_active -= 1
            if not completed:
                counters.rq_error += 1
            self._finish_lease(completed)

    async def _attempt(self) -> bool:
        """True when the exchange completed cleanly."""
        ctx = self._ctx
        pool = self._host.pool(self._cluster.pool_kind(ctx.head.version))
        try:
            self._lease = await pool.acquire()
            self._sent_at = time.monotonic()
            self._response = await self._lease.connection.request(ctx.head, request_body(ctx.stream.body))
        except UpstreamConnectError as exc:
            ctx.info.upstream_failure_reason = exc.detail
            await self._fail(upstream_reset(exc.reason))
            return False
        except StreamReset as exc:
            self._cluster.stats.rq_rx_reset.inc()
            await self._fail(upstream_reset(reset_reason(exc)))
            return False
        return await self._relay(self._response)

    async def _relay(self, response: UpstreamResponse) -> bool:
        ctx, watchdog = self._ctx, self._watchdog
        assert watchdog is not None
        head, body = response.head, response.body
        elapsed_ms = (time.monotonic() - self._sent_at) * 1000
        self._cluster.stats.response(head.status, elapsed_ms)
        self._route_stats.response(head.status, elapsed_ms)
        if self._envoy_headers:
            head.headers.append(("x-envoy-upstream-service-time", str(int(elapsed_ms))))
        if head.status == 101:
            watchdog.drop_deadline()
        ends_now = body.ended and body.buffered == 0 and not body.trailers
        await ctx.send_head(head, end_stream=ends_now)
        if ends_now:
            return True
        stream, info = ctx.stream, ctx.info
        while True:
            try:
                chunk = await body.read()
            except StreamReset as exc:
                self._reset_after_head(exc)
                return False
            if not chunk:
                break
            watchdog.touch()
            info.bytes_sent += len(chunk)
            await stream.send_data(chunk)
        if body.trailers:
            await stream.send_trailers(body.trailers)
        else:
            await stream.send_data(b"", end_stream=True)
        return True

    async def _fail(self, reply: LocalReply) -> None:
        await self._ctx.send_local_reply(reply)

    def _reset_after_head(self, exc: StreamReset) -> None:
        ctx = self._ctx
        self._cluster.stats.rq_rx_reset.inc()
        ctx.responder.router_stats.rq_reset_after_downstream_response_started.inc()
        ctx.info.flags |= ResponseFlag.UC if exc.code == "CONNECTION_RESET" else ResponseFlag.UR
        ctx.stream.reset("INTERNAL_ERROR")

    async def _timed_out(self, fired: str) -> None:
        ctx = self._ctx
        if fired == ROUTE_TIMEOUT:
            self._cluster.stats.rq_timeout.inc()
            reply = UPSTREAM_TIMEOUT
        else:
            reply = STREAM_IDLE_TIMEOUT
        if ctx.stream.head_sent:
            ctx.info.flags |= reply.flag
            ctx.stream.reset("CANCEL")
            return
        await self._fail(reply)

    def _finish_lease(self, completed: bool) -> None:
        lease, response = self._lease, self._response
        if lease is None:
            return
        if not completed and response is not None and response.cancel is not None:
            response.cancel()
            lease.release()
            return
        lease.release(reusable=completed)


def _router_factory(cfg: HttpFilterConfig, runtime: ProxyRuntime, path: str) -> Router:
    # cfg.config is the compiler's RouterFilterConfig (absent when built directly).
    suppress = bool(getattr(cfg.config, "suppress_envoy_headers", False))
    return Router(runtime, suppress_envoy_headers=suppress)


register_http_filter(ROUTER_NAME, _router_factory, [ROUTER_TYPE_URL])
