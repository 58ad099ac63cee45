"""Cluster manager, STRICT_DNS and connection pools over real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from meshlet.config.model import (
    Cluster,
    ClusterLoadAssignment,
    DiscoveryType,
    Endpoint,
    LocalityEndpoints,
    SocketAddress,
)
from meshlet.errors import ConfigError
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.observe.stats import Counter
from meshlet.proxy.runtime import ProxyRuntime
from meshlet.proxy.upstream.cluster import HTTP1, ClusterRuntime
from meshlet.proxy.upstream.dns import DnsRefresher, pick_family
from meshlet.proxy.upstream.manager import ClusterManager
from meshlet.proxy.upstream.pool import UpstreamConnectError


def _static(name: str, port: int, **kw: object) -> Cluster:
    eps = (Endpoint(SocketAddress("127.0.0.1", port)),)
    return Cluster(
        name=name,
        discovery=DiscoveryType.STATIC,
        load_assignment=ClusterLoadAssignment(name, (LocalityEndpoints(eps),)),
        **{"connect_timeout": 1.0, **kw},  # type: ignore[arg-type]
    )


class _Upstream:
    """Counts connections; answers every request with a tiny keep-alive 200."""

    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(0.02)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[_Upstream]:
    up = _Upstream()
    await up.start()
    yield up
    assert up.server is not None
    up.server.close()


def _port(up: _Upstream) -> int:
    assert up.server is not None
    return int(up.server.sockets[0].getsockname()[1])


async def _get(cluster: ClusterRuntime) -> bytes:
    host = cluster.choose_host()
    assert host is not None
    lease = await host.pool(HTTP1).acquire(timeout=5)
    try:
        resp = await lease.connection.request(RequestHead("GET", "http", "x", "/"), None)
        body = await resp.body.read_all(1024)
    except BaseException:
        lease.release(reusable=False)
        raise
    lease.release()
    return body


async def test_manager_update_keeps_unchanged_clusters_and_drains_removed(upstream: _Upstream) -> None:
    runtime = ProxyRuntime()
    manager = ClusterManager(runtime)
    port = _port(upstream)
    manager.update({"a": _static("a", port), "b": _static("b", port)})
    a, b = manager.get("a"), manager.get("b")
    assert a is not None and b is not None
    assert await _get(b) == b"ok"
    manager.update({"a": _static("a", port), "b": _static("b", port, connect_timeout=2.0)})
    assert manager.get("a") is a  # unchanged: same live state
    assert manager.get("b") is not b  # changed: rebuilt
    await asyncio.sleep(0.05)
    assert upstream.open == 0  # the old "b" drained its idle connection
    manager.update({"a": _static("a", port)})
    assert manager.get("b") is None
    assert manager.names() == ["a"]
    manager.close()


async def test_manager_rejects_a_bad_cluster_and_keeps_the_old_set() -> None:
    manager = ClusterManager(ProxyRuntime())
    manager.update({"a": _static("a", 1)})
    bad = Cluster(name="e", discovery=DiscoveryType.EDS)
    with pytest.raises(ConfigError) as err:
        manager.update({"a": _static("a", 1), "e": bad})
    assert err.value.path == "clusters[e].type"
    assert manager.names() == ["a"]
    manager.close()


async def test_pool_reuses_and_bounds_connections(upstream: _Upstream) -> None:
    runtime = ProxyRuntime()
    cluster = ClusterRuntime(_static("c", _port(upstream)), runtime)
    host = cluster.hosts[0]
    pool = host.pool(HTTP1)
    pool.max_connections = 2
    results = await asyncio.gather(*(_get(cluster) for _ in range(10)))
    assert results == [b"ok"] * 10
    assert upstream.connections == 2
    assert runtime.stats.value("cluster.c.upstream_rq_pending_total") == 8
    assert host.describe()["cx_active"] == 2
    cluster.close()


async def test_pool_pending_overflow(upstream: _Upstream) -> None:
    cluster = ClusterRuntime(_static("o", _port(upstream)), ProxyRuntime())
    pool = cluster.hosts[0].pool(HTTP1)
    pool.max_connections = 1
    pool.max_pending = 1
    outcomes = await asyncio.gather(*(_get(cluster) for _ in range(3)), return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, UpstreamConnectError)]
    assert len(errors) == 1 and errors[0].reason == "overflow"
    cluster.close()


async def test_idle_timeout_and_max_requests(upstream: _Upstream) -> None:
    runtime = ProxyRuntime()
    cluster = ClusterRuntime(
        _static("i", _port(upstream), idle_timeout=0.1, max_requests_per_connection=2), runtime
    )
    for _ in range(4):
        assert await _get(cluster) == b"ok"
    assert upstream.connections == 2
    assert runtime.stats.value("cluster.i.upstream_cx_max_requests") == 2
    assert await _get(cluster) == b"ok"
    await asyncio.sleep(0.3)
    assert runtime.stats.value("cluster.i.upstream_cx_idle_timeout") == 1
    assert upstream.open == 0
    cluster.close()


async def test_strict_dns_resolves_localhost(upstream: _Upstream) -> None:
    runtime = ProxyRuntime()
    cfg = Cluster(
        name="d",
        discovery=DiscoveryType.STRICT_DNS,
        dns_lookup_family="V4_ONLY",
        dns_refresh_rate=0.1,
        load_assignment=ClusterLoadAssignment(
            "d", (LocalityEndpoints((Endpoint(SocketAddress("localhost", _port(upstream)), weight=3),)),)
        ),
    )
    cluster = ClusterRuntime(cfg, runtime)
    cluster.start()
    assert await cluster.wait_ready(5)
    assert [str(h.address) for h in cluster.hosts] == [f"127.0.0.1:{_port(upstream)}"]
    assert cluster.hosts[0].weight == 3 and cluster.hosts[0].hostname == "localhost"
    first = cluster.hosts[0]
    await asyncio.sleep(0.35)  # a few refreshes later the same host object (and pool) remains
    assert cluster.hosts[0] is first
    assert (runtime.stats.value("cluster.d.update_success") or 0) >= 2
    assert await _get(cluster) == b"ok"
    cluster.close()


async def test_dns_failure_keeps_last_good_set() -> None:
    updates: list[list[Endpoint]] = []
    attempts, successes, failures = Counter(), Counter(), Counter()
    refresher = DnsRefresher(
        [Endpoint(SocketAddress("localhost", 80))],
        lookup_family="V4_ONLY",
        refresh_rate=1.0,
        on_update=updates.append,
        attempts=attempts,
        successes=successes,
        failures=failures,
    )
    assert await refresher.refresh()
    broken = DnsRefresher(
        [Endpoint(SocketAddress("name-that-does-not-exist.invalid", 80))],
        lookup_family="AUTO",
        refresh_rate=1.0,
        on_update=updates.append,
        attempts=attempts,
        successes=successes,
        failures=failures,
    )
    assert not await broken.refresh()
    assert len(updates) == 1  # the failure handed nothing over: the old hosts stay
    assert (attempts.value, successes.value, failures.value) == (2, 1, 1)


def test_pick_family() -> None:
    import socket

    found = [(socket.AF_INET6, "::1", 80), (socket.AF_INET, "127.0.0.1", 80)]
    assert pick_family(found, "AUTO") == [("::1", 80)]
    assert pick_family(found, "V4_PREFERRED") == [("127.0.0.1", 80)]
    assert pick_family(found, "ALL") == [("127.0.0.1", 80), ("::1", 80)]
    assert pick_family(found[1:], "V6_ONLY") == []


async def test_connect_failure_counts() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime = ProxyRuntime()
    cluster = ClusterRuntime(_static("f", port), runtime)
    with pytest.raises(UpstreamConnectError) as err:
        await _get(cluster)
    assert err.value.reason == "connection failure"
    assert runtime.stats.value("cluster.f.upstream_cx_connect_fail") == 1
    assert cluster.hosts[0].describe()["cx_connect_fail"] == 1
    cluster.close()


async def test_connection_closed_by_upstream_leaves_the_pool_at_once() -> None:
    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # closes the idle keep-alive connection

    server = await asyncio.start_server(one_shot, "127.0.0.1", 0)
    runtime = ProxyRuntime()
    cluster = ClusterRuntime(_static("s", server.sockets[0].getsockname()[1]), runtime)
    try:
        assert await _get(cluster) == b"ok"
        assert runtime.stats.value("cluster.s.upstream_cx_active") == 1
        await asyncio.sleep(0.2)
        assert runtime.stats.value("cluster.s.upstream_cx_active") == 0
        assert cluster.hosts[0].describe()["connections"] == 0
        assert await _get(cluster) == b"ok"  # a fresh connection
    finally:
        cluster.close()
        server.close()
