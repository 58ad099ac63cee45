"""HTTP/1.1 upstream codec against real servers: the stdlib http.server, scripted
raw sockets, and meshlet's own HTTP/1.1 server codec."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

import pytest
import uvloop
from codec_helpers import MemoryTransport
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlet.proxy.http.h1_client import H1ClientConnection
from meshlet.proxy.http.h1_server import H1ServerProtocol
from meshlet.proxy.http.stream import (
    BodyStream,
    CodecSettings,
    DownstreamStream,
    RequestHead,
    ResponseHead,
    StreamReset,
)
from meshlet.proxy.transport import PLAIN, ConnectionInfo

# pytest-asyncio deprecates overriding event_loop_policy in favour of a
# conftest-wide hook; until the suite has one, this module keeps the fixture.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture")


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


async def connect(port: int, **kwargs: int) -> H1ClientConnection:
    """The way the upstream pool does it: a raw connection, then the transport socket installs the codec."""
    loop = asyncio.get_running_loop()
    raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    proto = await PLAIN.connect(raw, lambda _info: H1ClientConnection(**kwargs), timeout=5)
    conn = cast(H1ClientConnection, proto)
    await conn.wait_connected(5)
    return conn


def get(path: str, method: str = "GET", headers: list[tuple[str, str]] | None = None) -> RequestHead:
    return RequestHead(method, "http", "upstream.test", path, headers or [])


async def request(
    conn: H1ClientConnection, head: RequestHead, body: BodyStream | None = None
) -> tuple[int, bytes]:
    response = await asyncio.wait_for(conn.request(head, body), 5)
    return response.head.status, await asyncio.wait_for(response.body.read_all(1 << 26), 5)


# -- the stdlib http.server, in a thread ---------------------------------------------- #


class StdlibHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    peers: list[int]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.peers.append(self.client_address[1])
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Sum")
            self.end_headers()
            self.wfile.write(b"4\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Sum: 7\r\n\r\n")
            return
        if self.path == "/204":
            self.send_response(204)
            self.end_headers()
            return
        body = f"hello {self.path} host={self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/close":
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self.peers.append(self.client_address[1])
        if self.headers.get("Transfer-Encoding") == "chunked":
            body, trailers = self._read_chunked()
        else:
            body, trailers = self.rfile.read(int(self.headers.get("Content-Length", "0"))), b""
        out = b"got " + body + b" trailers=" + trailers
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def _read_chunked(self) -> tuple[bytes, bytes]:
        body = b""
        while size := int(self.rfile.readline().strip(), 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        trailers = b""
        while (line := self.rfile.readline()) != b"\r\n":
            trailers += line.strip()
        return body, trailers


@pytest.fixture
def stdlib_server() -> Iterator[tuple[int, list[int]]]:
    peers: list[int] = []
    handler = type("Handler", (StdlibHandler,), {"peers": peers})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], peers
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_keep_alive_reuse_against_stdlib(stdlib_server: tuple[int, list[int]]) -> None:
    port, peers = stdlib_server
    conn = await connect(port)
    try:
        assert conn.available and conn.active_requests == 0
        for i in range(3):
            status, body = await request(conn, get(f"/r{i}"))
            assert (status, body) == (200, f"hello /r{i} host=upstream.test".encode())
            assert conn.available
        assert len(set(peers)) == 1  # every request on the same connection
        idle = conn.idle_since
        await request(conn, get("/r3"))
        assert conn.idle_since >= idle
    finally:
        conn.close()


async def test_connection_close_response_is_not_reused(stdlib_server: tuple[int, list[int]]) -> None:
    conn = await connect(stdlib_server[0])
    status, _ = await request(conn, get("/close"))
    assert status == 200
    assert not conn.available
    await asyncio.sleep(0.05)
    assert conn.closed


async def test_post_bodies_against_stdlib(stdlib_server: tuple[int, list[int]]) -> None:
    conn = await connect(stdlib_server[0])
    try:
        sized = get("/p", "POST", [("content-length", "5")])
        assert await request(conn, sized, BodyStream.of(b"12345")) == (200, b"got 12345 trailers=")

        streamed = BodyStream()

        async def produce() -> None:
            for piece in (b"ab", b"cd", b"ef"):
                await streamed.write(piece)
                await asyncio.sleep(0.01)
            streamed.end([("x-check", "6")])

        producer = asyncio.create_task(produce())
        assert await request(conn, get("/p", "POST"), streamed) == (200, b"got abcdef trailers=x-check: 6")
        await producer

        # An empty POST still says how long it is.
        assert await request(conn, get("/p", "POST"), BodyStream.of(b"")) == (200, b"got  trailers=")
        assert conn.available
    finally:
        conn.close()


async def test_chunked_response_with_trailers_from_stdlib(stdlib_server: tuple[int, list[int]]) -> None:
    conn = await connect(stdlib_server[0])
    try:
        response = await asyncio.wait_for(conn.request(get("/chunked"), None), 5)
        assert await response.body.read_all(1024) == b"abcdefg"
        assert response.body.trailers == [("x-sum", "7")]
        assert response.head.get("transfer-encoding") is None
        assert conn.available
    finally:
        conn.close()


async def test_head_and_204_have_no_body(stdlib_server: tuple[int, list[int]]) -> None:
    port, peers = stdlib_server
    conn = await connect(port)
    try:
        response = await asyncio.wait_for(conn.request(get("/x", "HEAD"), None), 5)
        assert response.head.get("content-length") == str(len(b"hello /x host=upstream.test"))
        assert await asyncio.wait_for(response.body.read_all(1024), 5) == b""
        assert await request(conn, get("/204")) == (204, b"")
        # The connection is still in sync after both.
        assert await request(conn, get("/after")) == (200, b"hello /after host=upstream.test")
        assert len(set(peers)) == 1
    finally:
        conn.close()


# -- nginx, an independent HTTP/1.1 server ------------------------------------------------ #

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {root}/error.log;
pid {root}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 3;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        location = /conn {{ return 200 "$connection $connection_requests"; }}
        location = /empty {{ return 204; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    if shutil.which("nginx") is None:
        pytest.skip("nginx not installed")
    (tmp_path / "www").mkdir()
    big = bytes(range(256)) * (8 * 4096)  # 8 MiB
    (tmp_path / "www" / "big.bin").write_bytes(big)
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=tmp_path, port=port))
    proc = subprocess.Popen(
        ["nginx", "-p", str(tmp_path), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("nginx did not start: " + (tmp_path / "error.log").read_text())
                time.sleep(0.05)
        yield port, big
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.interop
async def test_against_nginx(nginx: tuple[int, bytes]) -> None:
    port, big = nginx
    conn = await connect(port)
    try:
        status, first = await request(conn, get("/conn"))
        assert status == 200 and first.endswith(b" 1")
        connection_number = first.split()[0]
        # A HEAD of a large file: the length is announced, no body follows.
        response = await asyncio.wait_for(conn.request(get("/big.bin", "HEAD"), None), 5)
        assert response.head.get("content-length") == str(len(big))
        assert await asyncio.wait_for(response.body.read_all(10), 5) == b""
        # Same connection, third and last request nginx allows on it.
        status, third = await request(conn, get("/conn"))
        assert third == connection_number + b" 3"
        assert not conn.available  # nginx said Connection: close
    finally:
        conn.close()

    conn = await connect(port, buffer_limit=128 * 1024)
    try:
        assert await request(conn, get("/empty")) == (204, b"")
        # nginx discards a body it does not need, chunked or not, and keeps the connection.
        upload = BodyStream()
        await upload.write(b"x" * 10000)
        upload.end()
        assert (await request(conn, get("/empty", "POST"), upload))[0] == 204
        assert conn.available
        response = await asyncio.wait_for(conn.request(get("/big.bin"), None), 5)
        await asyncio.sleep(0.2)  # nginx runs ahead while nobody reads: reading pauses
        assert response.body.buffered <= 128 * 1024 + 512 * 1024
        assert await asyncio.wait_for(response.body.read_all(len(big)), 5) == big
    finally:
        conn.close()


# -- scripted raw upstreams -------------------------------------------------------------- #

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[int]:
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def test_connection_reset_before_the_head_raises() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)

    async with scripted(hang_up) as port:
        conn = await connect(port)
        with pytest.raises(StreamReset) as info:
            await asyncio.wait_for(conn.request(get("/"), None), 5)
        assert info.value.code == "CONNECTION_RESET"
        assert conn.closed and not conn.available


async def test_connection_lost_mid_body_aborts_the_response_body() -> None:
    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part")
        await writer.drain()

    async with scripted(truncate) as port:
        conn = await connect(port)
        response = await asyncio.wait_for(conn.request(get("/"), None), 5)
        with pytest.raises(StreamReset) as info:
            await asyncio.wait_for(response.body.read_all(1024), 5)
        assert info.value.code == "CONNECTION_RESET"


async def test_interim_100_continue_is_skipped_and_close_delimited_body_read() -> None:
    async def interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nuntil the end")
        await writer.drain()

    async with scripted(interim) as port:
        conn = await connect(port)
        response = await asyncio.wait_for(conn.request(get("/"), None), 5)
        assert response.head.status == 200 and response.head.headers == [("x-a", "1")]
        assert not conn.available  # a close-delimited body ends the connection
        assert await asyncio.wait_for(response.body.read_all(1024), 5) == b"until the end"


async def test_head_response_with_length_then_next_response() -> None:
    async def head_then_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert (await read_head(reader)).startswith(b"HEAD ")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        assert (await read_head(reader)).startswith(b"GET ")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(head_then_get) as port:
        conn = await connect(port)
        try:
            response = await asyncio.wait_for(conn.request(get("/", "HEAD"), None), 5)
            assert response.head.get("content-length") == "1234"
            assert await asyncio.wait_for(response.body.read_all(10), 5) == b""
            assert conn.available
            assert await request(conn, get("/")) == (200, b"ok")
        finally:
            conn.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
    ],
)
async def test_malformed_response_is_a_protocol_error(reply: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(reply)
        await writer.drain()
        await reader.read()

    async with scripted(bad) as port:
        conn = await connect(port)
        with pytest.raises(StreamReset) as info:
            await asyncio.wait_for(conn.request(get("/"), None), 5)
        assert info.value.code == "PROTOCOL_ERROR"
        await asyncio.sleep(0.05)
        assert conn.closed


async def test_unsolicited_bytes_on_an_idle_connection_close_it() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(chatty) as port:
        conn = await connect(port)
        assert await request(conn, get("/")) == (200, b"")
        await asyncio.sleep(0.3)
        assert conn.closed and not conn.available


async def test_invalid_requests_are_refused_unsent(stdlib_server: tuple[int, list[int]]) -> None:
    conn = await connect(stdlib_server[0])
    try:
        for head in (
            get("/", "POST", [("content-length", "5")]),  # a length but no body
            get("/", "POST", [("content-length", "five")]),
            get("/", "GET", [("x-bad", "a\r\nx-injected: 1")]),
        ):
            with pytest.raises(StreamReset) as info:
                await conn.request(head, None)
            assert info.value.code == "INTERNAL_ERROR" and info.value.local
            assert conn.available
        aborted = BodyStream()
        aborted.feed(b"partial")
        aborted.abort(StreamReset("CONNECTION_RESET"))
        with pytest.raises(StreamReset) as info:
            await conn.request(get("/", "POST"), aborted)  # never sent as if complete
        assert info.value.code == "CANCEL" and conn.available
        assert await request(conn, get("/fine")) == (200, b"hello /fine host=upstream.test")
    finally:
        conn.close()


async def test_busy_connection_refuses_a_second_request() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(0.2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(slow) as port:
        conn = await connect(port)
        try:
            first = asyncio.create_task(conn.request(get("/"), None))
            await asyncio.sleep(0.05)
            assert conn.active_requests == 1 and not conn.available
            with pytest.raises(StreamReset) as info:
                await conn.request(get("/"), None)
            assert info.value.code == "REFUSED_STREAM"
            assert (await asyncio.wait_for(first, 5)).head.status == 200
        finally:
            conn.close()


async def test_early_response_before_the_request_body_is_sent() -> None:
    async def reject(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        await writer.drain()
        await asyncio.sleep(0.5)

    async with scripted(reject) as port:
        conn = await connect(port)
        body = BodyStream()
        await body.write(b"x" * 1000)  # the rest never comes: the response must not wait for it
        head = get("/upload", "POST", [("content-length", "1000000")])
        status, data = await request(conn, head, body)
        assert (status, data) == (413, b"too big!")
        await asyncio.sleep(0.05)
        assert conn.closed  # the half-sent request leaves the connection unusable


async def test_slow_upstream_pushes_back_on_the_request_body() -> None:
    size = 20 * 1024 * 1024

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(0.3)  # the client runs ahead while nothing is read
        await asyncio.wait_for(reader.readexactly(size), 5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        await reader.read()

    async with scripted(slow_reader) as port:
        conn = await connect(port)
        transport = conn._transport
        assert transport is not None
        body = BodyStream(high_water=256 * 1024)
        buffered: list[int] = []

        async def produce() -> None:
            piece = b"p" * 65536
            for _ in range(size // len(piece)):
                await body.write(piece)
                buffered.append(transport.get_write_buffer_size() + body.buffered)
            body.end()

        producer = asyncio.create_task(produce())
        try:
            head = get("/upload", "POST", [("content-length", str(size))])
            assert await request(conn, head, body) == (200, b"done")
            await asyncio.wait_for(producer, 5)
            # What the process holds for the upload stays near the two high-water marks.
            assert max(buffered) <= 2 * 256 * 1024 + 2 * 65536
            assert conn.available
        finally:
            producer.cancel()
            conn.close()


# -- against meshlet's own server codec -------------------------------------------------- #


@asynccontextmanager
async def meshlet_server(handler: Callable[[DownstreamStream], Awaitable[None]]) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    protocols: list[H1ServerProtocol] = []

    def factory() -> H1ServerProtocol:
        proto = H1ServerProtocol(handler, ConnectionInfo(("127.0.0.1", 0), ("127.0.0.1", 0)), CodecSettings())
        protocols.append(proto)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for proto in protocols:
            proto.close()
        server.close()
        await server.wait_closed()


async def test_chunked_both_ways_with_trailers() -> None:
    async def echo_chunked(stream: DownstreamStream) -> None:
        await stream.send_head(ResponseHead(200, [("x-method", stream.head.method)]))
        while chunk := await stream.body.read():
            await stream.send_data(chunk[::-1])
        await stream.send_trailers([*(stream.body.trailers or []), ("x-done", "yes")])

    async with meshlet_server(echo_chunked) as port:
        conn = await connect(port)
        try:
            body = BodyStream()

            async def produce() -> None:
                await body.write(b"abc")
                await asyncio.sleep(0.01)
                await body.write(b"xyz")
                body.end([("x-in", "1")])

            producer = asyncio.create_task(produce())
            response = await asyncio.wait_for(conn.request(get("/", "PUT"), body), 5)
            assert response.head.get("x-method") == "PUT"
            assert await asyncio.wait_for(response.body.read_all(100), 5) == b"cbazyx"
            assert response.body.trailers == [("x-in", "1"), ("x-done", "yes")]
            await producer
            # The server answered before the request was complete: it closes.
            assert response.head.get("connection") is None and not conn.available
        finally:
            conn.close()


async def test_upgrade_tunnels_raw_bytes_both_ways() -> None:
    async def upgrade(stream: DownstreamStream) -> None:
        await stream.send_head(ResponseHead(101, [("connection", "upgrade"), ("upgrade", "echo")]))
        while chunk := await stream.body.read():
            await stream.send_data(b"<" + chunk + b">")
        await stream.send_data(b"", end_stream=True)

    async with meshlet_server(upgrade) as port:
        conn = await connect(port)
        outbound = BodyStream()
        head = get("/ws", "GET", [("connection", "upgrade"), ("upgrade", "echo")])
        response = await asyncio.wait_for(conn.request(head, outbound), 5)
        assert response.head.status == 101
        assert response.head.get("upgrade") == "echo"
        await outbound.write(b"ping")
        assert await asyncio.wait_for(response.body.read(), 5) == b"<ping>"
        await outbound.write(b"\x00\x01binary")
        assert await asyncio.wait_for(response.body.read(), 5) == b"<\x00\x01binary>"
        outbound.end()  # our side closes: the server ends its side too
        assert await asyncio.wait_for(response.body.read_all(100), 5) == b""
        assert not conn.available


async def test_slow_reader_pauses_the_upstream() -> None:
    size = 20 * 1024 * 1024
    limit = 256 * 1024

    async def big(stream: DownstreamStream) -> None:
        await stream.send_head(ResponseHead(200, [("content-length", str(size))]))
        piece = b"q" * 65536
        for _ in range(size // len(piece)):
            await stream.send_data(piece)
        await stream.send_data(b"", end_stream=True)

    async with meshlet_server(big) as port:
        conn = await connect(port, buffer_limit=limit)
        try:
            response = await asyncio.wait_for(conn.request(get("/big"), None), 5)
            await asyncio.sleep(0.3)  # the upstream runs ahead while nobody reads
            assert response.body.buffered <= limit + 512 * 1024
            total = 0
            while chunk := await asyncio.wait_for(response.body.read(), 5):
                total += len(chunk)
                assert response.body.buffered <= limit + 512 * 1024
            assert total == size
            assert conn.available
        finally:
            conn.close()


async def test_installed_directly_by_create_connection() -> None:
    async def ok(stream: DownstreamStream) -> None:
        await stream.send_head(ResponseHead(200, [("content-length", "2")]))
        await stream.send_data(b"ok", end_stream=True)

    async with meshlet_server(ok) as port:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(H1ClientConnection, "127.0.0.1", port)
        await proto.wait_connected(5)
        try:
            assert await request(proto, get("/")) == (200, b"ok")
        finally:
            proto.close()


# -- whatever an upstream sends -------------------------------------------------------- #


RESPONSE_FRAGMENTS = [
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.0 204 No Content\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n", b"\r\n", b"abc", b"3\r\nabc\r\n", b"0\r\nX-T: 1\r\n\r\n", b"\xff\x00",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["GET", "HEAD", "POST"]),
    st.lists(st.one_of(st.sampled_from(RESPONSE_FRAGMENTS), st.binary(max_size=40)), max_size=20),
)
def test_no_response_input_escapes_data_received(method: str, chunks: list[bytes]) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        conn = H1ClientConnection()
        conn.connection_made(MemoryTransport())
        body = BodyStream.of(b"payload") if method == "POST" else None
        pending = asyncio.ensure_future(conn.request(get("/", method), body))
        await asyncio.sleep(0)
        for chunk in chunks:
            conn.data_received(chunk)
            await asyncio.sleep(0)
        conn.connection_lost(None)
        try:
            response = await pending
            await response.body.read_all(1 << 20)
        except StreamReset:
            pass
        assert not errors

    asyncio.run(scenario())
