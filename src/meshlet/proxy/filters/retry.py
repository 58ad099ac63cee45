"""Retries for the router: which policy applies, when to retry, how long to
back off, and a request body that can be sent again.

``RetryState`` is sans-IO: it takes outcomes (a response head, or a reset
reason) and says whether to try again; the router does the waiting and the
sending. ``ReplayBody`` keeps a copy of the request body, up to a bound, so
a later attempt (or a mirror) can send it again; past the bound the body
just streams through and no retry happens (Envoy's retry shadow buffer).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import replace

from meshlet.config.model import HeaderMatcher, RetryPolicy
from meshlet.proxy.http.stream import BodyStream, Headers, RequestHead, ResponseHead
from meshlet.proxy.observe.stats import Scope
from meshlet.proxy.routing.matchers import header_predicate

# Reset kinds the router reports to ``RetryState.retry_on_reset``.
CONNECT_FAILURE = "connect-failure"
REFUSED_STREAM = "refused-stream"
RESET = "reset"
PER_TRY_TIMEOUT = "per-try-timeout"
OVERFLOW = "overflow"

_RETRY_HEADERS = (
    "x-envoy-retry-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-retriable-status-codes",
)
_GATEWAY_ERRORS = frozenset({502, 503, 504})
_KNOWN_CONDITIONS = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
    }
)


class RetryStats:
    """The cluster's ``upstream_rq_retry*`` counters (Envoy names)."""

    __slots__ = ("limit_exceeded", "per_try_timeout", "retry", "success")

    def __init__(self, scope: Scope) -> None:
        self.retry = scope.counter("upstream_rq_retry")
        self.success = scope.counter("upstream_rq_retry_success")
        self.limit_exceeded = scope.counter("upstream_rq_retry_limit_exceeded")
        self.per_try_timeout = scope.counter("upstream_rq_per_try_timeout")


def request_policy(base: RetryPolicy | None, head: RequestHead, internal: bool) -> RetryPolicy | None:
    """The route's (or virtual host's) policy, amended by the ``x-envoy-retry-*``
    headers of an internal request (Envoy honours them only from trusted
    callers; the connection manager strips them from external ones)."""
    values: dict[str, str] = {}
    if internal:
        for name, value in head.headers:
            if name in _RETRY_HEADERS:
                values[name] = value
    if not internal or not values:
        return base
    policy = base or RetryPolicy(retry_on=frozenset(), num_retries=1)
    conditions = {c.strip() for c in values.get("x-envoy-retry-on", "").split(",")} & _KNOWN_CONDITIONS
    codes = {
        int(c) for c in values.get("x-envoy-retriable-status-codes", "").split(",") if c.strip().isdigit()
    }
    retries = values.get("x-envoy-max-retries", "")
    per_try = values.get("x-envoy-upstream-rq-per-try-timeout-ms", "")
    policy = replace(
        policy,
        retry_on=policy.retry_on | conditions,
        retriable_status_codes=policy.retriable_status_codes | codes,
        num_retries=int(retries) if retries.isdigit() else policy.num_retries,
        per_try_timeout=int(per_try) / 1000 if per_try.isdigit() and int(per_try) else policy.per_try_timeout,
    )
    return policy if policy.retry_on else None


def _response_predicate(matchers: tuple[HeaderMatcher, ...]) -> Callable[[ResponseHead], bool]:
    checks = [header_predicate(m) for m in matchers]

    def matches(head: ResponseHead) -> bool:
        # The request-side predicates read ``headers`` only (no pseudo-headers here).
        as_request = RequestHead("", "", "", "", head.headers)
        return any(check(as_request) for check in checks)

    return matches


