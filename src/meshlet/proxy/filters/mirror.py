"""Request mirroring (``request_mirror_policies``): fire-and-forget copies.

A copy goes to the mirror cluster with ``-shadow`` appended to the host part
of ``:authority`` (as Envoy does), in a task of its own: the primary request
never waits for it, and whatever happens to the copy (slow, refused, reset)
is counted and forgotten. Bodies are copied only when the whole body fits
the route's buffer limit (``ReplayBody``); the number of copies in flight
per proxy is bounded, and each one is bounded in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshlet.config.model import FractionalPercent, MirrorPolicy
from meshlet.proxy.filters.retry import ReplayBody
from meshlet.proxy.http.stream import BodyStream, RequestHead, StreamReset
from meshlet.proxy.routing.table import split_port
from meshlet.proxy.upstream.pool import UpstreamConnectError

if TYPE_CHECKING:
    from meshlet.proxy.runtime import ProxyRuntime
    from meshlet.proxy.upstream.cluster import ClusterRuntime

DEFAULT_MAX_IN_FLIGHT = 1024
# A copy that is not done in this long (or the route timeout, if shorter) is abandoned.
DEFAULT_MIRROR_TIMEOUT = 15.0
# Response bytes of a copy read (and dropped) before the connection is given up.
_MAX_DISCARD = 1024 * 1024


def shadow_authority(authority: str) -> str:
    """``foo:8080`` -> ``foo-shadow:8080`` (the port stays where it was)."""
    host, port = split_port(authority)
    return f"{host}-shadow:{port}" if port is not None else f"{host}-shadow"


def sampled(fraction: FractionalPercent | None, draw: Callable[[int], int]) -> bool:
    if fraction is None or fraction.always:
        return True
    return draw(fraction.denominator) < fraction.numerator


class Mirror:
    """Sends and tracks the copies of one proxy runtime."""

    def __init__(self, runtime: ProxyRuntime, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self._runtime = runtime
        self.max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        stats = runtime.stats
        self.sent = stats.counter("http.mirror.requests_sent")
        self.dropped = stats.counter("http.mirror.requests_dropped")
        self.failed = stats.counter("http.mirror.requests_failed")

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def shadow(
        self,
        policies: tuple[MirrorPolicy, ...],
        head: RequestHead,
        body: ReplayBody | None,
        timeout: float | None,
        draw: Callable[[int], int],
    ) -> None:
        """Start the copies ``policies`` ask for; returns at once."""
        limit = min(timeout or DEFAULT_MIRROR_TIMEOUT, DEFAULT_MIRROR_TIMEOUT)
        for policy in policies:
            if not sampled(policy.fraction, draw):
                continue
            cluster = self._runtime.cluster_manager().get(policy.cluster)
            if cluster is None or len(self._tasks) >= self.max_in_flight:
                self.dropped.inc()
                continue
            copy = RequestHead(
                head.method,
                head.scheme,
                shadow_authority(head.authority),
                head.path,
                list(head.headers),
                head.version,
                head.protocol,
            )
            task = asyncio.get_running_loop().create_task(self._send(cluster, copy, body, limit))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(
        self, cluster: ClusterRuntime, head: RequestHead, body: ReplayBody | None, timeout: float
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._exchange(cluster, head, body, timeout)
        except (TimeoutError, UpstreamConnectError, StreamReset, OSError, ValueError):
            self.failed.inc()

    async def _exchange(
        self, cluster: ClusterRuntime, head: RequestHead, body: ReplayBody | None, timeout: float
    ) -> None:
        request_body: BodyStream | None = None
        if body is not None:
            if not await body.wait_complete(timeout):
                # Too large to keep (or the client gave up): no copy.
                self.dropped.inc()
                return
            request_body = BodyStream.of(body.data(), body.trailers)
        host = cluster.choose_host()
        if host is None:
            self.failed.inc()
            return
        pool = host.pool(cluster.pool_kind(head.version))
        lease = await pool.acquire()
        completed = False
        try:
            self.sent.inc()
            cluster.stats.rq_total.inc()
            started = time.monotonic()
            response = await lease.connection.request(head, request_body)
            cluster.stats.response(response.head.status, (time.monotonic() - started) * 1000)
            await response.body.read_all(_MAX_DISCARD)
            completed = True
        finally:
            lease.release(reusable=completed)

    async def close(self) -> None:
        """Cancel the copies still in flight (proxy shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
