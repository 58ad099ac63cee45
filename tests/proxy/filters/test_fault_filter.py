"""envoy.filters.http.fault through a real proxy: delays, aborts by
percentage, gRPC aborts seen by grpcio, header-controlled faults,
max_active_faults, header matchers and per-route overrides."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import httpx
import pytest
from request_traffic_harness import App, bootstrap, cluster, get_many, port_of, running_proxy, stat

FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


def fault_filter(**config: object) -> dict[str, object]:
    return {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT_TYPE, **config}}


def percent(n: int) -> dict[str, object]:
    return {"numerator": n, "denominator": "HUNDRED"}


ROUTE = {"match": {"prefix": "/"}, "route": {"cluster": "app"}}


@asynccontextmanager
async def proxied(
    config: dict[str, object] | None = None, routes: list[dict[str, object]] | None = None
) -> AsyncIterator[tuple[object, str, App]]:
    app = await App().start()
    filters = [fault_filter(**config)] if config is not None else []
    text = bootstrap(routes or [ROUTE], [cluster("app", [app.port])], http_filters=filters)
    try:
        async with running_proxy(text) as (proxy, url):
            yield proxy, url, app
    finally:
        app.close()


async def test_fixed_delay_holds_the_request() -> None:
    config = {"delay": {"fixed_delay": "0.3s", "percentage": percent(100)}}
    async with proxied(config) as (proxy, url, _app), httpx.AsyncClient(base_url=url, timeout=5) as client:
        started = time.monotonic()
        r = await client.get("/d")
        elapsed = time.monotonic() - started
        assert r.status_code == 200
        assert 0.3 <= elapsed < 2.0
        assert stat(proxy, "http.web.fault.delays_injected") == 1  # type: ignore[arg-type]
        assert stat(proxy, "http.web.fault.active_faults") == 0  # type: ignore[arg-type]


async def test_abort_percentage_within_tolerance() -> None:
    config = {"abort": {"http_status": 503, "percentage": percent(30)}}
    async with proxied(config) as (proxy, url, app):
        results = await get_many(port_of(url), "/a", 2000)
        aborted = [body for status, body in results if status == 503]
        assert {status for status, _ in results} == {200, 503}
        assert abs(len(aborted) / 2000 - 0.30) <= 0.03
        assert set(aborted) == {b"fault filter abort"}
        assert stat(proxy, "http.web.fault.aborts_injected") == len(aborted)  # type: ignore[arg-type]
        assert len(app.seen) == 2000 - len(aborted)


def _grpc_call(port: int, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.unary_unary("/test.Echo/Say")
        try:
            method(b"hello", timeout=5, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


async def test_grpc_abort_reaches_grpcio_as_a_status() -> None:
    config = {"abort": {"grpc_status": 14, "percentage": percent(100)}}
    async with proxied(config) as (proxy, url, _app):
        code = await asyncio.to_thread(_grpc_call, port_of(url))
        assert code is grpc.StatusCode.UNAVAILABLE
        assert stat(proxy, "http.web.fault.aborts_injected") == 1  # type: ignore[arg-type]


async def test_header_controlled_grpc_abort() -> None:
    config = {"abort": {"header_abort": {}, "percentage": percent(100)}}
    async with proxied(config) as (_proxy, url, _app):
        metadata = (("x-envoy-fault-abort-grpc-request", "8"),)
        code = await asyncio.to_thread(_grpc_call, port_of(url), metadata)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_header_controlled_abort_and_delay() -> None:
    config = {
        "abort": {"header_abort": {}, "percentage": percent(100)},
        "delay": {"header_delay": {}, "percentage": percent(100)},
    }
    async with proxied(config) as (_proxy, url, _app), httpx.AsyncClient(base_url=url, timeout=5) as client:
        assert (await client.get("/")).status_code == 200
        r = await client.get("/", headers={"x-envoy-fault-abort-request": "418"})
        assert (r.status_code, r.text) == (418, "fault filter abort")
        # A percentage header can only lower the configured share: 0 % means no fault.
        headers = {"x-envoy-fault-abort-request": "418", "x-envoy-fault-abort-request-percentage": "0"}
        assert (await client.get("/", headers=headers)).status_code == 200
        started = time.monotonic()
        r = await client.get("/", headers={"x-envoy-fault-delay-request": "250"})
        assert r.status_code == 200
        assert time.monotonic() - started >= 0.25


async def test_max_active_faults_lets_the_rest_through() -> None:
    config = {"delay": {"fixed_delay": "0.5s", "percentage": percent(100)}, "max_active_faults": 1}
    async with proxied(config) as (proxy, url, _app), httpx.AsyncClient(base_url=url, timeout=5) as client:

        async def timed() -> float:
            started = time.monotonic()
            assert (await client.get("/")).status_code == 200
            return time.monotonic() - started

        first = asyncio.create_task(timed())
        async with asyncio.timeout(3):
            while stat(proxy, "http.web.fault.active_faults") == 0:  # type: ignore[arg-type]
                await asyncio.sleep(0.01)
        others = await asyncio.gather(*(timed() for _ in range(4)))
        assert await first >= 0.5
        assert all(t < 0.45 for t in others)
        assert stat(proxy, "http.web.fault.faults_overflow") == 4  # type: ignore[arg-type]
        assert stat(proxy, "http.web.fault.delays_injected") == 1  # type: ignore[arg-type]


async def test_header_matchers_and_downstream_nodes_select_requests() -> None:
    config = {
        "abort": {"http_status": 500, "percentage": percent(100)},
        "headers": [{"name": "x-fault", "string_match": {"exact": "on"}}],
        "downstream_nodes": ["canary-node"],
    }
    async with proxied(config) as (_proxy, url, _app), httpx.AsyncClient(base_url=url, timeout=5) as client:
        # The node header counts from internal callers only (x-envoy-* is stripped otherwise).
        node = {"x-envoy-downstream-service-node": "canary-node", "x-forwarded-for": "10.0.0.9"}
        assert (await client.get("/", headers={"x-fault": "on", **node})).status_code == 500
        assert (await client.get("/", headers={"x-fault": "off", **node})).status_code == 200
        assert (await client.get("/", headers={"x-fault": "on"})).status_code == 200


async def test_per_route_override() -> None:
    override = {"@type": FAULT_TYPE, "abort": {"http_status": 429, "percentage": percent(100)}}
    routes = [
        {
            "match": {"prefix": "/faulty"},
            "route": {"cluster": "app"},
            "typed_per_filter_config": {"envoy.filters.http.fault": override},
        },
        ROUTE,
    ]
    async with (
        proxied({}, routes) as (_proxy, url, _app),
        httpx.AsyncClient(base_url=url, timeout=5) as client,
    ):
        assert (await client.get("/faulty/x")).status_code == 429
        assert (await client.get("/fine")).status_code == 200


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"abort": {"http_status": 700, "percentage": percent(1)}}, "700 is not in [200, 600)"),
        ({"delay": {"percentage": percent(1)}}, "one of fixed_delay, header_delay is required"),
        ({"response_rate_limit": {"fixed_limit": {"limit_kbps": 1}}}, "response_rate_limit is not supported"),
    ],
)
async def test_bad_fault_configs_are_refused(config: dict[str, object], message: str) -> None:
    from meshlet.config.compiler import compile_bootstrap
    from meshlet.config.loader import parse_bootstrap_text
    from meshlet.errors import ConfigError

    text = bootstrap([ROUTE], [cluster("app", [1])], http_filters=[fault_filter(**config)])
    with pytest.raises(ConfigError, match=re.escape(message)):
        compile_bootstrap(parse_bootstrap_text(text))
