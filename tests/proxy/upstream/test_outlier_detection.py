"""Outlier detection under real traffic: consecutive 5xx and gateway
failures eject a host, ejection time grows with repeated ejections, hosts
come back after it, max_ejection_percent holds, success-rate outliers go."""

from __future__ import annotations

import asyncio
import random
import socket
import time

from upstream_traffic import (
    Backend,
    backends,
    bootstrap,
    clusters_page,
    endpoints_yaml,
    running_proxy,
    spread,
    stat,
    wait_for,
)

from meshlet.config.model import OutlierDetectionConfig
from meshlet.proxy.observe.stats import StatsStore
from meshlet.proxy.server import Proxy
from meshlet.proxy.upstream.cluster import ClusterRuntime, Host
from meshlet.proxy.upstream.outlier import OutlierDetector, OutlierState


def detected_cluster(bs: list[Backend], outlier: str) -> str:
    return f"""    type: STATIC
    outlier_detection: {outlier}
    load_assignment:
      cluster_name: svc
      endpoints:
      - lb_endpoints: {endpoints_yaml(bs)}
"""


def svc(proxy: Proxy) -> ClusterRuntime:
    cluster = proxy.runtime.cluster_manager().get("svc")
    assert cluster is not None
    return cluster


def host_of(proxy: Proxy, b: Backend) -> Host:
    return next(h for h in svc(proxy).hosts if h.address.port == b.port)


async def test_consecutive_5xx_ejects_and_readmits_with_growing_time() -> None:
    outlier = (
        "{ consecutive_5xx: 3, interval: 0.05s, base_ejection_time: 1s, max_ejection_time: 5s,"
        " max_ejection_percent: 100 }"
    )
    async with backends(3) as bs, running_proxy(bootstrap(detected_cluster(bs, outlier))) as proxy:
        bs[0].status = 500
        counts = await spread(proxy, 30, concurrency=1)
        host = host_of(proxy, bs[0])
        assert host.outlier.ejected and bs[0].hits == 3  # three 5xx in a row, then out
        assert counts["b0"] == 3 and counts["b1"] + counts["b2"] == 27
        assert stat(proxy, "cluster.svc.outlier_detection.ejections_enforced_consecutive_5xx") == 1
        assert stat(proxy, "cluster.svc.outlier_detection.ejections_active") == 1
        page = await clusters_page(proxy)
        assert f"svc::127.0.0.1:{bs[0].port}::health_flags::/failed_outlier_check" in page
        # Back after base_ejection_time x 1, still failing: out again at once,
        # now for base_ejection_time x 2.
        await wait_for(lambda: not host.outlier.ejected, timeout=3)
        await spread(proxy, 30, concurrency=1)
        assert host.outlier.ejected and host.outlier.ejections == 2
        # Half-way through the second ejection a first one would be over.
        await asyncio.sleep(host.outlier.ejected_at + 1.5 - time.monotonic())
        assert host.outlier.ejected
        bs[0].status = 200
        await wait_for(lambda: not host.outlier.ejected, timeout=3)
        assert stat(proxy, "cluster.svc.outlier_detection.ejections_active") == 0
        assert set(await spread(proxy, 30)) == {"b0", "b1", "b2"}


async def test_gateway_failures_and_connect_errors_eject() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = Backend("dead")
        dead.port = s.getsockname()[1]
    outlier = (
        "{ consecutive_5xx: 100, consecutive_gateway_failure: 2, enforcing_consecutive_gateway_failure: 100,"
        " interval: 10s, base_ejection_time: 10s, max_ejection_percent: 100 }"
    )
    async with backends(3) as bs:
        bs[0].status = 502
        config = detected_cluster([bs[0], bs[1], bs[2], dead], outlier)
        async with running_proxy(bootstrap(config)) as proxy:
            await spread(proxy, 30, concurrency=1)
            assert host_of(proxy, bs[0]).outlier.ejected
            assert host_of(proxy, dead).outlier.ejected
            assert not host_of(proxy, bs[1]).outlier.ejected
            enforced = "cluster.svc.outlier_detection.ejections_enforced_consecutive_gateway_failure"
            assert stat(proxy, enforced) == 2
            # Two of four hosts left (50 %, not below the panic threshold).
            assert await spread(proxy, 20) == {"b1": 10, "b2": 10}


