"""HTTP/2 upstreams through the connection manager: multiplexing and trailers.

The upstream is a small server on the ``h2`` library itself (not meshlet's
codec), so the proxy's HTTP/2 client is checked against an independent peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import httpx
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded, TrailersReceived

from meshlet.config.model import (
    Cluster,
    ClusterAction,
    ClusterLoadAssignment,
    DiscoveryType,
    Endpoint,
    HttpConnectionManagerConfig,
    LocalityEndpoints,
    PathMatchKind,
    Route,
    RouteConfiguration,
    RouteMatch,
    SocketAddress,
    UpstreamProtocol,
    VirtualHost,
)
from meshlet.proxy.http.conn_manager import HttpConnectionManager
from meshlet.proxy.runtime import ProxyRuntime
from meshlet.proxy.transport import ConnectionInfo
from meshlet.proxy.upstream.manager import ClusterManager


@dataclass
class UpstreamState:
    connections: int = 0
    active: int = 0
    max_active: int = 0
    paths: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    trailers: list[dict[str, str]] = field(default_factory=list)


class H2Upstream(asyncio.Protocol):
    """Answers every request after 100 ms with a small body; ``/trailers``
    answers without content-length and ends with gRPC-style trailers."""

    def __init__(self, state: UpstreamState) -> None:
        self.state = state
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.state.connections += 1
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        paths: dict[int, str] = {}
        for event in self.conn.receive_data(data):
            if isinstance(event, RequestReceived):
                headers = dict(event.headers)
                paths[event.stream_id] = str(headers[":path"])
                self.state.paths.append(str(headers[":path"]))
                self.state.active += 1
                self.state.max_active = max(self.state.max_active, self.state.active)
            if isinstance(event, DataReceived):
                self.state.bodies.append(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if isinstance(event, TrailersReceived):
                self.state.trailers.append({str(k): str(v) for k, v in event.headers})
            if isinstance(event, StreamEnded):
                path = paths.get(event.stream_id, "/")
                asyncio.get_running_loop().call_later(0.1, self._respond, event.stream_id, path)
        self._flush()

    def _respond(self, stream_id: int, path: str) -> None:
        self.state.active -= 1
        body = f"stream {stream_id}\n".encode()
        if path == "/trailers":
            self.conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
            self.conn.send_data(stream_id, body)
            self.conn.send_headers(stream_id, [("grpc-status", "0"), ("grpc-message", "ok")], end_stream=True)
        else:
            self.conn.send_headers(stream_id, [(":status", "200"), ("content-length", str(len(body)))])
            self.conn.send_data(stream_id, body, end_stream=True)
        self._flush()

    def _flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())


class _Accept(asyncio.Protocol):
    def __init__(self, hcm: HttpConnectionManager) -> None:
        self._hcm = hcm

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        info = ConnectionInfo(
            peer=transport.get_extra_info("peername")[:2], local=transport.get_extra_info("sockname")[:2]
        )
        proto = self._hcm.protocol_for(info)
        transport.set_protocol(proto)
        proto.connection_made(transport)


@dataclass
class Setup:
    state: UpstreamState
    runtime: ProxyRuntime
    port: int


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    loop = asyncio.get_running_loop()
    state = UpstreamState()
    upstream = await loop.create_server(lambda: H2Upstream(state), "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    runtime = ProxyRuntime()
    runtime.clusters = ClusterManager(runtime)
    eps = (Endpoint(SocketAddress("127.0.0.1", up_port)),)
    runtime.clusters.update(
        {
            "grpc": Cluster(
                name="grpc",
                discovery=DiscoveryType.STATIC,
                protocol=UpstreamProtocol.HTTP2,
                load_assignment=ClusterLoadAssignment("grpc", (LocalityEndpoints(eps),)),
            )
        }
    )
    vhost = VirtualHost(
        name="v",
        domains=("*",),
        routes=(Route("all", RouteMatch(PathMatchKind.PREFIX, "/"), ClusterAction("grpc")),),
    )
    config = HttpConnectionManagerConfig(
        stat_prefix="h2", route_config=RouteConfiguration(name="rc", virtual_hosts=(vhost,))
    )
    hcm = HttpConnectionManager(config, runtime)
    proxy = await loop.create_server(lambda: _Accept(hcm), "127.0.0.1", 0)
    try:
        yield Setup(state, runtime, proxy.sockets[0].getsockname()[1])
    finally:
        proxy.close()
        upstream.close()
        runtime.cluster_manager().close()


async def test_concurrent_requests_share_one_http2_connection(setup: Setup) -> None:
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{setup.port}", limits=limits) as client:
        responses = await asyncio.gather(*(client.get(f"/r{i}") for i in range(10)))
    assert all(r.status_code == 200 for r in responses)
    assert setup.state.connections == 1
    assert setup.state.max_active > 1
    assert setup.runtime.stats.value("cluster.grpc.upstream_cx_total") == 1
    assert setup.runtime.stats.value("cluster.grpc.upstream_rq_200") == 10


async def test_http2_trailers_reach_an_http1_client_in_the_last_chunk(setup: Setup) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    try:
        writer.write(b"POST /trailers HTTP/1.1\r\nhost: x\r\nte: trailers\r\ncontent-length: 0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        while not rest.startswith(b"0\r\n") and b"\r\n0\r\n" not in rest:
            rest += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"grpc-status: 0" in rest
        assert b"grpc-message: ok" in rest
    finally:
        writer.close()


async def test_request_trailers_reach_an_http2_upstream(setup: Setup) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nte: trailers\r\n\r\n"
            b"5\r\nhello\r\n0\r\nx-checksum: abc123\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"".join(setup.state.bodies) == b"hello"
        assert setup.state.trailers == [{"x-checksum": "abc123"}]
    finally:
        writer.close()
