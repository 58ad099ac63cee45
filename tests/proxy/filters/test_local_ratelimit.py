"""envoy.filters.http.local_ratelimit: the token bucket alone, then through a real proxy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from request_traffic_harness import App, bootstrap, cluster, running_proxy, stat

from meshlet.config.ratelimit import TokenBucketConfig
from meshlet.proxy.filters.local_ratelimit import TokenBucket

RL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
ROUTE = {"match": {"prefix": "/"}, "route": {"cluster": "app"}}
ALL = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "rl_enabled"}
NONE = {"default_value": {"numerator": 0, "denominator": "HUNDRED"}, "runtime_key": "rl_enforced"}


def test_token_bucket_fills_in_whole_intervals_up_to_the_maximum() -> None:
    bucket = TokenBucket(TokenBucketConfig(max_tokens=3, tokens_per_fill=2, fill_interval=1.0), now=100.0)
    assert [bucket.try_take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.try_take(100.9)
    assert bucket.seconds_to_fill(100.9) == 1
    assert [bucket.try_take(101.0) for _ in range(3)] == [True, True, False]
    # Ten intervals later the bucket is full again, not over-full.
    assert [bucket.try_take(111.0) for _ in range(4)] == [True, True, True, False]


def limiter(bucket: dict[str, object], **extra: object) -> dict[str, object]:
    return {
        "@type": RL_TYPE,
        "stat_prefix": "http_local_rate_limiter",
        "token_bucket": bucket,
        "filter_enabled": ALL,
        "filter_enforced": ALL,
        **extra,
    }


@asynccontextmanager
async def proxied(
    config: dict[str, object], routes: list[dict[str, object]] | None = None
) -> AsyncIterator[tuple[object, httpx.AsyncClient]]:
    app = await App().start()
    flt = {"name": "envoy.filters.http.local_ratelimit", "typed_config": config}
    text = bootstrap(routes or [ROUTE], [cluster("app", [app.port])], http_filters=[flt])
    try:
        async with running_proxy(text) as (proxy, url), httpx.AsyncClient(base_url=url, timeout=5) as client:
            yield proxy, client
    finally:
        app.close()


async def test_requests_beyond_the_bucket_get_429_with_headers() -> None:
    config = limiter(
        {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "60s"},
        response_headers_to_add=[{"header": {"key": "x-local-rate-limit", "value": "true"}}],
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
    )
    async with proxied(config) as (proxy, client):
        responses = [await client.get("/") for _ in range(8)]
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 3
    limited = responses[-1]
    assert limited.text == "local_rate_limited"
    assert limited.headers["x-local-rate-limit"] == "true"
    assert "x-local-rate-limit" not in responses[0].headers
    assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["4", "3", "2", "1", "0", "0", "0", "0"]
    assert {r.headers["x-ratelimit-limit"] for r in responses} == {"5"}
    assert 0 < int(limited.headers["x-ratelimit-reset"]) <= 60
    prefix = "http_local_rate_limiter.http_local_rate_limit."
    assert stat(proxy, prefix + "enabled") == 8  # type: ignore[arg-type]
    assert stat(proxy, prefix + "ok") == 5  # type: ignore[arg-type]
    assert stat(proxy, prefix + "rate_limited") == 3  # type: ignore[arg-type]
    assert stat(proxy, prefix + "enforced") == 3  # type: ignore[arg-type]


async def test_the_bucket_refills() -> None:
    config = limiter({"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "0.2s"}, status={"code": 503})
    async with proxied(config) as (_proxy, client):
        assert [(await client.get("/")).status_code for _ in range(3)] == [200, 200, 503]
        await asyncio.sleep(0.25)
        assert (await client.get("/")).status_code == 200


async def test_not_enforced_only_counts() -> None:
    config = limiter({"max_tokens": 1, "fill_interval": "60s"}, filter_enforced=NONE)
    async with proxied(config) as (proxy, client):
        assert [(await client.get("/")).status_code for _ in range(3)] == [200] * 3
    assert stat(proxy, "http_local_rate_limiter.http_local_rate_limit.rate_limited") == 2  # type: ignore[arg-type]
    assert stat(proxy, "http_local_rate_limiter.http_local_rate_limit.enforced") == 0  # type: ignore[arg-type]


async def test_without_filter_enabled_nothing_is_limited() -> None:
    config = limiter({"max_tokens": 1, "fill_interval": "60s"})
    del config["filter_enabled"]
    async with proxied(config) as (_proxy, client):
        assert [(await client.get("/")).status_code for _ in range(3)] == [200] * 3


async def test_a_route_override_has_its_own_bucket() -> None:
    route_limit = limiter({"max_tokens": 1, "fill_interval": "60s"}, stat_prefix="strict")
    routes = [
        {
            "match": {"prefix": "/strict"},
            "route": {"cluster": "app"},
            "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": route_limit},
        },
        ROUTE,
    ]
    config = limiter({"max_tokens": 100, "fill_interval": "60s"})
    async with proxied(config, routes) as (proxy, client):
        assert [(await client.get("/strict")).status_code for _ in range(2)] == [200, 429]
        assert [(await client.get("/other")).status_code for _ in range(3)] == [200] * 3
    assert stat(proxy, "strict.http_local_rate_limit.rate_limited") == 1  # type: ignore[arg-type]


async def test_curl_sees_the_429_and_its_headers() -> None:
    config = limiter(
        {"max_tokens": 1, "fill_interval": "60s"},
        response_headers_to_add=[{"header": {"key": "x-local-rate-limit", "value": "true"}}],
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
    )
    async with proxied(config) as (_proxy, client):
        url = str(client.base_url).rstrip("/") + "/c"
        outputs = []
        for _ in range(2):
            proc = await asyncio.create_subprocess_exec(
                "curl", "-s", "-i", "--max-time", "5", url, stdout=asyncio.subprocess.PIPE
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 10)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            outputs.append(out.decode("latin-1").lower())
    assert outputs[0].startswith("http/1.1 200")
    assert outputs[1].startswith("http/1.1 429")
    assert "x-local-rate-limit: true" in outputs[1]
    assert "x-ratelimit-limit: 1" in outputs[1]
    assert "x-ratelimit-remaining: 0" in outputs[1]
    assert outputs[1].endswith("local_rate_limited")