async def test_max_ejection_percent_caps_ejections() -> None:
    outlier = "{ consecutive_5xx: 2, interval: 10s, base_ejection_time: 10s, max_ejection_percent: 50 }"
    async with backends(4) as bs, running_proxy(bootstrap(detected_cluster(bs, outlier))) as proxy:
        for b in bs:
            b.status = 500
        await spread(proxy, 80, concurrency=1)
        ejected = [h for h in svc(proxy).hosts if h.outlier.ejected]
        assert len(ejected) == 2  # half of four, however many fail
        assert (stat(proxy, "cluster.svc.outlier_detection.ejections_overflow") or 0) >= 1
        assert stat(proxy, "cluster.svc.outlier_detection.ejections_active") == 2


async def test_success_rate_outlier_is_ejected() -> None:
    outlier = (
        "{ consecutive_5xx: 1000, interval: 0.3s, base_ejection_time: 10s, max_ejection_percent: 100,"
        " success_rate_minimum_hosts: 5, success_rate_request_volume: 10, success_rate_stdev_factor: 1000 }"
    )
    async with backends(5) as bs, running_proxy(bootstrap(detected_cluster(bs, outlier))) as proxy:
        bs[0].status = 500
        host = host_of(proxy, bs[0])
        async with asyncio.timeout(15):
            while not host.outlier.ejected:
                await spread(proxy, 100)
        assert stat(proxy, "cluster.svc.outlier_detection.ejections_enforced_success_rate") == 1
        assert not any(h.outlier.ejected for h in svc(proxy).hosts if h is not host)


class _FakeHost:
    def __init__(self) -> None:
        self.outlier = OutlierState()


def test_enforcing_percentage_and_success_rate_need_enough_hosts() -> None:
    now = [0.0]
    changed: list[object] = []
    scope = StatsStore().scope("cluster.", "envoy_cluster_name", "x")
    cfg = OutlierDetectionConfig(consecutive_5xx=1, enforcing_consecutive_5xx=0, max_ejection_percent=100)
    detector = OutlierDetector(cfg, scope, changed.append, clock=lambda: now[0], rng=random.Random(1))
    hosts = [_FakeHost() for _ in range(4)]
    detector.set_hosts(hosts)
    detector.record(hosts[0], 500)
    assert not hosts[0].outlier.ejected and not changed  # detected, never enforced
    # Success rate with only 4 hosts (minimum 5): nobody is judged.
    rate = OutlierDetectionConfig(
        consecutive_5xx=1000, success_rate_request_volume=1, max_ejection_percent=100
    )
    detector = OutlierDetector(rate, scope, changed.append, clock=lambda: now[0])
    detector.set_hosts(hosts)
    for h in hosts:
        detector.record(h, 500 if h is hosts[0] else 200)
    detector.sweep()
    assert not hosts[0].outlier.ejected


def test_ejection_time_is_capped_and_decays_in_service() -> None:
    now = [0.0]
    scope = StatsStore().scope("cluster.", "envoy_cluster_name", "y")
    cfg = OutlierDetectionConfig(
        consecutive_5xx=1, base_ejection_time=10.0, max_ejection_time=25.0, max_ejection_percent=100
    )
    detector = OutlierDetector(cfg, scope, lambda _h: None, clock=lambda: now[0])
    host = _FakeHost()
    detector.set_hosts([host, _FakeHost()])
    times = []
    for _ in range(4):
        detector.record(host, 503)
        assert host.outlier.ejected
        times.append(detector.ejection_time(host.outlier))
        now[0] += times[-1]
        detector.sweep()
        assert not host.outlier.ejected
    assert times == [10.0, 20.0, 25.0, 25.0]  # base x n, capped at max_ejection_time
    # In service for a base ejection time, each sweep lowers the multiplier.
    multiplier = host.outlier.ejections
    now[0] += 10.0
    detector.sweep()
    assert host.outlier.ejections == multiplier - 1


TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


async def test_tcp_proxy_connect_failures_eject() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = Backend("dead")
        dead.port = s.getsockname()[1]
    async with backends(1) as bs:
        outlier = "{ consecutive_5xx: 2, interval: 10s, base_ejection_time: 10s, max_ejection_percent: 100 }"
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
{detected_cluster([dead, bs[0]], outlier)}
"""
        async with running_proxy(config) as proxy:
            address = proxy.listeners.address("tcp")
            assert address is not None
            for _ in range(8):
                reader, writer = await asyncio.open_connection("127.0.0.1", address[1])
                writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                await asyncio.wait_for(reader.read(200), 5)  # served, or closed on a failure
                writer.close()
            assert host_of(proxy, dead).outlier.ejected
            assert not host_of(proxy, bs[0]).outlier.ejected
            assert bs[0].hits == 6  # 8 connections, 2 failed before the ejection
