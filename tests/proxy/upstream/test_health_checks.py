"""Active health checks under real traffic: HTTP and TCP probes take hosts
out and back, ``/clusters`` shows it, panic mode spreads over every host."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from upstream_traffic import (
    Backend,
    backends,
    bootstrap,
    clusters_json,
    clusters_page,
    endpoints_yaml,
    running_proxy,
    spread,
    stat,
    wait_for,
)

from meshlet.proxy.server import Proxy
from meshlet.proxy.upstream.cluster import ClusterRuntime

HTTP_CHECK = (
    "{ timeout: 2s, interval: 0.05s, no_traffic_interval: 0.05s, unhealthy_threshold: 2,"
    " healthy_threshold: 2, http_health_check: { path: /healthz } }"
)


def checked_cluster(bs: list[Backend], check: str = HTTP_CHECK, extra: str = "") -> str:
    return f"""    type: STATIC
{extra}    health_checks: [{check}]
    load_assignment:
      cluster_name: svc
      endpoints:
      - lb_endpoints: {endpoints_yaml(bs)}
"""


def svc(proxy: Proxy) -> ClusterRuntime:
    cluster = proxy.runtime.cluster_manager().get("svc")
    assert cluster is not None
    return cluster


async def test_http_check_takes_a_host_out_and_back() -> None:
    async with backends(2) as bs, running_proxy(bootstrap(checked_cluster(bs))) as proxy:
        cluster = svc(proxy)
        assert await spread(proxy, 100) == {"b0": 50, "b1": 50}
        bs[0].healthy = False
        await wait_for(lambda: cluster.hosts[0].failed_active_hc)
        assert await spread(proxy, 100) == {"b1": 100}
        page = await clusters_page(proxy)
        assert f"svc::127.0.0.1:{bs[0].port}::health_flags::/failed_active_hc" in page
        assert f"svc::127.0.0.1:{bs[1].port}::health_flags::healthy" in page
        statuses = (await clusters_json(proxy))["cluster_statuses"]
        assert isinstance(statuses, list)
        flags = [h["health_status"].get("failed_active_health_check") for h in statuses[0]["host_statuses"]]
        assert flags == [True, False]
        bs[0].healthy = True
        await wait_for(lambda: not cluster.hosts[0].failed_active_hc)
        assert await spread(proxy, 100) == {"b0": 50, "b1": 50}
        assert stat(proxy, "cluster.svc.health_check.failure")
        assert stat(proxy, "cluster.svc.health_check.healthy") == 2
        attempts = stat(proxy, "cluster.svc.health_check.attempt") or 0
        successes = stat(proxy, "cluster.svc.health_check.success") or 0
        failures = stat(proxy, "cluster.svc.health_check.failure") or 0
        assert attempts - (successes + failures) in (0, 1, 2)  # checks in flight


async def test_thresholds_count_consecutive_results() -> None:
    check = (
        "{ timeout: 2s, interval: 0.02s, no_traffic_interval: 0.02s, unhealthy_threshold: 3,"
        " healthy_threshold: 4, http_health_check: { path: /healthz } }"
    )
    async with backends(1) as bs, running_proxy(bootstrap(checked_cluster(bs, check))) as proxy:
        host = svc(proxy).hosts[0]
        assert await svc(proxy).wait_ready(2)
        assert not host.failed_active_hc  # the first success counts at once
        bs[0].healthy = False
        start = bs[0].health_hits
        await wait_for(lambda: host.failed_active_hc)
        assert bs[0].health_hits - start >= 3
        bs[0].healthy = True
        start = bs[0].health_hits
        await wait_for(lambda: not host.failed_active_hc)
        assert bs[0].health_hits - start >= 4


async def test_a_host_failing_its_first_check_gets_no_traffic() -> None:
    async with backends(2) as bs:
        bs[0].healthy = False
        async with running_proxy(bootstrap(checked_cluster(bs))) as proxy:
            # The cluster waits for the first round, so even the first
            # requests avoid the failing host.
            assert await spread(proxy, 40) == {"b1": 40}
            assert bs[0].hits == 0


async def test_panic_mode_spreads_over_every_host() -> None:
    async with backends(3) as bs:
        bs[0].healthy = bs[1].healthy = False
        async with running_proxy(bootstrap(checked_cluster(bs))) as proxy:
            # One healthy host of three (33 %) is below the 50 % panic
            # threshold: traffic goes to every host, healthy or not.
            assert svc(proxy).in_panic
            assert await spread(proxy, 90) == {"b0": 30, "b1": 30, "b2": 30}
        no_panic = "    common_lb_config: { healthy_panic_threshold: { value: 0 } }\n"
        async with running_proxy(bootstrap(checked_cluster(bs, extra=no_panic))) as proxy:
            assert not svc(proxy).in_panic
            assert await spread(proxy, 30) == {"b2": 30}


async def test_tcp_connect_check_follows_the_listener() -> None:
    check = (
        "{ timeout: 2s, interval: 0.05s, no_traffic_interval: 0.05s, unhealthy_threshold: 1,"
        " healthy_threshold: 1, tcp_health_check: {} }"
    )
    async with backends(2) as bs, running_proxy(bootstrap(checked_cluster(bs, check))) as proxy:
        host = svc(proxy).hosts[0]
        assert await svc(proxy).wait_ready(2)
        assert not host.failed_active_hc
        port = bs[0].port
        await bs[0].stop()
        await wait_for(lambda: host.failed_active_hc)
        assert await spread(proxy, 20) == {"b1": 20}
        assert stat(proxy, "cluster.svc.health_check.network_failure")
        restarted = await asyncio.start_server(_serve_pong, "127.0.0.1", port)
        try:
            await wait_for(lambda: not host.failed_active_hc)
        finally:
            restarted.close()


async def _serve_pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers PONG to PING (split in two writes), NOPE to anything else."""
    try:
        data = await asyncio.wait_for(reader.read(64), 5)
        if data == b"PING":
            writer.write(b"PO")
            await writer.drain()
            writer.write(b"NG")
        else:
            writer.write(b"NOPE")
        await writer.drain()
        await asyncio.wait_for(reader.read(64), 5)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()