class RetryState:
    """One request's retry budget and decisions."""

    __slots__ = ("_attempt", "_draw", "_policy", "_retriable_headers", "retries_left")

    def __init__(self, policy: RetryPolicy, draw: Callable[[], float] = random.random) -> None:
        self._policy = policy
        self._draw = draw
        self.retries_left = policy.num_retries
        self._attempt = 0
        self._retriable_headers = (
            _response_predicate(policy.retriable_headers)
            if "retriable-headers" in policy.retry_on and policy.retriable_headers
            else None
        )

    @property
    def policy(self) -> RetryPolicy:
        return self._policy

    def wants_retry_for_status(self, head: ResponseHead) -> bool:
        """Would the policy retry this response (budget aside)?"""
        on, status = self._policy.retry_on, head.status
        if status >= 500 and "5xx" in on:
            return True
        if status in _GATEWAY_ERRORS and "gateway-error" in on:
            return True
        if status == 409 and "retriable-4xx" in on:
            return True
        if "retriable-status-codes" in on and status in self._policy.retriable_status_codes:
            return True
        return self._retriable_headers is not None and self._retriable_headers(head)

    def wants_retry_for_reset(self, kind: str) -> bool:
        """Would the policy retry a failure before any response head?"""
        on = self._policy.retry_on
        if kind == OVERFLOW:
            return False
        if "5xx" in on or "gateway-error" in on or "reset" in on:
            return True
        if kind == CONNECT_FAILURE:
            return "connect-failure" in on
        return kind == REFUSED_STREAM and "refused-stream" in on

    def take_retry(self) -> bool:
        """Use one retry of the budget; False when none is left."""
        if self.retries_left <= 0:
            return False
        self.retries_left -= 1
        self._attempt += 1
        return True

    def back_off(self) -> float:
        """Envoy's jittered exponential back-off: uniform in
        [0, base * (2^n - 1)) for the n-th retry, capped at the maximum."""
        ceiling = self._policy.back_off_base * ((1 << min(self._attempt, 30)) - 1)
        return min(self._draw() * ceiling, self._policy.back_off_max)


class ReplayBody:
    """The downstream request body, streamed to one attempt at a time while
    a copy of up to ``limit`` bytes is kept for the next attempt.

    Each attempt gets a fresh ``BodyStream``: the kept bytes, then whatever
    is still to come from the client (copied by a pump task with the usual
    backpressure). Once more than ``limit`` bytes went by, the copy is
    dropped and ``replayable`` is False for good.
    """

    __slots__ = ("_chunks", "_complete", "_pump", "_size", "_source", "limit", "replayable")

    def __init__(self, source: BodyStream, limit: int) -> None:
        self._source = source
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.replayable = True
        self._pump: asyncio.Task[None] | None = None
        self._complete = asyncio.Event()
        if source.ended and not source.aborted and source.buffered <= limit:
            # The whole body came with the head (the usual small request).
            self._record(source.read_nowait())
            if self.replayable:
                self._complete.set()

    @property
    def complete(self) -> bool:
        """The client sent the whole body and every byte of it is kept."""
        return self._complete.is_set()

    def data(self) -> bytes:
        return b"".join(self._chunks)

    @property
    def trailers(self) -> Headers | None:
        return self._source.trailers

    async def wait_complete(self, timeout: float) -> bool:
        """Wait (bounded) until the whole body is kept; False if it never will be."""
        try:
            await asyncio.wait_for(self._complete.wait(), timeout)
        except TimeoutError:
            return False
        return self.replayable

    def attempt_body(self) -> BodyStream:
        """A body for the next attempt. Only valid while ``replayable``."""
        self.stop()
        body = BodyStream()
        for chunk in self._chunks:
            body.feed(chunk)
        source = self._source
        if source.ended and not source.aborted and not source.buffered:
            body.end(source.trailers)
        else:
            self._pump = asyncio.get_running_loop().create_task(self._copy(body))
        return body

    def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None

    async def _copy(self, body: BodyStream) -> None:
        source = self._source
        try:
            while chunk := await source.read():
                self._record(chunk)
                await body.write(chunk)
        except Exception as exc:  # the client aborted: so does this attempt's body
            body.abort(exc)
            self.replayable = False
            self._complete.set()
            return
        body.end(source.trailers)
        self._complete.set()

    def _record(self, chunk: bytes) -> None:
        if not self.replayable or not chunk:
            return
        self._size += len(chunk)
        if self._size > self.limit:
            self.replayable = False
            self._chunks = []
            self._complete.set()
            return
        self._chunks.append(chunk)


def set_header(headers: Headers, name: str, value: str) -> None:
    """Replace the first ``name`` header (or add it)."""
    for i, (k, _) in enumerate(headers):
        if k == name:
            headers[i] = (name, value)
            return
    headers.append((name, value))
