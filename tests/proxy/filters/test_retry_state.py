"""RetryState decisions and back-off, the retry headers, and ReplayBody, without sockets."""

from __future__ import annotations

import asyncio

import pytest

from meshlet.config.model import HeaderMatcher, HeaderMatchKind, RetryPolicy
from meshlet.proxy.filters.retry import (
    CONNECT_FAILURE,
    OVERFLOW,
    PER_TRY_TIMEOUT,
    REFUSED_STREAM,
    RESET,
    ReplayBody,
    RetryState,
    request_policy,
)
from meshlet.proxy.http.stream import BodyStream, RequestHead, ResponseHead


def state(*retry_on: str, **kw: object) -> RetryState:
    return RetryState(RetryPolicy(retry_on=frozenset(retry_on), **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("retry_on", "status", "expected"),
    [
        ("5xx", 500, True),
        ("5xx", 404, False),
        ("gateway-error", 502, True),
        ("gateway-error", 500, False),
        ("retriable-4xx", 409, True),
        ("retriable-4xx", 404, False),
    ],
)
def test_status_conditions(retry_on: str, status: int, expected: bool) -> None:
    assert state(retry_on).wants_retry_for_status(ResponseHead(status)) is expected


def test_retriable_status_codes_and_headers() -> None:
    codes = state("retriable-status-codes", retriable_status_codes=frozenset({418}))
    assert codes.wants_retry_for_status(ResponseHead(418))
    assert not codes.wants_retry_for_status(ResponseHead(419))
    matcher = HeaderMatcher(name="x-retry", kind=HeaderMatchKind.PRESENT, invert=False)
    by_header = state("retriable-headers", retriable_headers=(matcher,))
    assert by_header.wants_retry_for_status(ResponseHead(200, [("x-retry", "1")]))
    assert not by_header.wants_retry_for_status(ResponseHead(200))


@pytest.mark.parametrize(
    ("retry_on", "kind", "expected"),
    [
        ("5xx", RESET, True),
        ("5xx", PER_TRY_TIMEOUT, True),
        ("gateway-error", CONNECT_FAILURE, True),
        ("connect-failure", CONNECT_FAILURE, True),
        ("connect-failure", RESET, False),
        ("refused-stream", REFUSED_STREAM, True),
        ("refused-stream", RESET, False),
        ("reset", RESET, True),
        ("5xx", OVERFLOW, False),
    ],
)
def test_reset_conditions(retry_on: str, kind: str, expected: bool) -> None:
    assert state(retry_on).wants_retry_for_reset(kind) is expected


def test_budget_and_jittered_exponential_back_off() -> None:
    draws = iter([0.999, 0.999, 0.999, 0.5])
    retry = RetryState(
        RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=4, back_off_base=0.01, back_off_max=0.05),
        draw=lambda: next(draws),
    )
    waits = []
    while retry.take_retry():
        waits.append(retry.back_off())
    # Ceilings 10, 30, 70 (capped at 50), 150 (capped) ms.
    assert waits == [pytest.approx(0.00999), pytest.approx(0.02997), 0.05, 0.05]
    assert retry.retries_left == 0


def test_retry_headers_only_from_internal_requests() -> None:
    def head() -> RequestHead:
        return RequestHead(
            "GET",
            "http",
            "a",
            "/",
            [
                ("x-envoy-retry-on", "5xx,unknown"),
                ("x-envoy-max-retries", "3"),
                ("x-envoy-upstream-rq-per-try-timeout-ms", "150"),
                ("x-envoy-retriable-status-codes", "418,x"),
            ],
        )

    assert request_policy(None, head(), internal=False) is None
    policy = request_policy(None, head(), internal=True)
    assert policy == RetryPolicy(
        retry_on=frozenset({"5xx"}),
        num_retries=3,
        per_try_timeout=0.15,
        retriable_status_codes=frozenset({418}),
    )
    base = RetryPolicy(retry_on=frozenset({"reset"}), num_retries=1)
    merged = request_policy(base, head(), internal=True)
    assert merged is not None and merged.retry_on == frozenset({"reset", "5xx"})
    assert request_policy(base, head(), internal=False) is base


async def test_replay_body_keeps_a_copy_within_the_limit() -> None:
    source = BodyStream()
    replay = ReplayBody(source, limit=10)
    first = replay.attempt_body()
    source.feed(b"abc")
    assert await first.read() == b"abc"
    # The first attempt failed mid-way: the next one starts from the beginning.
    second = replay.attempt_body()
    source.feed(b"def")
    source.end()
    assert await second.read_all(100) == b"abcdef"
    assert replay.replayable and await replay.wait_complete(1)
    assert replay.data() == b"abcdef"


async def test_replay_body_gives_up_past_the_limit_but_still_streams() -> None:
    source = BodyStream()
    replay = ReplayBody(source, limit=4)
    body = replay.attempt_body()
    source.feed(b"abc")
    source.feed(b"def")
    source.end()
    assert await body.read_all(100) == b"abcdef"
    assert not replay.replayable
    assert not await replay.wait_complete(1)


async def test_a_body_complete_with_the_head_needs_no_pump() -> None:
    replay = ReplayBody(BodyStream.of(b"whole", [("x-t", "1")]), limit=100)
    assert replay.complete
    for _ in range(2):
        body = replay.attempt_body()
        assert body.ended
        assert await body.read_all(100) == b"whole"
        assert body.trailers == [("x-t", "1")]
    await asyncio.sleep(0)