async def _serve_nope(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"NOPE")
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def tcp_servers() -> AsyncIterator[tuple[int, int]]:
    good = await asyncio.start_server(_serve_pong, "127.0.0.1", 0)
    bad = await asyncio.start_server(_serve_nope, "127.0.0.1", 0)
    try:
        yield good.sockets[0].getsockname()[1], bad.sockets[0].getsockname()[1]
    finally:
        good.close()
        bad.close()


@pytest.mark.parametrize("receive", ["504f4e47", "504f"])
async def test_tcp_send_receive_payloads(receive: str) -> None:
    async with tcp_servers() as (good, bad):
        good_b, bad_b = Backend("good"), Backend("bad")
        good_b.port, bad_b.port = good, bad
        check = (
            "{ timeout: 2s, interval: 0.05s, no_traffic_interval: 0.05s, unhealthy_threshold: 1,"
            f" healthy_threshold: 1, tcp_health_check: {{ send: {{ text: '50494e47' }},"
            f" receive: [{{ text: '{receive}' }}] }} }}"
        )
        async with running_proxy(bootstrap(checked_cluster([good_b, bad_b], check))) as proxy:
            cluster = svc(proxy)
            assert await cluster.wait_ready(2)
            assert [h.failed_active_hc for h in cluster.hosts] == [False, True]
            page = await clusters_page(proxy)
            assert f"svc::127.0.0.1:{bad}::health_flags::/failed_active_hc" in page


def test_host_health_transitions_follow_envoy() -> None:
    from meshlet.config.model import HealthCheckConfig, HealthCheckKind
    from meshlet.proxy.upstream.health import HostHealth, payloads_found

    cfg = HealthCheckConfig(HealthCheckKind.TCP, 1.0, 1.0, unhealthy_threshold=2, healthy_threshold=3)
    state = HostHealth()
    assert state.observe(True, True, cfg) is False  # first success: healthy at once
    assert state.observe(False, False, cfg) is None
    assert state.observe(False, False, cfg) is True  # second failure in a row
    assert [state.observe(True, True, cfg) for _ in range(3)] == [None, None, False]
    assert state.observe(False, False, cfg) is None
    assert state.observe(True, False, cfg) is None  # a success resets the failure run
    assert state.observe(False, False, cfg) is None
    assert payloads_found(b"xxPOyyNG", (b"PO", b"NG"))
    assert not payloads_found(b"NGxxPO", (b"PO", b"NG"))


def test_next_interval_by_traffic_health_and_jitter() -> None:
    import random

    from meshlet.config.model import Cluster, DiscoveryType, HealthCheckConfig, HealthCheckKind
    from meshlet.proxy.observe.stats import StatsStore
    from meshlet.proxy.upstream.health import HealthChecker

    class FakeCluster:
        config = Cluster(name="c", discovery=DiscoveryType.STATIC)
        has_traffic = False

        async def open_connection(self, host: object, app_factory: object) -> object:
            raise OSError("not used")

    class FakeHost:
        failed_active_hc = False

    cfg = HealthCheckConfig(
        HealthCheckKind.TCP, 1.0, 5.0, 1, 1,
        interval_jitter=0.5, no_traffic_interval=60.0, no_traffic_healthy_interval=30.0,
        unhealthy_interval=2.0,
    )
    cluster = FakeCluster()
    checker = HealthChecker(cfg, cluster, StatsStore().scope("x."), lambda _h: None, rng=random.Random(4))
    host = FakeHost()
    assert 30.0 <= checker.next_interval(host) <= 30.5  # no traffic yet, healthy
    host.failed_active_hc = True
    assert 60.0 <= checker.next_interval(host) <= 60.5  # no traffic yet, failed
    cluster.has_traffic = True
    assert 2.0 <= checker.next_interval(host) <= 2.5  # failed: unhealthy_interval
    host.failed_active_hc = False
    samples = [checker.next_interval(host) for _ in range(50)]
    assert all(5.0 <= s <= 5.5 for s in samples) and len(set(samples)) > 1  # jittered
