"""Retries through a real proxy on loopback: flaky upstreams, refused and
reset connections, previous hosts, per-try timeouts, back-off, body bounds."""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
from request_traffic_harness import App, Reply, Seen, bootstrap, cluster, running_proxy, stat

from meshlet.proxy.http.local_reply import NO_HEALTHY_UPSTREAM


def retry_route(policy: dict[str, object], **route: object) -> dict[str, object]:
    return {"match": {"prefix": "/"}, "route": {"cluster": "app", "retry_policy": policy, **route}}


def every_other_fails(first_status: int = 503) -> object:
    count = 0

    async def handler(app: App, seen: Seen) -> Reply:
        nonlocal count
        count += 1
        if count % 2 == 1:
            return first_status, [], b"flaky"
        return 200, [], b"ok"

    return handler


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_retries_recover_from_a_flaky_upstream() -> None:
    app = await App(handler=every_other_fails()).start()  # type: ignore[arg-type]
    config = bootstrap([retry_route({"retry_on": "5xx", "num_retries": 2})], [cluster("app", [app.port])])
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            for _ in range(10):
                r = await client.get("/x")
                assert (r.status_code, r.text) == (200, "ok")
            assert len(app.seen) == 20
            assert stat(proxy, "cluster.app.upstream_rq_retry") == 10
            assert stat(proxy, "cluster.app.upstream_rq_retry_success") == 10
            assert stat(proxy, "cluster.app.upstream_rq_503") == 10
            assert stat(proxy, "http.web.downstream_rq_2xx") == 10
    finally:
        app.close()


async def test_without_a_policy_the_failure_reaches_the_client() -> None:
    app = await App(handler=every_other_fails()).start()  # type: ignore[arg-type]
    route = {"match": {"prefix": "/"}, "route": {"cluster": "app"}}
    try:
        async with running_proxy(bootstrap([route], [cluster("app", [app.port])])) as (proxy, url):
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                assert (await client.get("/")).status_code == 503
                assert (await client.get("/")).status_code == 200
            assert stat(proxy, "cluster.app.upstream_rq_retry") == 0
    finally:
        app.close()


async def test_retry_on_connect_failure_moves_to_a_live_host() -> None:
    app = await App().start()
    policy = {
        "retry_on": "connect-failure",
        "num_retries": 1,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
        "host_selection_retry_max_attempts": 20,
    }
    config = bootstrap([retry_route(policy)], [cluster("app", [closed_port(), app.port])])
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            for _ in range(6):
                assert (await client.get("/a")).status_code == 200
            assert len(app.seen) == 6
            # Round robin starts each request on the refused port; each retry moves on.
            assert stat(proxy, "cluster.app.upstream_rq_retry") == 6
    finally:
        app.close()


async def test_previous_hosts_keeps_retries_off_the_failed_host() -> None:
    async def always_503(app: App, seen: Seen) -> Reply:
        return 503, [], b"bad"

    bad = await App("bad", always_503).start()
    good = await App("good").start()
    policy = {
        "retry_on": "5xx",
        "num_retries": 1,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
        "host_selection_retry_max_attempts": 3,
    }
    # Weighted 3:1, round robin picks bad, bad, good, bad: without the
    # predicate the first request's retry would land on the bad host again.
    config = bootstrap([retry_route(policy)], [cluster("app", [bad.port, good.port], weights=[3, 1])])
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            for _ in range(8):
                r = await client.get("/p")
                assert (r.status_code, r.text) == (200, "good saw /p")
            assert len(good.seen) == 8
            assert stat(proxy, "cluster.app.upstream_rq_retry") == len(bad.seen)
    finally:
        bad.close()
        good.close()


