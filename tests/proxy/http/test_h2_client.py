"""HTTP/2 client codec against real HTTP/2 servers on loopback: nghttpd, the
meshlet server codec, and a raw h2 server for GOAWAY edge cases."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import h2.config
import h2.events
import hpack
import pytest
from codec_helpers import MemoryTransport, grpc_frame, grpc_messages
from h2.settings import SettingCodes
from hyperframe.frame import SettingsFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.config.model import Http2Settings
from meshlet.proxy.http.h2_client import H2ClientConnection, request_fields
from meshlet.proxy.http.h2_common import MeshletH2Connection
from meshlet.proxy.http.h2_server import H2ServerProtocol
from meshlet.proxy.http.stream import (
    BodyStream,
    CodecSettings,
    DownstreamStream,
    RequestHead,
    ResponseHead,
    StreamReset,
)
from meshlet.proxy.transport import PLAIN, ConnectionInfo

Handler = Callable[[DownstreamStream], Awaitable[None]]


@contextlib.asynccontextmanager
async def meshlet_server(
    handler: Handler, settings: CodecSettings | None = None
) -> AsyncIterator[tuple[int, list[H2ServerProtocol]]]:
    loop = asyncio.get_running_loop()
    protocols: list[H2ServerProtocol] = []

    def factory() -> H2ServerProtocol:
        info = ConnectionInfo(peer=("127.0.0.1", 0), local=("127.0.0.1", 0))
        proto = H2ServerProtocol(handler, info, settings or CodecSettings())
        protocols.append(proto)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], protocols
    finally:
        server.close()
        for proto in protocols:
            proto.close()
        await server.wait_closed()


class EarlyBytes(asyncio.Protocol):
    """Placeholder protocol until the codec is installed: the server speaks
    first (SETTINGS), and under uvloop pausing in connection_made did not
    stop those bytes from arriving, so they are kept and handed to the codec."""

    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


async def connect(port: int, client: H2ClientConnection | None = None) -> H2ClientConnection:
    """The way the upstream pool does it: raw TCP, then the transport socket installs the codec."""
    loop = asyncio.get_running_loop()
    raw, early = await loop.create_connection(EarlyBytes, "127.0.0.1", port)
    conn = client or H2ClientConnection()
    proto = await PLAIN.connect(raw, lambda _security: conn, timeout=5)
    assert proto is conn
    if early.data:
        conn.data_received(early.data)
    await conn.wait_connected(5)
    return conn


def get(path: str, authority: str = "upstream") -> RequestHead:
    return RequestHead("GET", "http", authority, path, [("user-agent", "meshlet-test")], "1.1")


async def echo(stream: DownstreamStream) -> None:
    data = await stream.body.read_all(64 << 20)
    headers = [("x-method", stream.head.method), ("x-authority", stream.head.authority)]
    headers += [(f"x-req-{k}", v) for k, v in (stream.body.trailers or [])]
    await stream.send_head(ResponseHead(200, headers))
    await stream.send_data(data)
    await stream.send_trailers([("x-length", str(len(data)))])


# -- against nghttpd ------------------------------------------------------------- #


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def nghttpd(docroot: Path, *args: str) -> AsyncIterator[int]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", str(docroot), *args, str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        yield port
    finally:
        proc.kill()
        await proc.wait()


needs_nghttpd = pytest.mark.skipif(shutil.which("nghttpd") is None, reason="nghttpd not installed")


@needs_nghttpd
@pytest.mark.interop
async def test_nghttpd_many_concurrent_requests_on_one_connection(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"f{i}").write_bytes(bytes([65 + i]) * (1000 * (i + 1)))
    async with nghttpd(tmp_path, "--trailer", "x-done: yes", "-m", "256") as port:
        conn = await connect(port)
        try:

            async def fetch(i: int) -> tuple[int, bytes, list[tuple[str, str]] | None]:
                response = await conn.request(get(f"/f{i % 20}"), None)
                body = await response.body.read_all(1 << 20)
                return response.head.status, body, response.body.trailers

            results = await asyncio.gather(*(fetch(i) for i in range(200)))
            for i, (status, body, trailers) in enumerate(results):
                assert status == 200
                assert body == bytes([65 + i % 20]) * (1000 * (i % 20 + 1))
                assert trailers == [("x-done", "yes")]
            assert conn.active_requests == 0 and not conn.closed
        finally:
            conn.close()


@needs_nghttpd
@pytest.mark.interop
async def test_nghttpd_echo_upload_with_flow_control(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 40_000  # ~10 MB: many times nghttpd's 64 KiB window
    async with nghttpd(tmp_path, "--echo-upload") as port:
        conn = await connect(port)
        try:
            body = BodyStream()
            head = RequestHead("POST", "http", "up", "/echo", [("content-length", str(len(payload)))])

            async def produce() -> None:
                for i in range(0, len(payload), 100_000):
                    await body.write(payload[i : i + 100_000])
                body.end()

            producer = asyncio.create_task(produce())
            response = await conn.request(head, body)
            assert response.head.status == 200
            assert await response.body.read_all(len(payload)) == payload
            await producer
        finally:
            conn.close()


@needs_nghttpd
@pytest.mark.interop
async def test_nghttpd_404_and_head_request(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"12345")
    async with nghttpd(tmp_path) as port:
        conn = await connect(port)
        try:
            missing = await conn.request(get("/nope"), None)
            assert missing.head.status == 404
            await missing.body.read_all(1 << 16)
            head = await conn.request(RequestHead("HEAD", "http", "h", "/x"), BodyStream.of(b""))
            assert head.head.status == 200 and head.head.get("content-length") == "5"
            assert await head.body.read_all(10) == b""
        finally:
            conn.close()


# -- against the meshlet server codec ------------------------------------------- #


async def test_body_and_trailers_both_ways_and_h1_head_conversion() -> None:
    async with meshlet_server(echo) as (port, _):
        conn = await connect(port)
        try:
            body = BodyStream()
            body.feed(b"hello ")
            body.feed(b"world")
            body.end([("x-sum", "abc")])
            head = RequestHead(
                "POST", "http", "", "/e",
                [("host", "from-host"), ("connection", "keep-alive, x"), ("transfer-encoding", "chunked"),
                 ("te", "gzip"), ("Upgrade", "h2c")],
            )  # fmt: skip
            response = await conn.request(head, body)
            assert response.head.status == 200
            assert response.head.get("x-authority") == "from-host"
            assert response.head.get("x-req-x-sum") == "abc"
            assert await response.body.read_all(1 << 16) == b"hello world"
            assert response.body.trailers == [("x-length", "11")]
        finally:
            conn.close()


def test_request_fields_drop_connection_specific_headers() -> None:
    head = RequestHead(
        "GET", "https", "a.example", "/p?q",
        [("Host", "a.example"), ("Connection", "close"), ("Keep-Alive", "1"), ("Proxy-Connection", "x"),
         ("TE", "trailers"), ("X-Custom", "v")],
    )  # fmt: skip
    assert request_fields(head) == [
        (":method", "GET"), (":scheme", "https"), (":authority", "a.example"), (":path", "/p?q"),
        ("te", "trailers"), ("x-custom", "v"),
    ]  # fmt: skip


async def test_multiplexes_many_requests_and_respects_peer_stream_limit() -> None:
    in_flight = 0
    peak = 0

    async def counted(stream: DownstreamStream) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        await stream.send_head(ResponseHead(200, [("x-path", stream.head.path)]))
        await stream.send_data(stream.head.path.encode(), end_stream=True)

    async with meshlet_server(counted, CodecSettings(max_concurrent_streams=16)) as (port, protocols):
        conn = await connect(port)
        try:
            seen_unavailable = False

            async def one(i: int) -> bytes:
                nonlocal seen_unavailable
                while not conn.available:
                    seen_unavailable = True
                    await asyncio.sleep(0.002)
                response = await conn.request(get(f"/{i}"), None)
                return await response.body.read_all(100)

            bodies = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(300))), 10)
            assert bodies == [f"/{i}".encode() for i in range(300)]
            assert len(protocols) == 1
            assert peak == 16 and seen_unavailable
            assert conn.available and conn.active_requests == 0
        finally:
            conn.close()


async def test_reset_before_head_raises_and_after_head_aborts_body() -> None:
    async def resets(stream: DownstreamStream) -> None:
        if stream.head.path == "/late":
            await stream.send_head(ResponseHead(200))
            await stream.send_data(b"partial")
            await asyncio.sleep(0.05)
        stream.reset("REFUSED_STREAM" if stream.head.path == "/early" else "INTERNAL_ERROR")

    async with meshlet_server(resets) as (port, _):
        conn = await connect(port)
        try:
            with pytest.raises(StreamReset) as early:
                await conn.request(get("/early"), None)
            assert early.value.code == "REFUSED_STREAM" and not early.value.local
            response = await conn.request(get("/late"), None)
            assert await response.body.read() == b"partial"
            with pytest.raises(StreamReset) as late:
                await response.body.read()
            assert late.value.code == "INTERNAL_ERROR"
            assert conn.available and conn.active_requests == 0
        finally:
            conn.close()


async def test_graceful_goaway_lets_open_stream_finish_then_closes() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def parked(stream: DownstreamStream) -> None:
        started.set()
        await release.wait()
        await stream.send_head(ResponseHead(200))
        await stream.send_data(b"finished", end_stream=True)

    async with meshlet_server(parked) as (port, protocols):
        conn = await connect(port)
        pending = asyncio.create_task(conn.request(get("/slow"), None))
        await asyncio.wait_for(started.wait(), 5)
        protocols[0].drain()
        for _ in range(100):
            if not conn.available:
                break
            await asyncio.sleep(0.01)
        assert not conn.available and not conn.closed
        with pytest.raises(StreamReset) as refused:
            await conn.request(get("/new"), None)
        assert refused.value.code == "REFUSED_STREAM"
        release.set()
        response = await asyncio.wait_for(pending, 5)
        assert await response.body.read_all(100) == b"finished"
        for _ in range(100):
            if conn.closed:
                break
            await asyncio.sleep(0.01)
        assert conn.closed


def goaway_server(listener: socket.socket) -> None:
    """Answers stream 1, but sends GOAWAY(last_stream_id=1) once stream 3 arrived."""
    sock, _ = listener.accept()
    with sock:
        sock.settimeout(5)
        conn = MeshletH2Connection(h2.config.H2Configuration(client_side=False), {})
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        seen: set[int] = set()
        while seen != {1, 3}:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.RequestReceived):
                    seen.add(event.stream_id)
            sock.sendall(conn.data_to_send())
        conn.send_goaway(1)
        conn.send_headers(1, [(":status", "200")])
        conn.send_data(1, b"one", end_stream=True)
        sock.sendall(conn.data_to_send())
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass


async def test_goaway_fails_unprocessed_streams_as_refused() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=goaway_server, args=(listener,), daemon=True)
    thread.start()
    try:
        conn = await connect(listener.getsockname()[1])
        first = asyncio.create_task(conn.request(get("/1"), None))
        second = asyncio.create_task(conn.request(get("/3"), None))
        response = await asyncio.wait_for(first, 5)
        assert await response.body.read_all(10) == b"one"
        with pytest.raises(StreamReset) as refused:
            await asyncio.wait_for(second, 5)
        assert refused.value.code == "REFUSED_STREAM"
        for _ in range(100):
            if conn.closed:
                break
            await asyncio.sleep(0.01)
        assert conn.closed
    finally:
        listener.close()
        await asyncio.to_thread(thread.join, 5)


async def test_connection_loss_fails_every_open_stream() -> None:
    heads_sent = asyncio.Event()
    protocols_ref: list[H2ServerProtocol] = []

    async def hang(stream: DownstreamStream) -> None:
        if stream.head.path == "/streaming":
            await stream.send_head(ResponseHead(200))
            await stream.send_data(b"x")
            heads_sent.set()
        await asyncio.sleep(30)

    async with meshlet_server(hang) as (port, protocols):
        protocols_ref = protocols
        conn = await connect(port)
        waiting = asyncio.create_task(conn.request(get("/waiting"), None))
        streaming = await conn.request(get("/streaming"), None)
        await asyncio.wait_for(heads_sent.wait(), 5)
        assert await streaming.body.read() == b"x"
        transport = protocols_ref[0]._transport
        assert transport is not None
        transport.abort()
        with pytest.raises(StreamReset) as before:
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(StreamReset) as after:
            await asyncio.wait_for(streaming.body.read(), 5)
        assert before.value.code == after.value.code == "CONNECTION_RESET"
        assert conn.closed and not conn.available


async def test_slow_response_reader_keeps_buffer_within_window() -> None:
    size = 20 * 1024 * 1024

    async def big(stream: DownstreamStream) -> None:
        await stream.send_head(ResponseHead(200))
        chunk = b"z" * 65536
        for i in range(size // len(chunk)):
            await stream.send_data(chunk, end_stream=i == size // len(chunk) - 1)

    async with meshlet_server(big) as (port, _):
        conn = await connect(port, H2ClientConnection(buffer_limit=256 * 1024))
        try:
            response = await conn.request(get("/big"), None)
            total = peak = 0
            while chunk := await response.body.read():
                total += len(chunk)
                peak = max(peak, response.body.buffered + len(chunk))
                if total % (1024 * 1024) < len(chunk):
                    await asyncio.sleep(0.005)
            assert total == size
            assert peak <= 256 * 1024
        finally:
            conn.close()


async def test_cancelled_request_resets_the_upstream_stream() -> None:
    reset_seen: asyncio.Queue[str] = asyncio.Queue()

    async def waits(stream: DownstreamStream) -> None:
        # The server codec cancels a handler whose stream the client reset;
        # a handler reading the body may see the StreamReset first.
        try:
            await stream.body.read_all(1 << 20)
            await asyncio.sleep(30)
        except StreamReset as exc:
            await reset_seen.put(exc.code)
        except asyncio.CancelledError:
            reset_seen.put_nowait("CANCEL" if stream.body.aborted else "cancelled without a reset")
            raise

    async with meshlet_server(waits) as (port, _):
        conn = await connect(port)
        try:
            body = BodyStream()  # never ended: the request stays open
            task = asyncio.create_task(conn.request(RequestHead("POST", "http", "u", "/"), body))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.wait_for(reset_seen.get(), 5) == "CANCEL"
            assert conn.active_requests == 0
        finally:
            conn.close()


async def test_window_settings_are_advertised() -> None:
    settings = Http2Settings(initial_stream_window_size=100_000, initial_connection_window_size=3_000_000)
    conn = H2ClientConnection(settings)
    assert conn._conn.local_settings[SettingCodes.INITIAL_WINDOW_SIZE] == 100_000
    assert conn._conn.local_settings[SettingCodes.ENABLE_PUSH] == 0


def test_client_under_uvloop() -> None:
    import uvloop

    async def scenario() -> None:
        async with meshlet_server(echo) as (port, _):
            conn = await connect(port)
            try:
                responses = await asyncio.gather(
                    *(
                        conn.request(RequestHead("POST", "http", "u", "/"), BodyStream.of(b"%d" % i))
                        for i in range(50)
                    )
                )
                bodies = [await r.body.read_all(100) for r in responses]
                assert bodies == [b"%d" % i for i in range(50)]
            finally:
                conn.close()

    uvloop.run(scenario())


# -- against grpcio's server ------------------------------------------------------- #


@contextlib.contextmanager
def grpc_server() -> Iterator[int]:
    def echo_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"m%d" % i

    def missing(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise AssertionError("unreachable")

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo_unary),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
    }
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def grpc_request(method: str, message: bytes) -> tuple[RequestHead, BodyStream]:
    head = RequestHead(
        "POST", "http", "grpc.test", f"/t.S/{method}",
        [("content-type", "application/grpc"), ("te", "trailers")],
    )  # fmt: skip
    return head, BodyStream.of(grpc_frame(message))


@pytest.mark.interop
async def test_grpcio_server_unary_streaming_and_status_trailers() -> None:
    with grpc_server() as port:
        conn = await connect(port)
        try:
            echo_rsp = await conn.request(*grpc_request("Echo", b"ping"))
            assert echo_rsp.head.status == 200
            assert grpc_messages(await echo_rsp.body.read_all(1 << 16)) == [b"ping"]
            assert dict(echo_rsp.body.trailers or [])["grpc-status"] == "0"

            count_rsp = await conn.request(*grpc_request("Count", b"4"))
            assert grpc_messages(await count_rsp.body.read_all(1 << 16)) == [b"m0", b"m1", b"m2", b"m3"]
            assert dict(count_rsp.body.trailers or [])["grpc-status"] == "0"

            missing = await conn.request(*grpc_request("Missing", b""))
            await missing.body.read_all(1 << 16)
            # Trailers-only: the status travels in the head.
            status = missing.head.get("grpc-status") or dict(missing.body.trailers or []).get("grpc-status")
            assert status == str(grpc.StatusCode.NOT_FOUND.value[0])
        finally:
            conn.close()


_RESPONSE_BLOCK = hpack.Encoder().encode([(":status", "200"), ("grpc-status", "0")])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10),
            st.sampled_from([0, 1, 4, 5, 8, 0x25]),
            st.sampled_from([0, 1, 2, 3]),
            st.one_of(st.binary(max_size=40), st.just(_RESPONSE_BLOCK)),
        ),
        max_size=8,
    )
)
def test_random_upstream_frames_fail_streams_cleanly(frames: list[tuple[int, int, int, bytes]]) -> None:
    async def feed() -> None:
        conn = H2ClientConnection()
        transport = MemoryTransport()
        conn.connection_made(transport)
        pending = asyncio.create_task(conn.request(get("/"), None))
        await asyncio.sleep(0)
        data = SettingsFrame(0).serialize()
        for ftype, flags, sid, payload in frames:
            data += len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
        conn.data_received(data)  # must never raise
        conn.connection_lost(None)
        # The request ends one way or the other: a response or a StreamReset.
        try:
            response = await asyncio.wait_for(pending, 1)
        except StreamReset:
            return
        with contextlib.suppress(StreamReset):
            await asyncio.wait_for(response.body.read_all(1 << 16), 1)

    asyncio.run(feed())


async def test_assumes_at_most_100_streams_until_the_peer_settings_arrive() -> None:
    conn = H2ClientConnection()
    conn.connection_made(MemoryTransport())
    pending = [asyncio.create_task(conn.request(get(f"/{i}"), None)) for i in range(100)]
    await asyncio.sleep(0)
    assert conn.active_requests == 100 and not conn.available
    conn.data_received(SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 1000}).serialize())
    assert conn.ready.done() and conn.available
    conn.connection_lost(None)
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, StreamReset) and r.code == "CONNECTION_RESET" for r in results)


# -- abandoning one response ----------------------------------------------------- #


async def test_cancel_after_the_head_resets_only_that_stream() -> None:
    """The router abandons a response whose head arrived (route timeout,
    downstream reset): the upstream sees the stream reset and its handler is
    cancelled, while the connection keeps serving other requests."""
    handler_cancelled = asyncio.Event()

    async def endless(stream: DownstreamStream) -> None:
        if stream.head.path == "/quick":
            await stream.send_head(ResponseHead(200, [("content-length", "2")]))
            await stream.send_data(b"ok", end_stream=True)
            return
        await stream.send_head(ResponseHead(200, []))
        try:
            while True:
                await stream.send_data(b"x" * 1024)
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise

    async with meshlet_server(endless) as (port, _):
        conn = await connect(port)
        try:
            response = await conn.request(get("/endless"), None)
            assert response.head.status == 200
            assert await response.body.read()
            assert response.cancel is not None
            response.cancel()
            assert conn.active_requests == 0
            await asyncio.wait_for(handler_cancelled.wait(), 5)
            quick = await conn.request(get("/quick"), None)
            assert await quick.body.read_all(1024) == b"ok"
            assert not conn.closed
        finally:
            conn.close()
