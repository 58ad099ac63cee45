"""TCP proxy over real loopback sockets: pumping, half-close, backpressure, failures."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import pytest
import uvloop

from meshlet.config.model import (
    AccessLogConfig,
    Cluster,
    ClusterLoadAssignment,
    DiscoveryType,
    Endpoint,
    LocalityEndpoints,
    SocketAddress,
    TcpProxyConfig,
)
from meshlet.proxy.observe.access_log import WRITERS
from meshlet.proxy.runtime import ProxyRuntime
from meshlet.proxy.tcp import TcpProxy
from meshlet.proxy.transport import ConnectionInfo
from meshlet.proxy.upstream.manager import ClusterManager

# Both event loops the proxy runs on: uvloop transports are not asyncio.Transport
# subclasses and differ in EOF and flow-control details.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture')


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


def _cluster(name: str, ports: list[int], connect_timeout: float = 1.0) -> Cluster:
    eps = tuple(Endpoint(SocketAddress("127.0.0.1", p)) for p in ports)
    return Cluster(
        name=name,
        discovery=DiscoveryType.STATIC,
        connect_timeout=connect_timeout,
        load_assignment=ClusterLoadAssignment(name, (LocalityEndpoints(eps),)),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve_proxy(proxy: TcpProxy) -> asyncio.Server:
    def factory() -> asyncio.Protocol:
        return _Accept(proxy)

    return await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)


class _Accept(asyncio.Protocol):
    """A minimal listener glue: builds ConnectionInfo and hands over to the proxy."""

    def __init__(self, proxy: TcpProxy) -> None:
        self._proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        info = ConnectionInfo(
            peer=transport.get_extra_info("peername"), local=transport.get_extra_info("sockname")
        )
        proto = self._proxy.protocol_for(info)
        transport.set_protocol(proto)
        proto.connection_made(transport)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "asyncio.Future[None] | object"]


@pytest.fixture
async def runtime() -> AsyncIterator[ProxyRuntime]:
    rt = ProxyRuntime()
    rt.clusters = ClusterManager(rt)
    yield rt
    rt.clusters.close()


async def _start_upstream(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


async def test_half_close_client_still_receives_reply(runtime: ProxyRuntime) -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF arrives through the proxy
        writer.write(b"got " + data)
        await writer.drain()
        writer.close()

    up, port = await _start_upstream(upstream)
    runtime.cluster_manager().update({"svc": _cluster("svc", [port])})
    proxy = TcpProxy(TcpProxyConfig(stat_prefix="t", cluster="svc"), runtime)
    server = await _serve_proxy(proxy)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(b"hello")
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply == b"got hello"
        writer.close()
        assert runtime.stats.value("tcp.t.downstream_cx_total") == 1
        assert runtime.stats.value("cluster.svc.upstream_cx_total") == 1
        assert runtime.stats.value("tcp.t.downstream_cx_rx_bytes_total") == 5
    finally:
        server.close()
        up.close()


async def test_backpressure_pauses_the_reading_side(runtime: ProxyRuntime) -> None:
    """The upstream reads nothing until told; the client's writes must stall
    (the proxy stops reading) instead of the proxy buffering everything."""
    release = asyncio.Event()
    received = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await release.wait()
        while chunk := await reader.read(65536):
            received += len(chunk)
        writer.write(b"%d" % received)
        await writer.drain()
        writer.close()

    up, port = await _start_upstream(upstream)
    runtime.cluster_manager().update({"svc": _cluster("svc", [port])})
    proxy = TcpProxy(TcpProxyConfig(stat_prefix="bp", cluster="svc"), runtime)
    server = await _serve_proxy(proxy)
    total = 64 * 1024 * 1024
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        chunk = b"x" * 65536
        sent = 0
        stalled = False
        while sent < total:
            writer.write(chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                stalled = True
                break
        assert stalled, "the proxy kept reading although the upstream did not"
        assert runtime.stats.value("tcp.bp.downstream_flow_control_paused_reading_total") >= 1  # type: ignore[operator]
        release.set()
        await asyncio.wait_for(writer.drain(), 5)
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 5)
        assert int(reply) == sent
        writer.close()
    finally:
        release.set()
        server.close()
        up.close()


async def test_connect_failure_closes_downstream_and_logs(runtime: ProxyRuntime, tmp_path: Path) -> None:
    log = tmp_path / "tcp.log"
    runtime.cluster_manager().update({"dead": _cluster("dead", [_free_port()])})
    cfg = TcpProxyConfig(
        stat_prefix="f",
        cluster="dead",
        access_logs=(AccessLogConfig(path=str(log), text_format="%RESPONSE_FLAGS% %UPSTREAM_CLUSTER%\n"),),
    )
    proxy = TcpProxy(cfg, runtime)
    server = await _serve_proxy(proxy)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert runtime.stats.value("cluster.dead.upstream_cx_connect_fail") == 1
        await WRITERS.flush()
        assert log.read_text() == "UF dead\n"
    finally:
        server.close()


async def test_unknown_cluster_closes_downstream(runtime: ProxyRuntime) -> None:
    proxy = TcpProxy(TcpProxyConfig(stat_prefix="nc", cluster="missing"), runtime)
    server = await _serve_proxy(proxy)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert runtime.stats.value("tcp.nc.downstream_cx_no_route") == 1
    finally:
        server.close()


async def test_idle_timeout_closes_both_sides(runtime: ProxyRuntime) -> None:
    upstream_closed = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        upstream_closed.set()
        writer.close()

    up, port = await _start_upstream(upstream)
    runtime.cluster_manager().update({"svc": _cluster("svc", [port])})
    proxy = TcpProxy(TcpProxyConfig(stat_prefix="idle", cluster="svc", idle_timeout=0.2), runtime)
    server = await _serve_proxy(proxy)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.wait_for(upstream_closed.wait(), 5)
        writer.close()
        assert runtime.stats.value("tcp.idle.idle_timeout") == 1
    finally:
        server.close()
        up.close()


async def test_interop_with_curl_through_tcp_proxy(runtime: ProxyRuntime) -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    up, port = await _start_upstream(upstream)
    runtime.cluster_manager().update({"svc": _cluster("svc", [port])})
    server = await _serve_proxy(TcpProxy(TcpProxyConfig(stat_prefix="c", cluster="svc"), runtime))
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "--max-time", "5", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        assert out == b"ok"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        up.close()


async def test_next_host_after_a_failed_connect(runtime: ProxyRuntime) -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from the live host")
        await writer.drain()
        writer.close()

    up, port = await _start_upstream(upstream)
    runtime.cluster_manager().update({"svc": _cluster("svc", [_free_port(), port])})
    cfg = TcpProxyConfig(stat_prefix="retry", cluster="svc", max_connect_attempts=2)
    server = await _serve_proxy(TcpProxy(cfg, runtime))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert await asyncio.wait_for(reader.read(), 5) == b"hello from the live host"
        writer.close()
        assert runtime.stats.value("cluster.svc.upstream_cx_connect_fail") == 1
    finally:
        server.close()
        up.close()
