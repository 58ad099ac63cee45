"""Circuit breakers under real traffic: overflow is answered 503 with
``x-envoy-overloaded: true`` and counted; the open gauges show it."""

from __future__ import annotations

import asyncio

import httpx
from upstream_traffic import Backend, backends, bootstrap, endpoints_yaml, running_proxy, stat, url, wait_for

from meshlet.proxy.server import Proxy


def limited_cluster(bs: list[Backend], thresholds: str) -> str:
    return f"""    type: STATIC
    circuit_breakers:
      thresholds: {thresholds}
    load_assignment:
      cluster_name: svc
      endpoints:
      - lb_endpoints: {endpoints_yaml(bs)}
"""


async def burst(proxy: Proxy, n: int, path: str = "/") -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n + 1)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        return list(await asyncio.gather(*(client.get(url(proxy, path)) for _ in range(n))))


def overloaded(r: httpx.Response) -> bool:
    return r.status_code == 503 and r.headers.get("x-envoy-overloaded") == "true"


async def test_max_requests_overflow() -> None:
    async with backends(1) as bs:
        config = limited_cluster(bs, "[{ max_requests: 2, track_remaining: true }]")
        async with running_proxy(bootstrap(config)) as proxy:
            bs[0].release.clear()  # the backend holds every request
            held = asyncio.create_task(burst(proxy, 2))
            await wait_for(lambda: bs[0].active == 2)
            assert stat(proxy, "cluster.svc.circuit_breakers.default.rq_open") == 1
            assert stat(proxy, "cluster.svc.circuit_breakers.default.remaining_rq") == 0
            refused = await burst(proxy, 3)
            assert all(overloaded(r) for r in refused), [(r.status_code, r.headers) for r in refused]
            assert b"overflow" in refused[0].content
            assert stat(proxy, "cluster.svc.upstream_rq_pending_overflow") == 3
            bs[0].release.set()
            assert [r.status_code for r in await asyncio.wait_for(held, 5)] == [200, 200]
            assert stat(proxy, "cluster.svc.circuit_breakers.default.rq_open") == 0
            assert stat(proxy, "cluster.svc.circuit_breakers.default.remaining_rq") == 2
            assert bs[0].hits == 2


async def test_max_connections_and_pending_overflow() -> None:
    async with backends(1) as bs:
        config = limited_cluster(bs, "[{ max_connections: 1, max_pending_requests: 1 }]")
        async with running_proxy(bootstrap(config)) as proxy:
            bs[0].release.clear()
            first = asyncio.create_task(burst(proxy, 1))
            await wait_for(lambda: bs[0].active == 1)
            queued = asyncio.create_task(burst(proxy, 1))
            await wait_for(lambda: stat(proxy, "cluster.svc.upstream_rq_pending_active") == 1)
            assert stat(proxy, "cluster.svc.circuit_breakers.default.cx_open") == 1
            assert stat(proxy, "cluster.svc.circuit_breakers.default.rq_pending_open") == 1
            refused = await burst(proxy, 2)
            assert all(overloaded(r) for r in refused)
            assert stat(proxy, "cluster.svc.upstream_rq_pending_overflow") == 2
            assert (stat(proxy, "cluster.svc.upstream_cx_overflow") or 0) >= 1
            bs[0].release.set()
            done = await asyncio.wait_for(asyncio.gather(first, queued), 5)
            assert [r.status_code for rs in done for r in rs] == [200, 200]
            # Both went over the one connection the breaker allows.
            assert bs[0].connections == 1


async def test_high_priority_routes_have_their_own_limits() -> None:
    async with backends(1) as bs:
        cluster = limited_cluster(bs, "[{ max_requests: 1 }, { priority: HIGH, max_requests: 5 }]")
        async with running_proxy(bootstrap(cluster, route="priority: HIGH")) as proxy:
            bs[0].release.clear()
            held = asyncio.create_task(burst(proxy, 4))
            await wait_for(lambda: bs[0].active == 4)
            assert stat(proxy, "cluster.svc.circuit_breakers.high.rq_open") == 0
            bs[0].release.set()
            assert [r.status_code for r in await asyncio.wait_for(held, 5)] == [200] * 4
            assert not stat(proxy, "cluster.svc.upstream_rq_pending_overflow")


async def test_max_retries_overflow() -> None:
    async with backends(2) as bs:
        for b in bs:
            b.status = 503
        cluster = limited_cluster(bs, "[{ max_retries: 1 }]")
        route = "retry_policy: { retry_on: 5xx, num_retries: 3 }"
        async with running_proxy(bootstrap(cluster, route=route)) as proxy:
            for b in bs:
                b.delay = 0.05  # keep the first retry in flight while others want one
            answers = await burst(proxy, 4)
            assert all(r.status_code == 503 for r in answers)
            assert (stat(proxy, "cluster.svc.upstream_rq_retry_overflow") or 0) >= 1
            assert stat(proxy, "cluster.svc.circuit_breakers.default.rq_retry_open") == 0


async def test_every_host_gets_a_connection_past_the_limit() -> None:
    """As in Envoy, a host with no connection may always open one, so one
    host's idle connection cannot starve the others' requests."""
    async with backends(2) as bs:
        config = limited_cluster(bs, "[{ max_connections: 1 }]")
        async with running_proxy(bootstrap(config)) as proxy:
            answers = await burst(proxy, 6)
            assert [r.status_code for r in answers] == [200] * 6
            assert bs[0].hits == bs[1].hits == 3
            assert (stat(proxy, "cluster.svc.upstream_cx_overflow") or 0) >= 1


TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


async def test_tcp_proxy_max_connections() -> None:
    async with backends(1) as bs:
        config = f"""
static_resources:
  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{ "@type": {TCP_PROXY_TYPE}, stat_prefix: tcp, cluster: svc }}
  clusters:
  - name: svc
    connect_timeout: 1s
{limited_cluster(bs, "[{ max_connections: 1 }]")}
"""
        async with running_proxy(config) as proxy:
            address = proxy.listeners.address("tcp")
            assert address is not None

            async def exchange() -> bytes:
                reader, writer = await asyncio.open_connection("127.0.0.1", address[1])
                try:
                    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    return await asyncio.wait_for(reader.read(200), 5)
                except ConnectionResetError:
                    return b""  # closed by the proxy while the request was on its way
                finally:
                    writer.close()

            _, first_writer = await asyncio.open_connection("127.0.0.1", address[1])
            await wait_for(lambda: bs[0].connections == 1)
            assert await exchange() == b""  # refused: closed without a byte
            assert stat(proxy, "cluster.svc.upstream_cx_overflow") == 1
            first_writer.close()
            await wait_for(lambda: stat(proxy, "cluster.svc.circuit_breakers.default.cx_open") == 0)
            assert (await exchange()).startswith(b"HTTP/1.1 200")
