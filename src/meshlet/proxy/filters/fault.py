"""Fault injection (``envoy.filters.http.fault``): delays and aborts.

For a request the fault applies to (header matchers, downstream nodes, a
route override through ``typed_per_filter_config``), a delay is drawn with
its percentage and waited out, then an abort is drawn and answered as a
local reply: an HTTP status, or for gRPC a trailers-only ``200`` with
``grpc-status``. Header-controlled faults take the delay (ms), the HTTP or
gRPC status, and optionally a lower percentage from the request. At most
``max_active_faults`` requests are inside a fault at once; others pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from meshlet.config.fault import FAULT_NAME, FAULT_TYPE_URL, FaultConfig
from meshlet.config.model import FractionalPercent, HttpFilterConfig
from meshlet.proxy.filters.base import HttpFilter, RequestContext, register_http_filter
from meshlet.proxy.http.local_reply import LocalReply
from meshlet.proxy.observe.access_log import ResponseFlag
from meshlet.proxy.routing.matchers import header_predicate

if TYPE_CHECKING:
    from meshlet.proxy.runtime import ProxyRuntime

DELAY_HEADER = "x-envoy-fault-delay-request"
DELAY_PERCENT_HEADER = "x-envoy-fault-delay-request-percentage"
ABORT_HEADER = "x-envoy-fault-abort-request"
ABORT_GRPC_HEADER = "x-envoy-fault-abort-grpc-request"
ABORT_PERCENT_HEADER = "x-envoy-fault-abort-request-percentage"
DOWNSTREAM_NODE_HEADER = "x-envoy-downstream-service-node"
ABORT_BODY = b"fault filter abort"
# A header-controlled delay longer than this is cut to it (every wait is bounded).
MAX_HEADER_DELAY = 300.0


class FaultStats:
    def __init__(self, runtime: ProxyRuntime, stat_prefix: str) -> None:
        scope = runtime.stats.scope("http.", "envoy_http_conn_manager_prefix", stat_prefix)
        self.delays_injected = scope.counter("fault.delays_injected")
        self.aborts_injected = scope.counter("fault.aborts_injected")
        self.active_faults = scope.gauge("fault.active_faults")
        self.faults_overflow = scope.counter("fault.faults_overflow")


def percent_from_header(value: str | None, configured: FractionalPercent) -> FractionalPercent:
    """The configured percentage, lowered by a ``...-percentage`` header (never raised)."""
    if value is None or not value.strip().isdigit():
        return configured
    return FractionalPercent(min(int(value), configured.numerator), configured.denominator)


def _positive_int(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


class FaultFilter(HttpFilter):
    name = FAULT_NAME
    has_response_phase = False

    def __init__(
        self,
        config: FaultConfig,
        runtime: ProxyRuntime,
        *,
        filter_name: str = FAULT_NAME,
        draw: Callable[[int], int] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._filter_name = filter_name
        self._draw = draw or runtime.random.randrange
        self._sleep = sleep
        self.stats = FaultStats(runtime, config.stat_prefix)
        self._matchers: dict[int, tuple[FaultConfig, list[Callable[..., bool]]]] = {}

    async def on_request(self, ctx: RequestContext) -> LocalReply | None:
        config = self._effective(ctx)
        if config is None or not self._applies(config, ctx):
            return None
        delay = self._delay(config, ctx)
        abort = self._abort(config, ctx)
        if delay is None and abort is None:
            return None
        stats = self.stats
        limit = config.max_active_faults
        if limit is not None and stats.active_faults.value >= limit:
            stats.faults_overflow.inc()
            return None
        stats.active_faults.inc()
        try:
            if delay is not None:
                stats.delays_injected.inc()
                ctx.info.flags |= ResponseFlag.DI
                await self._sleep(delay)
        finally:
            stats.active_faults.dec()
        if abort is not None:
            stats.aborts_injected.inc()
        return abort

    def _effective(self, ctx: RequestContext) -> FaultConfig | None:
        """The route's override, else the virtual host's, else the filter's own."""
        for holder in (ctx.route, ctx.vhost):
            if holder is not None:
                override = holder.per_filter_config.get(self._filter_name)
                if isinstance(override, FaultConfig):
                    return override
        config = self._config
        return config if config.has_delay or config.has_abort else None

    def _applies(self, config: FaultConfig, ctx: RequestContext) -> bool:
        if config.downstream_nodes:
            node = ctx.head.get(DOWNSTREAM_NODE_HEADER)
            if node is None or node not in config.downstream_nodes:
                return False
        if not config.headers:
            return True
        cached = self._matchers.get(id(config))
        if cached is None or cached[0] is not config:
            cached = self._matchers[id(config)] = (config, [header_predicate(m) for m in config.headers])
        return all(check(ctx.head) for check in cached[1])

    def _hit(self, percent: FractionalPercent) -> bool:
        if percent.numerator <= 0:
            return False
        return percent.always or self._draw(percent.denominator) < percent.numerator

    def _delay(self, config: FaultConfig, ctx: RequestContext) -> float | None:
        if not config.has_delay:
            return None
        delay = config.delay
        percent = config.delay_percent
        if config.delay_from_header:
            ms = _positive_int(ctx.head.get(DELAY_HEADER))
            if ms is None:
                return None
            delay = min(ms / 1000, MAX_HEADER_DELAY)
            percent = percent_from_header(ctx.head.get(DELAY_PERCENT_HEADER), percent)
        return delay if delay is not None and self._hit(percent) else None

    def _abort(self, config: FaultConfig, ctx: RequestContext) -> LocalReply | None:
        if not config.has_abort:
            return None
        status, grpc, percent = config.abort_status, config.abort_grpc_status, config.abort_percent
        if config.abort_from_header:
            status = _positive_int(ctx.head.get(ABORT_HEADER))
            grpc = _positive_int(ctx.head.get(ABORT_GRPC_HEADER))
            if status is not None and not 200 <= status < 600:
                status = None
            if grpc is not None and grpc > 16:
                grpc = None
            percent = percent_from_header(ctx.head.get(ABORT_PERCENT_HEADER), percent)
        if (status is None and grpc is None) or not self._hit(percent):
            return None
        if grpc is not None:
            return grpc_abort(grpc)
        assert status is not None
        return LocalReply(status, ABORT_BODY, ResponseFlag.FI, "fault_filter_abort")


def grpc_abort(code: int) -> LocalReply:
    """A gRPC trailers-only response: HTTP 200 whose only headers carry the status."""
    headers = (
        ("content-type", "application/grpc"),
        ("grpc-status", str(code)),
        ("grpc-message", "fault filter abort"),
    )
    return LocalReply(200, b"", ResponseFlag.FI, "fault_filter_abort", headers)


def _fault_factory(cfg: HttpFilterConfig, runtime: ProxyRuntime, path: str) -> FaultFilter:
    config = cfg.config if isinstance(cfg.config, FaultConfig) else FaultConfig()
    return FaultFilter(config, runtime, filter_name=cfg.name)


register_http_filter(FAULT_NAME, _fault_factory, [FAULT_TYPE_URL])