async def test_attempt_count_on_the_upstream_request_and_the_response() -> None:
    app = await App(handler=every_other_fails()).start()  # type: ignore[arg-type]
    vhost = {"include_request_attempt_count": True, "include_attempt_count_in_response": True}
    config = bootstrap(
        [retry_route({"retry_on": "5xx", "num_retries": 1})], [cluster("app", [app.port])], vhost=vhost
    )
    try:
        async with (
            running_proxy(config) as (_proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            r = await client.get("/")
            assert r.status_code == 200
            assert r.headers["x-envoy-attempt-count"] == "2"
            assert [s.headers["x-envoy-attempt-count"] for s in app.seen] == ["1", "2"]
    finally:
        app.close()


async def test_per_try_timeout_retries_a_slow_attempt_within_the_route_timeout() -> None:
    calls = 0

    async def first_hangs(app: App, seen: Seen) -> Reply:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(3)
        return 200, [], b"fast"

    app = await App(handler=first_hangs).start()
    policy = {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.2s"}
    config = bootstrap([retry_route(policy, timeout="5s")], [cluster("app", [app.port])])
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            started = time.monotonic()
            r = await client.get("/")
            elapsed = time.monotonic() - started
            assert (r.status_code, r.text) == (200, "fast")
            assert 0.2 <= elapsed < 2.5
            assert stat(proxy, "cluster.app.upstream_rq_per_try_timeout") == 1
    finally:
        app.close()


async def test_the_route_timeout_bounds_all_attempts() -> None:
    async def slow(app: App, seen: Seen) -> Reply:
        await asyncio.sleep(3)
        return 200, [], b"late"

    app = await App(handler=slow).start()
    policy = {"retry_on": "5xx", "num_retries": 5, "per_try_timeout": "0.3s"}
    config = bootstrap([retry_route(policy, timeout="0.5s")], [cluster("app", [app.port])])
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            started = time.monotonic()
            r = await client.get("/")
            assert r.status_code == 504
            assert time.monotonic() - started < 2.0
            assert stat(proxy, "cluster.app.upstream_rq_timeout") >= 1
    finally:
        app.close()


async def test_a_reset_before_the_response_is_retried() -> None:
    calls = 0

    async def first_drops(app: App, seen: Seen) -> Reply | None:
        nonlocal calls
        calls += 1
        return None if calls == 1 else (200, [], b"second")

    app = await App(handler=first_drops).start()
    config = bootstrap([retry_route({"retry_on": "reset", "num_retries": 1})], [cluster("app", [app.port])])
    try:
        async with (
            running_proxy(config) as (_proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            r = await client.get("/")
            assert (r.status_code, r.text) == (200, "second")
    finally:
        app.close()


async def test_retriable_status_codes_and_4xx() -> None:
    statuses = iter([409, 418, 200])

    async def handler(app: App, seen: Seen) -> Reply:
        return next(statuses), [], b"x"

    app = await App(handler=handler).start()
    policy = {
        "retry_on": "retriable-4xx,retriable-status-codes",
        "retriable_status_codes": [418],
        "num_retries": 3,
    }
    config = bootstrap([retry_route(policy)], [cluster("app", [app.port])])
    try:
        async with (
            running_proxy(config) as (_proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            assert (await client.get("/")).status_code == 200
            assert len(app.seen) == 3
    finally:
        app.close()


async def test_back_off_spaces_attempts_within_the_bounds() -> None:
    async def always_503(app: App, seen: Seen) -> Reply:
        return 503, [], b"no"

    app = await App(handler=always_503).start()
    policy = {
        "retry_on": "5xx",
        "num_retries": 3,
        "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"},
    }
    config = bootstrap([retry_route(policy)], [cluster("app", [app.port])])
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            total_gap = 0.0
            for _ in range(4):
                app.seen.clear()
                r = await client.get("/")
                assert r.status_code == 503
                assert r.text == "no"  # the last upstream response, not a local reply
                times = [s.at for s in app.seen]
                assert len(times) == 4
                gaps = [b - a for a, b in itertools.pairwise(times)]
                # n-th retry waits uniformly in [0, base * (2^n - 1)).
                for n, gap in enumerate(gaps, start=1):
                    assert gap <= 0.05 * (2**n - 1) + 0.2
                total_gap += sum(gaps)
            # 12 retries with mean waits of 25/75/175 ms: far above zero.
            assert total_gap > 0.3
            assert stat(proxy, "cluster.app.upstream_rq_retry_limit_exceeded") == 4
    finally:
        app.close()


async def test_bodies_are_replayed_up_to_the_buffer_limit_only() -> None:
    app = await App(handler=every_other_fails()).start()  # type: ignore[arg-type]
    route = retry_route({"retry_on": "5xx", "num_retries": 1})
    route["per_request_buffer_limit_bytes"] = 1024
    config = bootstrap([route], [cluster("app", [app.port])])
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            small = b"s" * 500
            r = await client.post("/small", content=small)
            assert r.status_code == 200
            assert [s.body for s in app.seen] == [small, small]
            app.seen.clear()
            large = b"L" * 4096
            r = await client.post("/large", content=large)
            # Too large to keep: streamed once, not retried; the 503 reaches the client.
            assert r.status_code == 503
            assert [s.body for s in app.seen] == [large]
            assert stat(proxy, "cluster.app.upstream_rq_retry") == 1
    finally:
        app.close()


async def test_streamed_body_is_replayed() -> None:
    app = await App(handler=every_other_fails()).start()  # type: ignore[arg-type]
    config = bootstrap([retry_route({"retry_on": "5xx", "num_retries": 1})], [cluster("app", [app.port])])

    async def chunks() -> object:
        for i in range(5):
            await asyncio.sleep(0.02)
            yield f"part{i};".encode()

    try:
        async with (
            running_proxy(config) as (_proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            r = await client.post("/stream", content=chunks())  # type: ignore[arg-type]
            assert r.status_code == 200
            expected = b"".join(f"part{i};".encode() for i in range(5))
            assert [s.body for s in app.seen] == [expected, expected]
    finally:
        app.close()


async def test_retry_headers_are_honoured_from_internal_callers_only() -> None:
    app = await App(handler=every_other_fails()).start()  # type: ignore[arg-type]
    route = {"match": {"prefix": "/"}, "route": {"cluster": "app"}}
    try:
        config = bootstrap([route], [cluster("app", [app.port])])
        async with (
            running_proxy(config) as (_proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            internal = {
                "x-forwarded-for": "10.1.2.3",
                "x-envoy-retry-on": "5xx",
                "x-envoy-max-retries": "1",
            }
            assert (await client.get("/", headers=internal)).status_code == 200
            assert len(app.seen) == 2
            external = {**internal, "x-forwarded-for": "203.0.113.7"}
            assert (await client.get("/", headers=external)).status_code == 503
            assert len(app.seen) == 3
    finally:
        app.close()


async def test_no_host_at_all_is_503() -> None:
    config = bootstrap(
        [retry_route({"retry_on": "5xx"})],
        [{**cluster("app", []), "load_assignment": {"cluster_name": "app"}}],
    )
    async with running_proxy(config) as (_proxy, url), httpx.AsyncClient(base_url=url, timeout=5) as client:
        r = await client.get("/")
        assert (r.status_code, r.content) == (503, NO_HEALTHY_UPSTREAM.body)


async def test_the_circuit_breaker_bounds_retries() -> None:
    app = await App(handler=every_other_fails()).start()  # type: ignore[arg-type]
    breakers = {"thresholds": [{"priority": "DEFAULT", "max_retries": 0}]}
    config = bootstrap(
        [retry_route({"retry_on": "5xx", "num_retries": 3})],
        [cluster("app", [app.port], circuit_breakers=breakers)],
    )
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            assert (await client.get("/")).status_code == 503
            assert len(app.seen) == 1
            assert stat(proxy, "cluster.app.upstream_rq_retry_overflow") == 1
            assert stat(proxy, "cluster.app.upstream_rq_retry") == 0
    finally:
        app.close()


async def test_http2_request_bodies_are_replayed() -> None:
    app = await App(handler=every_other_fails()).start()  # type: ignore[arg-type]
    config = bootstrap([retry_route({"retry_on": "5xx", "num_retries": 1})], [cluster("app", [app.port])])
    body = bytes(range(256)) * 200  # 51 KiB: several DATA frames and window updates
    try:
        async with (
            running_proxy(config) as (_proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5, http1=False, http2=True) as client,
        ):
            for _ in range(3):
                r = await client.post("/h2", content=body)
                assert (r.status_code, r.http_version) == (200, "HTTP/2")
            assert len(app.seen) == 6
            assert all(s.body == body for s in app.seen)
    finally:
        app.close()
