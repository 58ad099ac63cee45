"""Local rate limiting (``envoy.filters.http.local_ratelimit``): a token bucket per filter
(and one per route that overrides it through ``typed_per_filter_config``).

A request takes a token; with none left it is answered with the configured
status (429 by default), ``response_headers_to_add`` and, with
``enable_x_ratelimit_headers: DRAFT_VERSION_03``, the ``x-ratelimit-*``
headers (which then go on every response). ``filter_enabled`` decides which
share of requests is checked at all, ``filter_enforced`` which share of the
limited ones is actually refused (the rest are only counted).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshlet.config.model import FractionalPercent, HeaderMutation, HttpFilterConfig
from meshlet.config.ratelimit import (
    LOCAL_RATELIMIT_NAME,
    LOCAL_RATELIMIT_TYPE_URL,
    LocalRateLimitConfig,
    TokenBucketConfig,
)
from meshlet.proxy.filters.base import HttpFilter, RequestContext, register_http_filter
from meshlet.proxy.http.local_reply import LocalReply
from meshlet.proxy.http.stream import ResponseHead
from meshlet.proxy.observe.access_log import ResponseFlag
from meshlet.proxy.routing.headers import apply_header_mutation

if TYPE_CHECKING:
    from meshlet.proxy.runtime import ProxyRuntime

_STATE_KEY = "local_ratelimit.headers"
_LIMITED_KEY = "local_ratelimit.limited"
# Per-route buckets kept at most (routes of replaced configs fall out first).
_MAX_ROUTE_BUCKETS = 4096


class TokenBucket:
    """Sans-IO token bucket: ``now`` comes from the caller."""

    __slots__ = ("_config", "_last_fill", "tokens")

    def __init__(self, config: TokenBucketConfig, now: float) -> None:
        self._config = config
        self.tokens = config.max_tokens
        self._last_fill = now

    def _refill(self, now: float) -> None:
        cfg = self._config
        fills = math.floor((now - self._last_fill) / cfg.fill_interval)
        if fills > 0:
            self.tokens = min(cfg.max_tokens, self.tokens + fills * cfg.tokens_per_fill)
            self._last_fill += fills * cfg.fill_interval

    def try_take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens <= 0:
            return False
        self.tokens -= 1
        return True

    def seconds_to_fill(self, now: float) -> int:
        """Whole seconds until the next fill (x-ratelimit-reset)."""
        return max(0, math.ceil(self._last_fill + self._config.fill_interval - now))

    @property
    def max_tokens(self) -> int:
        return self._config.max_tokens


class RateLimitStats:
    """``<stat_prefix>.http_local_rate_limit.{enabled,enforced,rate_limited,ok}``."""

    def __init__(self, runtime: ProxyRuntime, stat_prefix: str) -> None:
        scope = runtime.stats.scope("", "envoy_local_http_ratelimit_prefix", stat_prefix)
        self.enabled = scope.counter("http_local_rate_limit.enabled")
        self.enforced = scope.counter("http_local_rate_limit.enforced")
        self.rate_limited = scope.counter("http_local_rate_limit.rate_limited")
        self.ok = scope.counter("http_local_rate_limit.ok")


class _Limiter:
    """One config's bucket and stats."""

    __slots__ = ("bucket", "config", "mutation", "reply", "stats")

    def __init__(self, config: LocalRateLimitConfig, runtime: ProxyRuntime, now: float) -> None:
        self.config = config
        self.bucket = TokenBucket(config.bucket, now) if config.bucket is not None else None
        self.stats = RateLimitStats(runtime, config.stat_prefix)
        self.reply = LocalReply(
            config.status,
            b"local_rate_limited",
            ResponseFlag.RL,
            "local_rate_limited",
        )
        # response_headers_to_add: only on the limited responses.
        self.mutation = HeaderMutation(add=config.response_headers) if config.response_headers else None


class LocalRateLimitFilter(HttpFilter):
    name = LOCAL_RATELIMIT_NAME

    def __init__(
        self,
        config: LocalRateLimitConfig,
        runtime: ProxyRuntime,
        *,
        filter_name: str = LOCAL_RATELIMIT_NAME,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[int], int] | None = None,
    ) -> None:
        self._runtime = runtime
        self._filter_name = filter_name
        self._clock = clock
        self._draw = draw or runtime.random.randrange
        self._limiter = _Limiter(config, runtime, clock())
        self._route_limiters: dict[int, _Limiter] = {}

    async def on_request(self, ctx: RequestContext) -> LocalReply | None:
        limiter = self._limiter_for(ctx)
        config, stats = limiter.config, limiter.stats
        if limiter.bucket is None or not self._hit(config.enabled):
            return None
        stats.enabled.inc()
        now = self._clock()
        allowed = limiter.bucket.try_take(now)
        if config.x_ratelimit_headers:
            ctx.filter_state[_STATE_KEY] = self._x_headers(limiter.bucket, now)
        if allowed:
            stats.ok.inc()
            return None
        stats.rate_limited.inc()
        if not self._hit(config.enforced):
            return None
        stats.enforced.inc()
        ctx.filter_state[_LIMITED_KEY] = limiter
        return limiter.reply

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        limiter = self._limiter_for(ctx)
        extra = ctx.filter_state.get(_STATE_KEY)
        if isinstance(extra, list):
            head.headers.extend(extra)
        if ctx.filter_state.get(_LIMITED_KEY) is limiter and limiter.mutation is not None:
            apply_header_mutation(head.headers, limiter.mutation)

    def _limiter_for(self, ctx: RequestContext) -> _Limiter:
        for holder in (ctx.route, ctx.vhost):
            if holder is None:
                continue
            override = holder.per_filter_config.get(self._filter_name)
            if isinstance(override, LocalRateLimitConfig):
                return self._route_limiter(override)
        return self._limiter

    def _route_limiter(self, config: LocalRateLimitConfig) -> _Limiter:
        found = self._route_limiters.get(id(config))
        if found is None or found.config is not config:
            if len(self._route_limiters) >= _MAX_ROUTE_BUCKETS:
                self._route_limiters.clear()
            found = self._route_limiters[id(config)] = _Limiter(config, self._runtime, self._clock())
        return found

    def _hit(self, percent: FractionalPercent) -> bool:
        if percent.always:
            return True
        return percent.numerator > 0 and self._draw(percent.denominator) < percent.numerator

    @staticmethod
    def _x_headers(bucket: TokenBucket, now: float) -> list[tuple[str, str]]:
        return [
            ("x-ratelimit-limit", str(bucket.max_tokens)),
            ("x-ratelimit-remaining", str(max(bucket.tokens, 0))),
            ("x-ratelimit-reset", str(bucket.seconds_to_fill(now))),
        ]


def _factory(cfg: HttpFilterConfig, runtime: ProxyRuntime, path: str) -> LocalRateLimitFilter:
    config = cfg.config
    if not isinstance(config, LocalRateLimitConfig):
        config = LocalRateLimitConfig(stat_prefix="http_local_rate_limiter", bucket=None)
    return LocalRateLimitFilter(config, runtime, filter_name=cfg.name)


register_http_filter(LOCAL_RATELIMIT_NAME, _factory, [LOCAL_RATELIMIT_TYPE_URL])
