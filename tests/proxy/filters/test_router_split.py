"""Traffic splitting through a real proxy: weighted clusters, header and
cookie canaries, runtime_fraction."""

from __future__ import annotations

from collections import Counter

import httpx
from request_traffic_harness import App, bootstrap, cluster, get_many, port_of, running_proxy

REQUESTS = 2000


async def fire(url: str, path: str, count: int) -> Counter[str]:
    """``count`` GETs; the answering app's names counted."""
    seen: Counter[str] = Counter()
    for status, body in await get_many(port_of(url), path, count):
        assert status == 200
        seen[body.decode().split(" ", 1)[0]] += 1
    return seen


async def test_weighted_clusters_split_90_10_within_tolerance() -> None:
    v1, v2 = await App("v1").start(), await App("v2").start()
    route = {
        "match": {"prefix": "/"},
        "route": {
            "weighted_clusters": {
                "clusters": [
                    {
                        "name": "v1",
                        "weight": 90,
                        "response_headers_to_add": [{"header": {"key": "x-version", "value": "v1"}}],
                    },
                    {
                        "name": "v2",
                        "weight": 10,
                        "request_headers_to_add": [{"header": {"key": "x-canary", "value": "yes"}}],
                        "response_headers_to_add": [{"header": {"key": "x-version", "value": "v2"}}],
                    },
                ],
                "total_weight": 100,
            }
        },
    }
    config = bootstrap([route], [cluster("v1", [v1.port]), cluster("v2", [v2.port])])
    try:
        async with running_proxy(config) as (_proxy, url):
            seen = await fire(url, "/w", REQUESTS)
            share = seen["v2"] / REQUESTS
            assert seen["v1"] + seen["v2"] == REQUESTS
            assert abs(share - 0.10) <= 0.03, seen
            assert all(s.headers.get("x-canary") == "yes" for s in v2.seen)
            assert not any("x-canary" in s.headers for s in v1.seen)
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                for _ in range(20):
                    r = await client.get("/h")
                    assert r.headers["x-version"] == r.text.split(" ", 1)[0]
    finally:
        v1.close()
        v2.close()


def canary_routes(matcher: dict[str, object]) -> list[dict[str, object]]:
    return [
        {"match": {"prefix": "/", "headers": [matcher]}, "route": {"cluster": "v2"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "v1"}},
    ]


async def test_cookie_canary_sends_jason_to_v2() -> None:
    v1, v2 = await App("v1").start(), await App("v2").start()
    # Envoy's way to match a cookie: a regex over the cookie header.
    matcher = {"name": "cookie", "safe_regex_match": {"regex": r"^(.*?;\s*)?(user=jason)(;.*)?$"}}
    config = bootstrap(canary_routes(matcher), [cluster("v1", [v1.port]), cluster("v2", [v2.port])])
    try:
        async with (
            running_proxy(config) as (_proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            for cookie, expected in [
                ("user=jason", "v2"),
                ("theme=dark; user=jason", "v2"),
                ("user=jason; theme=dark", "v2"),
                ("user=jasonx", "v1"),
                ("user=bob", "v1"),
                ("", "v1"),
            ]:
                headers = {"cookie": cookie} if cookie else {}
                r = await client.get("/p", headers=headers)
                assert r.text.startswith(expected), (cookie, r.text)
    finally:
        v1.close()
        v2.close()


async def test_header_canary() -> None:
    v1, v2 = await App("v1").start(), await App("v2").start()
    matcher = {"name": "end-user", "string_match": {"exact": "jason"}}
    config = bootstrap(canary_routes(matcher), [cluster("v1", [v1.port]), cluster("v2", [v2.port])])
    try:
        async with (
            running_proxy(config) as (_proxy, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):
            assert (await client.get("/", headers={"end-user": "jason"})).text.startswith("v2")
            assert (await client.get("/", headers={"end-user": "json"})).text.startswith("v1")
            assert (await client.get("/")).text.startswith("v1")
    finally:
        v1.close()
        v2.close()


async def test_runtime_fraction_routes_its_share() -> None:
    v1, v2 = await App("v1").start(), await App("v2").start()
    routes = [
        {
            "match": {
                "prefix": "/",
                "runtime_fraction": {
                    "default_value": {"numerator": 25, "denominator": "HUNDRED"},
                    "runtime_key": "routing.canary",
                },
            },
            "route": {"cluster": "v2"},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "v1"}},
    ]
    config = bootstrap(routes, [cluster("v1", [v1.port]), cluster("v2", [v2.port])])
    try:
        async with running_proxy(config) as (_proxy, url):
            seen = await fire(url, "/r", REQUESTS)
            assert abs(seen["v2"] / REQUESTS - 0.25) <= 0.03, seen
    finally:
        v1.close()
        v2.close()


def test_fraction_predicate_draws_below_the_numerator() -> None:
    from meshlet.config.model import FractionalPercent
    from meshlet.proxy.http.stream import RequestHead
    from meshlet.proxy.routing.matchers import fraction_predicate

    draws = iter([0, 24, 25, 99])
    seen_denominators: list[int] = []

    def draw(n: int) -> int:
        seen_denominators.append(n)
        return next(draws)

    matches = fraction_predicate(FractionalPercent(25, 100), draw)
    head = RequestHead("GET", "http", "a", "/")
    assert [matches(head) for _ in range(4)] == [True, True, False, False]
    assert seen_denominators == [100] * 4


def test_pick_weighted_walks_the_cumulative_weights() -> None:
    from meshlet.config.model import WeightedCluster
    from meshlet.proxy.filters.router import pick_weighted

    clusters = (WeightedCluster("a", 1), WeightedCluster("b", 0), WeightedCluster("c", 3))
    assert [pick_weighted(clusters, 4, lambda n, v=v: v).name for v in range(4)] == ["a", "c", "c", "c"]
