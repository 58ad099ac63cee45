"""HTTP/2 server codec over loopback, driven by independent clients (nghttp,
h2load, curl, grpcio) and by raw frames for the error paths."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import grpc
import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from codec_helpers import MemoryTransport, grpc_frame, grpc_messages, run
from hyperframe.frame import GoAwayFrame, PingFrame, RstStreamFrame, SettingsFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.proxy.http.h2_client import H2ClientConnection
from meshlet.proxy.http.h2_server import H2ServerProtocol
from meshlet.proxy.http.stream import CodecSettings, DownstreamStream, RequestHead, ResponseHead, StreamReset
from meshlet.proxy.transport import ConnectionInfo

Handler = Callable[[DownstreamStream], Awaitable[None]]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Server:
    port: int
    protocols: list[H2ServerProtocol] = field(default_factory=list)
    local_replies: list[int] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serve(handler: Handler, settings: CodecSettings | None = None) -> AsyncIterator[Server]:
    loop = asyncio.get_running_loop()
    state = Server(port=0)
    codec = replace(
        settings or CodecSettings(), on_local_reply=lambda status, _: state.local_replies.append(status)
    )

    def factory() -> H2ServerProtocol:
        proto = H2ServerProtocol(
            handler, ConnectionInfo(peer=("127.0.0.1", 0), local=("127.0.0.1", 0)), codec
        )
        state.protocols.append(proto)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for proto in state.protocols:
            proto.close()
        await server.wait_closed()


# -- handlers ------------------------------------------------------------------ #


async def hello(stream: DownstreamStream) -> None:
    await stream.body.read_all(1 << 20)
    text = f"hello {stream.head.method} {stream.head.path} {stream.head.authority}\n".encode()
    await stream.send_head(
        ResponseHead(200, [("content-type", "text/plain"), ("content-length", str(len(text)))])
    )
    await stream.send_data(text, end_stream=True)


async def grpc_service(stream: DownstreamStream) -> None:
    """/t.S/Echo echoes; /t.S/Count streams N messages; /t.S/Missing is trailers-only NOT_FOUND."""
    request = grpc_messages(await stream.body.read_all(1 << 20))
    method = stream.head.path
    if method == "/t.S/Missing":
        await stream.send_head(
            ResponseHead(
                200, [("content-type", "application/grpc"), ("grpc-status", "5"), ("grpc-message", "nope")]
            ),
            end_stream=True,
        )
        return
    await stream.send_head(ResponseHead(200, [("content-type", "application/grpc")]))
    if method == "/t.S/Echo":
        await stream.send_data(grpc_frame(request[0]))
    else:
        for i in range(int(request[0])):
            await stream.send_data(grpc_frame(b"msg-%d" % i))
    await stream.send_trailers([("grpc-status", "0")])


# -- independent clients -------------------------------------------------------- #


@pytest.mark.interop
async def test_curl_prior_knowledge_get_and_post() -> None:
    async with serve(hello) as srv:
        url = f"http://127.0.0.1:{srv.port}/a/b?c=d"
        rc, out, err = await run("curl", "-sS", "--http2-prior-knowledge", url)
        assert rc == 0, err
        assert out == f"hello GET /a/b?c=d 127.0.0.1:{srv.port}\n".encode()
        rc, out, err = await run(
            "curl", "-sS", "--http2-prior-knowledge", "--data-binary", "@-", url, stdin=b"x" * 100_000
        )
        assert rc == 0, err
        assert out.startswith(b"hello POST /a/b?c=d")


@pytest.mark.interop
async def test_nghttp_verbose_exchange() -> None:
    async with serve(hello) as srv:
        rc, out, err = await run("nghttp", "-v", "--no-dep", f"http://127.0.0.1:{srv.port}/x")
        assert rc == 0, err
        text = out.decode()
        assert "hello GET /x" in text
        assert ":status: 200" in text
        assert "SETTINGS_INITIAL_WINDOW_SIZE" in text


@pytest.mark.interop
async def test_h2load_many_multiplexed_requests() -> None:
    async with serve(hello) as srv:
        rc, out, err = await run(
            "h2load", "-n", "1000", "-c", "4", "-m", "10", f"http://127.0.0.1:{srv.port}/", timeout=30
        )
        assert rc == 0, err
        text = out.decode()
        assert "1000 succeeded, 0 failed, 0 errored" in text, text
        assert "status codes: 1000 2xx" in text, text


@pytest.mark.interop
async def test_grpcio_unary_streaming_and_trailers_only() -> None:
    async with serve(grpc_service) as srv:

        def call() -> tuple[bytes, list[bytes], grpc.StatusCode]:
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
                echo = channel.unary_unary("/t.S/Echo")(b"ping", timeout=5)
                count = list(channel.unary_stream("/t.S/Count")(b"5", timeout=5))
                try:
                    channel.unary_unary("/t.S/Missing")(b"", timeout=5)
                except grpc.RpcError as exc:
                    return echo, count, exc.code()
                raise AssertionError("trailers-only NOT_FOUND was not surfaced")

        echo, count, missing = await asyncio.to_thread(call)
        assert echo == b"ping"
        assert count == [b"msg-%d" % i for i in range(5)]
        assert missing == grpc.StatusCode.NOT_FOUND


@pytest.mark.interop
async def test_large_upload_to_slow_reader_is_bounded_by_flow_control() -> None:
    window = 256 * 1024
    settings = CodecSettings(initial_stream_window_size=window, initial_connection_window_size=window)
    peak = 0
    total = 0

    async def slow_reader(stream: DownstreamStream) -> None:
        nonlocal peak, total
        while chunk := await stream.body.read():
            total += len(chunk)
            peak = max(peak, stream.body.buffered + len(chunk))
            await asyncio.sleep(0.0005)
        await stream.send_head(ResponseHead(200, [("content-length", "2")]))
        await stream.send_data(b"ok", end_stream=True)

    async with serve(slow_reader, settings) as srv:
        rc, out, err = await run(
            "curl",
            "-sS",
            "--http2-prior-knowledge",
            "--data-binary",
            "@-",
            f"http://127.0.0.1:{srv.port}/up",
            stdin=b"u" * (20 * 1024 * 1024),
            timeout=30,
        )
        assert rc == 0, err
        assert out == b"ok"
    assert total == 20 * 1024 * 1024
    assert peak <= window


@pytest.mark.interop
async def test_large_download_to_slow_client_waits_for_window() -> None:
    size = 20 * 1024 * 1024
    peak_write_buffer = 0

    async def big(stream: DownstreamStream) -> None:
        nonlocal peak_write_buffer
        await stream.send_head(ResponseHead(200, [("content-length", str(size))]))
        chunk = b"d" * 65536
        proto = srv.protocols[0]
        for i in range(size // len(chunk)):
            await stream.send_data(chunk, end_stream=i == size // len(chunk) - 1)
            assert proto._transport is not None
            peak_write_buffer = max(peak_write_buffer, proto._transport.get_write_buffer_size())

    async with serve(big) as srv:
        # The rate limit keeps the client slower than the server.
        rc, out, err = await run(
            "curl",
            "-sS",
            "--http2-prior-knowledge",
            "--limit-rate",
            "40M",
            f"http://127.0.0.1:{srv.port}/down",
            timeout=30,
        )
        assert rc == 0, err
        assert len(out) == size
    assert peak_write_buffer <= 1024 * 1024


# -- raw clients for the protocol edges ------------------------------------------ #


class RawClient:
    """A blocking h2 client on a real socket (used from a thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def send(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def events(self) -> list[h2.events.Event]:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError
        out = self.conn.receive_data(data)
        self.send()
        return out

    def request(
        self, sid: int, path: str = "/", end: bool = True, extra: list[tuple[str, str]] | None = None
    ) -> None:
        headers = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "t"),
            (":path", path),
            *(extra or []),
        ]
        self.conn.send_headers(sid, headers, end_stream=end)

    def until(self, kind: type[h2.events.Event]) -> list[h2.events.Event]:
        """The events received up to and including the first of ``kind``."""
        seen: list[h2.events.Event] = []
        while not any(isinstance(e, kind) for e in seen):
            seen.extend(self.events())
        return seen

    def send_until(self, kind: type[h2.events.Event]) -> list[h2.events.Event]:
        """Send what is queued, then ``until(kind)``."""
        self.send()
        return self.until(kind)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_frames_until_close(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def goaway_code(data: bytes) -> int | None:
    """The error code of the first GOAWAY frame in a server byte stream."""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        ftype = data[pos + 3]
        if ftype == GoAwayFrame.type:
            return int.from_bytes(data[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return None


async def test_client_reset_stops_the_handler() -> None:
    """A client RST_STREAM aborts the request body and cancels the handler:
    the handler sees the reset (StreamReset while reading) or its
    cancellation, and never gets to send a response."""
    running = threading.Event()
    seen: asyncio.Queue[BaseException] = asyncio.Queue()
    sent: list[int] = []

    async def waits_for_body(stream: DownstreamStream) -> None:
        running.set()
        try:
            await stream.body.read_all(1 << 20)
            await stream.send_head(ResponseHead(200))
            sent.append(200)
        except (StreamReset, asyncio.CancelledError) as exc:
            seen.put_nowait(exc)
            raise

    async with serve(waits_for_body) as srv:

        def client() -> RawClient:
            c = RawClient(srv.port)
            c.request(1, end=False)
            c.send()
            assert running.wait(5), "the handler never started"
            c.conn.reset_stream(1, 0x8)  # CANCEL
            c.send()
            return c

        # The socket stays open until the handler saw the reset, so the
        # connection's loss cannot overtake the RST_STREAM.
        c = await asyncio.to_thread(client)
        try:
            stopped = await asyncio.wait_for(seen.get(), 5)
        finally:
            c.close()
    assert isinstance(stopped, asyncio.CancelledError) or (
        isinstance(stopped, StreamReset) and stopped.code == "CANCEL"
    )
    assert sent == []


async def test_streams_beyond_max_concurrent_are_refused() -> None:
    release = asyncio.Event()

    async def parked(stream: DownstreamStream) -> None:
        await release.wait()
        await stream.send_head(ResponseHead(204), end_stream=True)

    async with serve(parked, CodecSettings(max_concurrent_streams=2)) as srv:

        def client() -> list[h2.events.Event]:
            with RawClient(srv.port) as c:
                # Sent before the server's SETTINGS arrive, as a racing client would.
                for sid in (1, 3, 5):
                    c.request(sid)
                return c.send_until(h2.events.StreamReset)

        events = await asyncio.to_thread(client)
        resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
        assert [(e.stream_id, e.error_code) for e in resets] == [(5, h2.errors.ErrorCodes.REFUSED_STREAM)]
        settings = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
        assert settings[0].changed_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 2
        release.set()


async def test_drain_sends_goaway_and_finishes_open_streams() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def parked(stream: DownstreamStream) -> None:
        started.set()
        await release.wait()
        await stream.send_head(ResponseHead(200, [("content-length", "4")]))
        await stream.send_data(b"done", end_stream=True)

    async with serve(parked) as srv:
        c = await asyncio.to_thread(RawClient, srv.port)
        try:
            await asyncio.to_thread(lambda: (c.request(1), c.send()))
            await asyncio.wait_for(started.wait(), 5)
            proto = srv.protocols[0]
            proto.drain()
            goaway = await asyncio.to_thread(c.until, h2.events.ConnectionTerminated)
            term = next(e for e in goaway if isinstance(e, h2.events.ConnectionTerminated))
            assert term.last_stream_id == 1 and term.error_code == 0
            release.set()
            # h2 (as a client) refuses frames after GOAWAY, so read the rest raw.
            rest = await asyncio.to_thread(read_frames_until_close, c.sock)
            assert b"done" in rest
            await proto.wait_closed(5)
            assert proto.active_streams == 0
        finally:
            c.close()


async def test_oversized_header_block_gets_431() -> None:
    async with serve(hello, CodecSettings(max_request_headers_kb=1)) as srv:

        def client() -> list[h2.events.Event]:
            with RawClient(srv.port) as c:
                c.request(1, extra=[("x-big", "v" * 1500)])
                return c.send_until(h2.events.StreamEnded)

        events = await asyncio.to_thread(client)
        response = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
        assert (b":status", b"431") in response.headers
        assert srv.local_replies == [431]


async def test_hpack_bomb_beyond_decoder_bound_is_goaway() -> None:
    async with serve(hello, CodecSettings(max_request_headers_kb=1)) as srv:

        def client() -> bytes:
            with RawClient(srv.port) as c:
                c.request(1, extra=[(f"x-{i}", "v" * 1000) for i in range(80)])
                c.send()
                return read_frames_until_close(c.sock)

        data = await asyncio.to_thread(client)
        assert goaway_code(data) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        # DATA on stream 0
        (b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", h2.errors.ErrorCodes.PROTOCOL_ERROR),
        # SETTINGS with a length that is not a multiple of 6
        (b"\x00\x00\x05\x04\x00\x00\x00\x00\x00hello", h2.errors.ErrorCodes.FRAME_SIZE_ERROR),
        # WINDOW_UPDATE with a zero increment on the connection
        (b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00", h2.errors.ErrorCodes.PROTOCOL_ERROR),
        # PING of 4 bytes instead of 8
        (b"\x00\x00\x04\x06\x00\x00\x00\x00\x00abcd", h2.errors.ErrorCodes.FRAME_SIZE_ERROR),
        # HEADERS whose block is not valid HPACK (index 0x7f.. beyond any table)
        (b"\x00\x00\x02\x01\x05\x00\x00\x00\x01\xff\xff", h2.errors.ErrorCodes.COMPRESSION_ERROR),
        # DATA larger than the 16 KiB SETTINGS_MAX_FRAME_SIZE
        (b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + b"x" * 16385, h2.errors.ErrorCodes.FRAME_SIZE_ERROR),
        # DATA on a stream that was never opened
        (b"\x00\x00\x01\x00\x00\x00\x00\x00\x03x", h2.errors.ErrorCodes.PROTOCOL_ERROR),
    ],
)
async def test_malformed_frames_get_goaway_and_close(frame: bytes, code: int) -> None:
    async with serve(hello) as srv:

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                sock.sendall(PREFACE + SettingsFrame(0).serialize() + frame)
                return read_frames_until_close(sock)

        data = await asyncio.to_thread(client)
        assert goaway_code(data) == code
        # The server survives and serves the next connection.
        rc, out, _ = await run("curl", "-sS", "--http2-prior-knowledge", f"http://127.0.0.1:{srv.port}/")
        assert rc == 0 and out.startswith(b"hello GET")


async def test_garbage_instead_of_preface_closes_connection() -> None:
    async with serve(hello) as srv:

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                return read_frames_until_close(sock)

        data = await asyncio.to_thread(client)
        assert goaway_code(data) == h2.errors.ErrorCodes.PROTOCOL_ERROR


async def test_handler_exception_becomes_500_or_reset() -> None:
    async def broken(stream: DownstreamStream) -> None:
        if stream.head.path == "/late":
            await stream.send_head(ResponseHead(200))
        raise RuntimeError("boom")

    async with serve(broken) as srv:

        def client() -> list[h2.events.Event]:
            with RawClient(srv.port) as c:
                c.request(1, "/early")
                c.request(3, "/late")
                return c.send_until(h2.events.StreamReset)

        events = await asyncio.to_thread(client)
        early = next(e for e in events if isinstance(e, h2.events.ResponseReceived) and e.stream_id == 1)
        assert (b":status", b"500") in early.headers
        reset = next(e for e in events if isinstance(e, h2.events.StreamReset))
        assert reset.stream_id == 3 and reset.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR


async def test_idle_connection_gets_goaway() -> None:
    async with serve(hello, CodecSettings(idle_timeout=0.2)) as srv:

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                sock.sendall(PREFACE + SettingsFrame(0).serialize())
                return read_frames_until_close(sock)

        data = await asyncio.to_thread(client)
        assert goaway_code(data) == h2.errors.ErrorCodes.NO_ERROR


async def test_response_strips_connection_specific_headers_and_sends_trailers() -> None:
    async def h1_style(stream: DownstreamStream) -> None:
        hop = [("connection", "keep-alive"), ("keep-alive", "timeout=5"), ("transfer-encoding", "chunked")]
        await stream.send_head(ResponseHead(200, [*hop, ("x-kept", "1")]))
        await stream.send_data(b"body")
        await stream.send_trailers([("x-trailer", "t")])

    async with serve(h1_style) as srv:

        def client() -> list[h2.events.Event]:
            with RawClient(srv.port) as c:
                c.request(1)
                return c.send_until(h2.events.StreamEnded)

        events = await asyncio.to_thread(client)
        response = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
        names = {n for n, _ in response.headers}
        assert b"x-kept" in names and not names & {b"connection", b"keep-alive", b"transfer-encoding"}
        trailers = next(e for e in events if isinstance(e, h2.events.TrailersReceived))
        assert trailers.headers == [(b"x-trailer", b"t")]


async def test_request_pseudo_headers_and_cookie_crumbs() -> None:
    heads: list[DownstreamStream] = []

    async def record(stream: DownstreamStream) -> None:
        heads.append(stream)
        await stream.send_head(ResponseHead(204), end_stream=True)

    async with serve(record) as srv:

        def client() -> None:
            with RawClient(srv.port) as c:
                c.request(1, "/p?q=1", extra=[("cookie", "a=1"), ("cookie", "b=2"), ("x-h", "v")])
                c.send_until(h2.events.StreamEnded)

        await asyncio.to_thread(client)
    head = heads[0].head
    assert (head.method, head.scheme, head.authority, head.path, head.version) == (
        "GET",
        "http",
        "t",
        "/p?q=1",
        "2",
    )
    assert head.get("cookie") == "a=1; b=2"
    assert head.get("x-h") == "v"


def test_rst_frame_helper_sanity() -> None:
    # Guards the raw-frame parser used above against a silent misparse.
    data = (
        SettingsFrame(0).serialize()
        + GoAwayFrame(0, error_code=7).serialize()
        + RstStreamFrame(1).serialize()
    )
    assert goaway_code(data) == 7


@pytest.mark.interop
def test_serves_under_uvloop() -> None:
    import uvloop

    async def scenario() -> None:
        async with serve(hello) as srv:
            urls = [f"http://127.0.0.1:{srv.port}/u{i}" for i in range(5)]
            # (curl 7.88 cannot reuse a prior-knowledge connection, even with nghttpd.)
            rc, out, err = await run("nghttp", *urls)
            assert rc == 0, err
            assert out.count(b"hello GET /u") == 5
            rc, out, err = await run(
                "h2load", "-n", "200", "-c", "2", "-m", "5", f"http://127.0.0.1:{srv.port}/"
            )
            assert rc == 0 and b"200 succeeded" in out, err

    uvloop.run(scenario())


_REQUEST_BLOCK = hpack.Encoder().encode(
    [(":method", "POST"), (":scheme", "http"), (":path", "/"), (":authority", "f")]
)

frame_strategy = st.tuples(
    st.integers(0, 10),  # frame type (0-9 defined, 10 unknown)
    st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x25, 0xFF]),  # flags
    st.sampled_from([0, 1, 3, 2, 0x7FFFFFFF]),  # stream id
    st.one_of(st.binary(max_size=40), st.just(_REQUEST_BLOCK)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frame_strategy, max_size=8))
def test_random_frames_never_escape_data_received(frames: list[tuple[int, int, int, bytes]]) -> None:
    async def feed() -> None:
        info = ConnectionInfo(peer=("127.0.0.1", 0), local=("127.0.0.1", 0))
        proto = H2ServerProtocol(hello, info, CodecSettings())
        transport = MemoryTransport()
        proto.connection_made(transport)
        data = PREFACE + SettingsFrame(0).serialize()
        for ftype, flags, sid, payload in frames:
            data += len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
        proto.data_received(data)  # must never raise, whatever the bytes
        await asyncio.sleep(0.001)  # handlers run; their sends must not raise out either
        client_goaway = any(ftype == GoAwayFrame.type for ftype, *_ in frames)
        if transport.closed and not client_goaway:
            assert goaway_code(bytes(transport.out)) is not None
        proto.connection_lost(None)
        await asyncio.sleep(0)

    asyncio.run(feed())


async def test_rapid_reset_gets_enhance_your_calm() -> None:
    async def parked(stream: DownstreamStream) -> None:
        await stream.body.read_all(1 << 20)
        await stream.send_head(ResponseHead(204), end_stream=True)

    async with serve(parked) as srv:

        def client() -> bytes:
            with RawClient(srv.port) as c:
                for sid in range(1, 2 * 600, 2):
                    c.request(sid, end=False)
                    c.conn.reset_stream(sid, 0x8)
                c.send()
                return read_frames_until_close(c.sock)

        data = await asyncio.to_thread(client)
        assert goaway_code(data) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_ping_flood_from_a_peer_that_does_not_read_is_cut_off() -> None:
    info = ConnectionInfo(peer=("127.0.0.1", 0), local=("127.0.0.1", 0))
    proto = H2ServerProtocol(hello, info, CodecSettings())
    proto.paused_reply_limit = 64 * 1024
    transport = MemoryTransport()
    proto.connection_made(transport)
    proto.data_received(PREFACE + SettingsFrame(0).serialize())
    proto.pause_writing()  # the peer stopped reading
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    for _ in range(10):
        proto.data_received(ping * 250)  # 250 PING ACKs (4250 bytes) owed per call
    assert not transport.closed  # 42 500 bytes held: within the bound
    for _ in range(20):
        proto.data_received(ping * 250)
        if transport.closed:
            break
    assert transport.closed
    proto.connection_lost(None)


async def test_client_reset_cancels_the_handler_task_at_once() -> None:
    """A client RST_STREAM cancels the stream's handler even while it waits on
    something other than the stream (an upstream), so the upstream request is
    abandoned immediately, not at the handler's next send."""

    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def waits_on_upstream(stream: DownstreamStream) -> None:
        started.set()
        try:
            await asyncio.sleep(30)  # stands for a slow upstream
        except asyncio.CancelledError:
            cancelled.set()
            raise

    loop = asyncio.get_running_loop()
    info = ConnectionInfo(peer=("127.0.0.1", 0), local=("127.0.0.1", 0))
    server = await loop.create_server(
        lambda: H2ServerProtocol(waits_on_upstream, info, CodecSettings()), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    client = H2ClientConnection()
    try:
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        await client.wait_connected(5)
        head = RequestHead("GET", "http", "test", "/slow", [], "2")
        request = asyncio.ensure_future(client.request(head, None))
        await asyncio.wait_for(started.wait(), 5)
        request.cancel()  # the client codec sends RST_STREAM(CANCEL)
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await asyncio.wait_for(cancelled.wait(), 5)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
