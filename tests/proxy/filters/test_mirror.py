"""request_mirror_policies through a real proxy: copies with a -shadow host,
responses ignored, the primary never slowed or failed by the mirror."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
from request_traffic_harness import (
    App,
    Reply,
    Seen,
    bootstrap,
    cluster,
    get_many,
    port_of,
    running_proxy,
    stat,
)

from meshlet.proxy.filters.mirror import shadow_authority


def test_shadow_authority_suffixes_the_host_part() -> None:
    assert shadow_authority("reviews:9080") == "reviews-shadow:9080"
    assert shadow_authority("reviews") == "reviews-shadow"
    assert shadow_authority("[::1]:80") == "[::1]-shadow:80"


def mirrored_route(*, timeout: str = "2s", **mirror: object) -> dict[str, object]:
    return {
        "match": {"prefix": "/"},
        "route": {
            "cluster": "app",
            "timeout": timeout,
            "request_mirror_policies": [{"cluster": "shadow", **mirror}],
        },
    }


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(predicate: object, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_copies_reach_the_mirror_with_a_shadow_host_and_the_body() -> None:
    async def mirror_fails(app: App, seen: Seen) -> Reply:
        return 500, [], b"mirror says no"

    app, shadow = await App("app").start(), await App("shadow", mirror_fails).start()
    config = bootstrap([mirrored_route()], [cluster("app", [app.port]), cluster("shadow", [shadow.port])])
    try:
        async with (
            running_proxy(config) as (_proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            r = await client.post("/reviews/1", content=b"payload", headers={"host": "reviews:9080"})
            assert (r.status_code, r.text) == (200, "app saw /reviews/1")
            await wait_for(lambda: len(shadow.seen) == 1)
            copy = shadow.seen[0]
            assert (copy.method, copy.path, copy.host, copy.body) == (
                "POST",
                "/reviews/1",
                "reviews-shadow:9080",
                b"payload",
            )
            assert app.seen[0].host == "reviews:9080"
    finally:
        app.close()
        shadow.close()


async def test_a_slow_mirror_does_not_slow_the_primary() -> None:
    async def slow(app: App, seen: Seen) -> Reply:
        await asyncio.sleep(2)
        return 200, [], b"late"

    app, shadow = await App("app").start(), await App("shadow", slow).start()
    config = bootstrap(
        [mirrored_route(timeout="0.5s")], [cluster("app", [app.port]), cluster("shadow", [shadow.port])]
    )
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            for _ in range(3):
                started = time.monotonic()
                r = await client.get("/p")
                assert r.status_code == 200
                assert time.monotonic() - started < 0.3
            # The copies give up at the route timeout and are counted as failed.
            await wait_for(lambda: stat(proxy, "http.mirror.requests_failed") == 3)
    finally:
        app.close()
        shadow.close()


async def test_a_dead_mirror_does_not_fail_the_primary() -> None:
    app = await App("app").start()
    config = bootstrap([mirrored_route()], [cluster("app", [app.port]), cluster("shadow", [closed_port()])])
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            for _ in range(5):
                assert (await client.get("/")).status_code == 200
            await wait_for(lambda: stat(proxy, "http.mirror.requests_failed") == 5)
    finally:
        app.close()


async def test_runtime_fraction_samples_the_copies() -> None:
    app, shadow = await App("app").start(), await App("shadow").start()
    fraction = {"default_value": {"numerator": 50, "denominator": "HUNDRED"}}
    config = bootstrap(
        [mirrored_route(runtime_fraction=fraction)],
        [cluster("app", [app.port]), cluster("shadow", [shadow.port])],
    )
    try:
        async with running_proxy(config) as (proxy, url):
            results = await get_many(port_of(url), "/s", 1000)
            assert all(status == 200 for status, _ in results)
            await wait_for(lambda: stat(proxy, "http.mirror.requests_sent") == len(shadow.seen))
            assert 400 <= len(shadow.seen) <= 600
    finally:
        app.close()
        shadow.close()


async def test_bodies_beyond_the_buffer_limit_are_not_mirrored() -> None:
    app, shadow = await App("app").start(), await App("shadow").start()
    route = mirrored_route()
    route["per_request_buffer_limit_bytes"] = 1024
    config = bootstrap([route], [cluster("app", [app.port]), cluster("shadow", [shadow.port])])
    try:
        async with (
            running_proxy(config) as (proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            large = b"x" * 5000
            assert (await client.post("/big", content=large)).status_code == 200
            assert app.seen[0].body == large
            await wait_for(lambda: stat(proxy, "http.mirror.requests_dropped") == 1)
            assert (await client.post("/small", content=b"tiny")).status_code == 200
            await wait_for(lambda: len(shadow.seen) == 1)
            assert shadow.seen[0].body == b"tiny"
    finally:
        app.close()
        shadow.close()


async def test_copies_in_flight_are_bounded() -> None:
    from meshlet.config.model import (
        Cluster,
        ClusterLoadAssignment,
        DiscoveryType,
        Endpoint,
        LocalityEndpoints,
        MirrorPolicy,
        SocketAddress,
    )
    from meshlet.proxy.filters.mirror import Mirror
    from meshlet.proxy.http.stream import RequestHead
    from meshlet.proxy.runtime import ProxyRuntime
    from meshlet.proxy.upstream.manager import ClusterManager

    release = asyncio.Event()

    async def held(app: App, seen: Seen) -> Reply:
        await release.wait()
        return 200, [], b""

    shadow = await App("shadow", held).start()
    runtime = ProxyRuntime()
    runtime.clusters = ClusterManager(runtime)
    endpoint = Endpoint(SocketAddress("127.0.0.1", shadow.port))
    runtime.clusters.update(
        {
            "shadow": Cluster(
                "shadow",
                DiscoveryType.STATIC,
                load_assignment=ClusterLoadAssignment("shadow", (LocalityEndpoints((endpoint,)),)),
            )
        }
    )
    mirror = Mirror(runtime, max_in_flight=2)
    try:
        for _ in range(5):
            mirror.shadow(
                (MirrorPolicy("shadow"),), RequestHead("GET", "http", "a:1", "/"), None, 5.0, lambda n: 0
            )
        assert mirror.in_flight == 2
        assert mirror.dropped.value == 3
        await wait_for(lambda: len(shadow.seen) == 2)
        release.set()
        await wait_for(lambda: mirror.in_flight == 0)
        assert mirror.sent.value == 2
    finally:
        await mirror.close()
        runtime.clusters.close()
        shadow.close()
