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
import random
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from meshlet.config.model import (
    DEFAULT_REQUEST_BUFFER_LIMIT,
    ClusterAction,
    DirectResponseAction,
    HttpFilterConfig,
    RedirectAction,
    RetryPolicy,
    Route,
    WeightedCluster,
)
from meshlet.proxy.filters.base import (
    ROUTER_NAME,
    ROUTER_TYPE_URL,
    RequestContext,
    RouteStats,
    TerminalFilter,
    register_http_filter,
)
from meshlet.proxy.filters.mirror import Mirror
from meshlet.proxy.filters.retry import (
    CONNECT_FAILURE,
    OVERFLOW,
    PER_TRY_TIMEOUT,
    REFUSED_STREAM,
    RESET,
    ReplayBody,
    RetryState,
    RetryStats,
    request_policy,
    set_header,
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
from meshlet.proxy.http.stream import BodyStream, RequestHead, ResponseHead, StreamReset, UpstreamResponse
from meshlet.proxy.observe.access_log import ResponseFlag
from meshlet.proxy.routing import apply_header_mutation, redirect_location, request_mutations, rewrite_path
from meshlet.proxy.upstream.cluster import ClusterRuntime, Host
from meshlet.proxy.upstream.hashing import compute_hash
from meshlet.proxy.upstream.lb import LbContext
from meshlet.proxy.upstream.pool import ConnectionPool, Lease, UpstreamConnectError

if TYPE_CHECKING:
    from meshlet.proxy.runtime import ProxyRuntime

ROUTE_TIMEOUT = "route"
IDLE_TIMEOUT = "idle"
ATTEMPT_COUNT = "x-envoy-attempt-count"
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

    def __init__(
        self,
        route_timeout: float | None,
        idle_timeout: float | None,
        body: BodyStream,
        task: asyncio.Task[object] | None = None,
    ) -> None:
        if task is not None:  # its loop without get_running_loop's getpid system call
            self._loop = task.get_loop()
            self._task: asyncio.Task[object] | None = task
        else:
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
    """ "websocket" etc. for upgrade requests (HTTP/1.1 Upgrade or HTTP/2
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


def pick_weighted(
    clusters: tuple[WeightedCluster, ...], total: int, draw: Callable[[int], int]
) -> WeightedCluster:
    """One of ``clusters`` with probability weight / total."""
    point = draw(total)
    for entry in clusters:
        point -= entry.weight
        if point < 0:
            return entry
    return clusters[-1]


class Router(TerminalFilter):
    name = ROUTER_NAME

    def __init__(
        self,
        runtime: ProxyRuntime,
        *,
        suppress_envoy_headers: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self._runtime = runtime
        self._envoy_headers = not suppress_envoy_headers
        self._rng = rng or random.Random()
        self._retry_stats: dict[str, RetryStats] = {}
        self.mirror = Mirror(runtime)

    def serve(self, ctx: RequestContext) -> Coroutine[Any, Any, None]:
        route = ctx.route
        if route is not None and isinstance(route.action, ClusterAction):
            # The common case hands back the forwarding coroutine itself: no
            # frame of serve's own to resume on every step of the exchange.
            return self._forward(ctx, route, route.action)
        return self._answer(ctx, route)

    async def _answer(self, ctx: RequestContext, route: Route | None) -> None:
        """No route, a direct response or a redirect."""
        stats = ctx.responder.router_stats
        if route is None:
            stats.no_route.inc()
            await ctx.send_local_reply(NO_ROUTE)
            return
        action = route.action
        if isinstance(action, DirectResponseAction):
            stats.rq_direct_response.inc()
            await ctx.send_local_reply(direct(action.status, action.body))
        elif isinstance(action, RedirectAction):
            stats.rq_redirect.inc()
            await ctx.send_local_reply(redirect(action.response_code, redirect_location(ctx.head, route)))

    async def _forward(self, ctx: RequestContext, route: Route, action: ClusterAction) -> None:
        cluster_name = action.cluster
        weighted: WeightedCluster | None = None
        if action.weighted_clusters:
            weighted = pick_weighted(action.weighted_clusters, action.total_weight, self._rng.randrange)
            cluster_name = weighted.name
        ctx.info.upstream_cluster = cluster_name
        cluster = self._runtime.cluster_manager().get(cluster_name)
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
        self._finalize_request(ctx, route, action, self._envoy_headers)
        if weighted is not None:
            self._apply_weighted(ctx, weighted)
        vhost = ctx.vhost
        assert vhost is not None
        timeout = self._timeout(ctx, action)
        policy = request_policy(action.retry_policy or vhost.retry_policy, ctx.head, ctx.internal)
        if upgrade:
            policy = None  # a tunnel cannot be replayed
        body = self._replay_body(ctx, route, policy is not None or bool(action.mirror_policies))
        if action.mirror_policies:
            self.mirror.shadow(action.mirror_policies, ctx.head, body, timeout, self._rng.randrange)
        plan = ctx.plan
        route_stats = plan.stats if plan is not None and plan.route is route else None
        exchange = _Exchange(
            ctx,
            cluster,
            action,
            route_stats or ctx.responder.route_stats(vhost, route),
            self._envoy_headers,
            _Retries(policy, self._retry_stats_of(cluster), self._rng.random) if policy else None,
            body,
        )
        idle_timeout = action.idle_timeout or ctx.responder.stream_idle_timeout
        # The cluster's max_requests circuit breaker for the route's priority.
        resources = cluster.resources(action.priority)
        if not resources.try_acquire_request():
            await ctx.send_local_reply(upstream_reset("overflow"))
            return
        try:
            await exchange.run(timeout, idle_timeout)
        finally:
            resources.release_request()

    def _retry_stats_of(self, cluster: ClusterRuntime) -> RetryStats:
        found = self._retry_stats.get(cluster.name)
        if found is None:
            scope = self._runtime.stats.scope("cluster.", "envoy_cluster_name", cluster.name)
            found = self._retry_stats[cluster.name] = RetryStats(scope)
        return found

    @staticmethod
    def _replay_body(ctx: RequestContext, route: Route, wanted: bool) -> ReplayBody | None:
        """A replayable copy of the request body when a retry or a mirror may
        need it (None for requests without a body)."""
        body = ctx.stream.body
        if not wanted or request_body(body) is None:
            return None
        vhost = ctx.vhost
        limit = route.per_request_buffer_limit
        if limit is None and vhost is not None:
            limit = vhost.per_request_buffer_limit
        return ReplayBody(body, DEFAULT_REQUEST_BUFFER_LIMIT if limit is None else limit)

    @staticmethod
    def _apply_weighted(ctx: RequestContext, weighted: WeightedCluster) -> None:
        if not weighted.request_headers.empty:
            apply_header_mutation(ctx.head.headers, weighted.request_headers)
        if not weighted.response_headers.empty:
            # Most specific first, as Envoy applies the weighted cluster's before the route's.
            ctx.response_mutations = (weighted.response_headers, *ctx.response_mutations)

    @staticmethod
    def _finalize_request(
        ctx: RequestContext, route: Route, action: ClusterAction, envoy_headers: bool
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
        plan = ctx.plan
        if plan is not None and plan.route is route:
            for mutation in plan.request_mutations:
                apply_header_mutation(head.headers, mutation)
        elif ctx.route_config is not None and ctx.vhost is not None:
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


class _Retries:
    """What an exchange needs to retry: the decisions and the cluster's counters."""

    __slots__ = ("attempts", "state", "stats", "tried")

    def __init__(self, policy: RetryPolicy, stats: RetryStats, draw: Callable[[], float]) -> None:
        self.state = RetryState(policy, draw)
        self.stats = stats
        self.attempts = 1
        self.tried: set[object] = set()

    @property
    def policy(self) -> RetryPolicy:
        return self.state.policy


class _Failure:
    """An attempt that ended before a response head: the reply to send if no
    retry follows, and the kind of failure the retry policy judges."""

    __slots__ = ("kind", "reply")

    def __init__(self, reply: LocalReply, kind: str) -> None:
        self.reply = reply
        self.kind = kind


class _Exchange:
    """One request's attempts at the cluster's hosts, then the response relay."""

    __slots__ = (
        "_action",
        "_body",
        "_cluster",
        "_ctx",
        "_envoy_headers",
        "_host",
        "_lb_context",
        "_lease",
        "_response",
        "_retries",
        "_retry_held",
        "_route_stats",
        "_sent_at",
        "_watchdog",
    )

    def __init__(
        self,
        ctx: RequestContext,
        cluster: ClusterRuntime,
        action: ClusterAction,
        route_stats: RouteStats,
        envoy_headers: bool,
        retries: _Retries | None,
        body: ReplayBody | None,
    ) -> None:
        self._ctx = ctx
        self._envoy_headers = envoy_headers
        self._cluster = cluster
        self._action = action
        self._host: Host | None = None
        # The consistent-hash key of the route's hash policies (RING_HASH, MAGLEV).
        policies = action.hash_policies
        self._lb_context = LbContext(compute_hash(policies, ctx.head, ctx.info)) if policies else None
        self._route_stats = route_stats
        self._retries = retries
        self._retry_held = False
        self._body = body
        self._lease: Lease | None = None
        self._response: UpstreamResponse | None = None
        self._watchdog: Watchdog | None = None
        self._sent_at = 0.0

    async def run(self, route_timeout: float | None, idle_timeout: float | None) -> None:
        ctx, cluster = self._ctx, self._cluster
        cluster_stats = cluster.stats
        cluster_stats.rq_total.value += 1
        cluster_stats.rq_active.value += 1
        self._route_stats.rq_total.value += 1
        self._watchdog = Watchdog(route_timeout, idle_timeout, ctx.stream.body, ctx.task)
        completed = False
        try:
            completed = await self._attempts()
        except asyncio.CancelledError:
            fired = self._watchdog.absorb()
            if not fired:
                ctx.info.flags |= ResponseFlag.DC
                raise
            await self._timed_out(fired)
        finally:
            self._watchdog.stop()
            self._release_retry()
            cluster_stats.rq_active.value -= 1
            self._end_attempt(completed)
            if self._body is not None:
                self._body.stop()

    async def _attempts(self) -> bool:
        """Try hosts until a response is relayed or no retry is left; True when
        the exchange completed cleanly."""
        retries = self._retries
        while True:
            host = self._choose_host()
            if host is None:
                await self._fail(NO_HEALTHY_UPSTREAM)
                return False
            outcome = await self._attempt(host)
            self._release_retry()
            _record_outcome(host, outcome)
            if isinstance(outcome, UpstreamResponse):
                status_retry = retries is not None and retries.state.wants_retry_for_status(outcome.head)
                if status_retry and self._may_retry():
                    self._discard(outcome)
                    await self._back_off()
                    continue
                if retries is not None and retries.attempts > 1 and outcome.head.status < 500:
                    retries.stats.success.inc()
                self._add_attempt_count(outcome.head)
                return await self._relay(outcome)
            self._end_attempt(False)
            reset_retry = retries is not None and retries.state.wants_retry_for_reset(outcome.kind)
            if reset_retry and self._may_retry():
                await self._back_off()
                continue
            await self._fail(outcome.reply)
            return False

    def _choose_host(self) -> Host | None:
        """The load balancer's pick. With the previous-hosts predicate, a retry
        re-picks up to ``host_selection_retry_max_attempts`` times to avoid
        hosts already tried (Envoy: that many re-selections after the first)."""
        retries = self._retries
        context = self._lb_context
        if retries is not None and retries.policy.avoid_previous_hosts and retries.tried:
            if context is None:
                context = self._lb_context = LbContext()
            context.tried = retries.tried
            context.host_selection_attempts = retries.policy.host_selection_retry_max_attempts + 1
        return self._cluster.choose_host(context)

    def _may_retry(self) -> bool:
        """Take a retry if the body can be replayed, the policy's budget and
        the cluster's circuit breaker allow it (the slot is held until the
        back-off is over)."""
        retries = self._retries
        assert retries is not None
        body = self._body
        if body is not None and not body.replayable:
            return False
        if not retries.state.take_retry():
            retries.stats.limit_exceeded.inc()
            self._ctx.info.flags |= ResponseFlag.URX
            return False
        if not self._cluster.resources(self._action.priority).try_acquire_retry():
            return False  # the circuit breaker counted upstream_rq_retry_overflow
        self._retry_held = True
        retries.stats.retry.inc()
        retries.attempts += 1
        return True

    async def _back_off(self) -> None:
        retries = self._retries
        assert retries is not None
        await asyncio.sleep(retries.state.back_off())

    def _release_retry(self) -> None:
        """The retry (its back-off and its attempt) is over: free its circuit-breaker slot."""
        if self._retry_held:
            self._retry_held = False
            self._cluster.resources(self._action.priority).release_retry()

    async def _attempt(self, host: Host) -> UpstreamResponse | _Failure:
        ctx = self._ctx
        self._host = host
        ctx.info.upstream_host = host.address_text
        counters = host.counters
        counters.rq_total += 1
        counters.rq_active += 1
        head = ctx.head
        if self._action.auto_host_rewrite and host.hostname:
            head.authority = host.hostname
        retries = self._retries
        if retries is not None:
            retries.tried.add(host)
        vhost = ctx.vhost
        if vhost is not None and vhost.include_request_attempt_count:
            set_header(head.headers, ATTEMPT_COUNT, str(retries.attempts if retries else 1))
        body = self._body.attempt_body() if self._body is not None else request_body(ctx.stream.body)
        per_try = retries.policy.per_try_timeout if retries is not None else None
        pool = host.pool(self._cluster.pool_kind(head.version))
        try:
            if per_try is None:  # the usual case: no timer of its own (and _send inlined)
                self._lease = lease = pool.acquire_now() or await pool.acquire()
                self._sent_at = time.monotonic()
                self._response = await lease.connection.request(head, body)
            else:
                async with asyncio.timeout(per_try):
                    self._response = await self._send(pool, head, body)
        except TimeoutError:
            assert retries is not None
            retries.stats.per_try_timeout.inc()
            self._cluster.stats.rq_timeout.inc()
            return _Failure(UPSTREAM_TIMEOUT, PER_TRY_TIMEOUT)
        except UpstreamConnectError as exc:
            ctx.info.upstream_failure_reason = exc.detail
            kind = OVERFLOW if exc.reason == "overflow" else CONNECT_FAILURE
            return _Failure(upstream_reset(exc.reason), kind)
        except StreamReset as exc:
            self._cluster.stats.rq_rx_reset.inc()
            kind = REFUSED_STREAM if exc.code == "REFUSED_STREAM" else RESET
            return _Failure(upstream_reset(reset_reason(exc)), kind)
        return self._response

    async def _send(
        self, pool: ConnectionPool, head: RequestHead, body: BodyStream | None
    ) -> UpstreamResponse:
        self._lease = lease = pool.acquire_now() or await pool.acquire()
        self._sent_at = time.monotonic()
        return await lease.connection.request(head, body)

    def _discard(self, response: UpstreamResponse) -> None:
        """Drop a response that will be retried (its stats still count)."""
        elapsed_ms = (time.monotonic() - self._sent_at) * 1000
        self._cluster.stats.response(response.head.status, elapsed_ms)
        body = response.body
        reusable = body.ended and not body.aborted and not body.trailers
        if reusable:
            body.read_nowait()
        self._end_attempt(reusable)

    def _add_attempt_count(self, head: ResponseHead) -> None:
        vhost = self._ctx.vhost
        if vhost is not None and vhost.include_attempt_count_in_response:
            retries = self._retries
            head.headers.append((ATTEMPT_COUNT, str(retries.attempts if retries else 1)))

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
        await ctx.responder.send_head(ctx, head, ends_now)
        if ends_now:
            return True
        stream, info = ctx.stream, ctx.info
        if body.ended and not body.aborted and not body.trailers:
            # The whole (bounded) body is already here, as for most small
            # responses: it leaves with the end of the stream in one write.
            data = body.read_nowait()
            info.bytes_sent += len(data)
            await stream.send_data(data, end_stream=True)
            return True
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
            if self._host is not None:
                self._host.record_result(504)  # outlier detection sees the timeout
            reply = UPSTREAM_TIMEOUT
        else:
            reply = STREAM_IDLE_TIMEOUT
        if ctx.stream.head_sent:
            ctx.info.flags |= reply.flag
            ctx.stream.reset("CANCEL")
            return
        await self._fail(reply)

    def _end_attempt(self, completed: bool) -> None:
        """Give the attempt's connection back (closed unless it completed
        cleanly) and settle the host's counters. Idempotent."""
        host = self._host
        if host is None:
            return
        self._host = None
        host.counters.rq_active -= 1
        if not completed:
            host.counters.rq_error += 1
        lease, response = self._lease, self._response
        self._lease = self._response = None
        if lease is None:
            return
        if not completed and response is not None and response.cancel is not None:
            response.cancel()
            lease.release()
            return
        lease.release(reusable=completed)


def _record_outcome(host: Host, outcome: UpstreamResponse | _Failure) -> None:
    """Tell outlier detection how the attempt went: the upstream's status, or
    the 5xx the proxy makes of a failure (a local overflow is no fault of
    the host's)."""
    if isinstance(outcome, UpstreamResponse):
        host.record_result(outcome.head.status)
    elif outcome.kind != OVERFLOW:
        host.record_result(504 if outcome.kind == PER_TRY_TIMEOUT else 503)


def _router_factory(cfg: HttpFilterConfig, runtime: ProxyRuntime, path: str) -> Router:
    # cfg.config is the compiler's RouterFilterConfig (absent when built directly).
    suppress = bool(getattr(cfg.config, "suppress_envoy_headers", False))
    return Router(runtime, suppress_envoy_headers=suppress, rng=runtime.random)


register_http_filter(ROUTER_NAME, _router_factory, [ROUTER_TYPE_URL])
