"""HTTP/2 downstream codec: one ``H2ServerProtocol`` per client connection.

Each request stream becomes an ``H2ServerStream`` (a ``DownstreamStream``)
handed to the connection manager's handler in its own task once the request
headers are complete. Request bodies stream into a ``BodyStream`` and are
acknowledged (WINDOW_UPDATE) only as the handler reads them, so a slow
upstream throttles the client; responses are sent within the client's
flow-control windows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from h2.config import H2Configuration
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    TrailersReceived,
    WindowUpdated,
)
from h2.events import StreamReset as H2StreamReset
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from meshlet.proxy.http.h2_common import (
    DEFAULT_STALL_TIMEOUT,
    H2Endpoint,
    H2StreamState,
    MeshletH2Connection,
    decode_fields,
    error_name,
    h2_fields,
)
from meshlet.proxy.http.stream import (
    BodyStream,
    CodecSettings,
    DownstreamStream,
    Headers,
    RequestHead,
    ResponseHead,
    StreamReset,
)
from meshlet.proxy.transport import ConnectionInfo

log = logging.getLogger(__name__)

DownstreamHandler = Callable[[DownstreamStream], Awaitable[None]]


# Envoy's rule against CVE-2023-44487 ("rapid reset"): once a connection has
# opened this many streams, it is closed if the client reset at least half of
# them within _PREMATURE_RESET_WINDOW seconds of opening them.
_RAPID_RESET_MIN_STREAMS = 500
_PREMATURE_RESET_WINDOW = 1.0


class H2ServerStream:
    """One request stream; implements ``DownstreamStream``."""

    __slots__ = (
        "_ended",
        "_head_sent",
        "_proto",
        "_state",
        "body",
        "head",
        "info",
        "opened_at",
        "request_ended",
        "task",
    )

    def __init__(
        self, proto: H2ServerProtocol, state: H2StreamState, head: RequestHead, opened_at: float
    ) -> None:
        self._proto = proto
        self.opened_at = opened_at
        self._state = state
        self.head = head
        self.body = state.body
        self.info = proto.info
        self._head_sent = False
        self._ended = False
        self.request_ended = False
        # The handler's task: a client RST_STREAM cancels it, which abandons
        # the upstream request at once instead of at the handler's next send.
        self.task: asyncio.Task[None] | None = None

    @property
    def stream_id(self) -> int:
        return self._state.stream_id

    @property
    def head_sent(self) -> bool:
        return self._head_sent

    @property
    def response_ended(self) -> bool:
        return self._ended

    @property
    def error(self) -> StreamReset | None:
        return self._state.error

    async def send_head(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        if self._head_sent:
            raise RuntimeError("response head already sent")
        fields = [(":status", str(head.status)), *h2_fields(head.headers)]
        if head.status >= 200:
            self._head_sent = True
        self._proto.send_headers(self._state, fields, end_stream)
        if end_stream:
            self._ended = True
        await self._proto.wait_writable(self._state)

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        if not self._head_sent:
            raise RuntimeError("send_head must come before send_data")
        if self._ended:
            raise RuntimeError("response already ended")
        if end_stream:
            self._ended = True
        await self._proto.send_body(self._state, data, end_stream)

    async def send_trailers(self, trailers: Headers) -> None:
        if not self._head_sent:
            raise RuntimeError("send_head must come before send_trailers")
        if self._ended:
            raise RuntimeError("response already ended")
        self._ended = True
        fields = h2_fields(trailers)
        if not fields:
            await self._proto.send_body(self._state, b"", True)
            return
        self._proto.send_headers(self._state, fields, True)
        await self._proto.wait_writable(self._state)

    def reset(self, code: str = "INTERNAL_ERROR") -> None:
        self._proto.reset_stream(self._state, StreamReset(code, "reset by the proxy", local=True))


class H2ServerProtocol(H2Endpoint):
    """asyncio protocol serving HTTP/2 (prior knowledge or ALPN "h2")."""

    # Bytes of replies to the peer's frames held while the peer does not read.
    paused_reply_limit = 1024 * 1024

    def __init__(
        self,
        handler: DownstreamHandler,
        info: ConnectionInfo,
        settings: CodecSettings,
        *,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        self.info = info
        self.settings = settings
        self._handler = handler
        self._header_limit = settings.max_request_headers_kb * 1024
        config = H2Configuration(client_side=False, header_encoding=None)
        conn = MeshletH2Connection(
            config,
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_stream_window_size,
                SettingCodes.MAX_HEADER_LIST_SIZE: self._header_limit,
            },
        )
        # Blocks up to twice the limit are decoded and answered with 431;
        # beyond that the decoder gives up, which breaks the connection's
        # HPACK state, so that is a connection error (ENHANCE_YOUR_CALM).
        conn.decoder.max_header_list_size = 2 * self._header_limit + 64 * 1024
        super().__init__(conn, stall_timeout)
        self._streams: dict[int, H2ServerStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._draining = False
        self._last_stream_id: int | None = None  # set once we sent GOAWAY
        self._closed_future: asyncio.Future[None] | None = None
        # Abuse accounting (CVE-2023-44487 rapid reset; control-frame floods).
        self._streams_opened = 0
        self._premature_resets = 0
        self._replies_while_paused = 0

    # -- public ------------------------------------------------------------ #

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY naming the last stream we accept, let the
        open streams finish, then close."""
        if self._draining or self._closed:
            return
        self._draining = True
        self._send_goaway(ErrorCodes.NO_ERROR)
        self._close_if_done()

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until the connection is closed; on timeout it is closed now."""
        if self._closed or self._closed_future is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._closed_future)
        except TimeoutError:
            self.close()

    def close(self) -> None:
        """Close now: open streams fail with CONNECTION_RESET."""
        if self._transport is not None and not self._closed:
            if self._last_stream_id is None:
                self._send_goaway(ErrorCodes.NO_ERROR)
            self.close_transport()
        self._fail_all(StreamReset("CONNECTION_RESET", "connection closed by the proxy", local=True))

    # -- asyncio.Protocol -------------------------------------------------- #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self._loop is not None
        self._closed_future = self._loop.create_future()
        self.send_preface(self.settings.initial_connection_window_size)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._transport is None or self._transport.is_closing():
            return
        try:
            events = self._conn.receive_data(data)
        except ProtocolError as exc:
            # h2 queues a GOAWAY carrying the error's code, except for a bad
            # connection preface, which it rejects before any frame state.
            if self._conn.state_machine.state != ConnectionState.CLOSED:
                self._conn.send_goaway(0, int(exc.error_code))
            self._abort_connection(exc.error_code, str(exc))
            return
        try:
            for event in events:
                self._dispatch(event)
        except Exception as exc:
            log.exception("HTTP/2 connection %s: internal error", self.info.connection_id)
            self._send_goaway(ErrorCodes.INTERNAL_ERROR)
            self._abort_connection(ErrorCodes.INTERNAL_ERROR, str(exc))
            return
        opened = self._streams_opened
        if opened >= _RAPID_RESET_MIN_STREAMS and 2 * self._premature_resets >= opened:
            self._calm_down("too many streams reset before their response")
            return
        self._flush_replies()

    def _flush_replies(self) -> None:
        """Write what the input caused (mostly control-frame replies: PING and
        SETTINGS acks, RST_STREAM). A peer that floods while not reading would
        make them pile up in the transport: past a bound, it is cut off."""
        data = self._conn.data_to_send()
        if not data or self._transport is None:
            return
        if self._writable is not None:
            self._replies_while_paused += len(data)
            if self._replies_while_paused > self.paused_reply_limit:
                self._calm_down("peer sends control frames but does not read")
                return
        self._transport.write(data)

    def resume_writing(self) -> None:
        self._replies_while_paused = 0
        super().resume_writing()

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _calm_down(self, why: str) -> None:
        """Abusive peer (rapid reset, control-frame flood): GOAWAY ENHANCE_YOUR_CALM, close."""
        self._conn.clear_outbound_data_buffer()
        self._send_goaway(ErrorCodes.ENHANCE_YOUR_CALM)
        self._fail_all(StreamReset("ENHANCE_YOUR_CALM", why, local=True))
        self.close_transport(abort=self._writable is not None)

    def eof_received(self) -> bool | None:
        return None  # close our side as well

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_idle_timer()
        self._fail_all(StreamReset("CONNECTION_RESET", "client connection lost"))
        if self._closed_future is not None and not self._closed_future.done():
            self._closed_future.set_result(None)

    # -- events ------------------------------------------------------------ #

    def _dispatch(self, event: object) -> None:
        if isinstance(event, DataReceived):
            self._on_data(event)
        elif isinstance(event, RequestReceived):
            self._on_request(event)
        elif isinstance(event, StreamEnded):
            self._on_request_end(event.stream_id, None)
        elif isinstance(event, TrailersReceived):
            self._on_request_end(event.stream_id, decode_fields(event.headers))
        elif isinstance(event, WindowUpdated):
            self.window_updated(event.stream_id)
        elif isinstance(event, H2StreamReset):
            self._on_reset(event)
        elif isinstance(event, RemoteSettingsChanged):
            self.wake_all_windows()  # the initial window or frame size may have grown
        elif isinstance(event, ConnectionTerminated):
            self._on_goaway(event)

    def _on_data(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.request_ended:
            # A stream we refused or already finished: give the window back.
            self.acknowledge(event.stream_id, event.flow_controlled_length)
            return
        stream._state.received(event.data, event.flow_controlled_length)

    def _on_request_end(self, stream_id: int, trailers: Headers | None) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.request_ended:
            return
        stream.request_ended = True
        stream.body.end(trailers)

    def _on_reset(self, event: H2StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if event.remote_reset and self._now() - stream.opened_at < _PREMATURE_RESET_WINDOW:
            self._premature_resets += 1
        code = error_name(event.error_code)
        stream._state.fail(StreamReset(code, "stream reset by the client", local=not event.remote_reset))
        stream._state.release()
        self.wake_window(event.stream_id)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        if event.error_code != ErrorCodes.NO_ERROR:
            self._abort_connection(event.error_code, "GOAWAY from the client", send_goaway=False)
            return
        # The client opens no more streams; finish the open ones, then close.
        self._draining = True
        self._close_if_done()

    # -- requests ------------------------------------------------------------ #

    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        if self._refuses_new_streams(sid):
            self._conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        head, size = self._request_head(event.headers)
        if size > self._header_limit:
            self._local_reply(sid, 431, "request header block too large", event.stream_ended)
            return
        if head.method == "CONNECT":
            self._local_reply(sid, 501, "CONNECT is not supported over HTTP/2", event.stream_ended)
            return
        body = BodyStream(high_water=self.settings.buffer_limit)
        stream = H2ServerStream(self, H2StreamState(self, sid, body), head, self._now())
        self._streams[sid] = stream
        self._streams_opened += 1
        if event.stream_ended:
            stream.request_ended = True
            body.end()
        self._cancel_idle_timer()
        assert self._loop is not None
        task = self._loop.create_task(self._run(stream))
        stream.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuses_new_streams(self, stream_id: int) -> bool:
        if self._last_stream_id is not None and stream_id > self._last_stream_id:
            return True
        return len(self._streams) >= self.settings.max_concurrent_streams

    def _request_head(self, raw: list[tuple[bytes, bytes]]) -> tuple[RequestHead, int]:
        """The request head and the header block's size (names + values)."""
        method = path = authority = protocol = ""
        scheme = self.settings.scheme
        host = ""
        headers: Headers = []
        size = 0
        for name, value in raw:
            size += len(name) + len(value)
            if name[:1] == b":":
                text = value.decode("latin-1")
                if name == b":method":
                    method = text
                elif name == b":path":
                    path = text
                elif name == b":authority":
                    authority = text
                elif name == b":scheme":
                    scheme = text
                elif name == b":protocol":
                    protocol = text
                continue
            key = name.decode("latin-1")
            if key == "host":
                host = value.decode("latin-1")
                continue
            headers.append((key, value.decode("latin-1")))
        head = RequestHead(method, scheme, authority or host, path, headers, "2", protocol)
        return head, size

    def _local_reply(self, stream_id: int, status: int, text: str, request_ended: bool) -> None:
        body = f"{text}\n".encode()
        fields = [
            (":status", str(status)),
            ("content-type", "text/plain"),
            ("content-length", str(len(body))),
            ("server", self.settings.server_name),
        ]
        conn = self._conn
        fits = conn.local_flow_control_window(stream_id) >= len(body)
        conn.send_headers(stream_id, fields, end_stream=not fits)
        if fits:
            conn.send_data(stream_id, body, end_stream=True)
        if not request_ended:
            # RFC 9113 §8.1: the response is complete; stop the upload without error.
            conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        if self.settings.on_local_reply is not None:
            self.settings.on_local_reply(status, text)

    async def _run(self, stream: H2ServerStream) -> None:
        try:
            await self._handler(stream)
        except StreamReset:
            pass  # the stream or connection is gone; nothing left to answer
        except Exception:
            log.exception("HTTP/2 stream handler failed (connection %s)", self.info.connection_id)
            self._answer_failure(stream)
        finally:
            self._finish(stream)

    def _answer_failure(self, stream: H2ServerStream) -> None:
        state = stream._state
        if state.error is not None:
            return
        if stream.head_sent:
            self.reset_stream(state, StreamReset("INTERNAL_ERROR", "handler failed", local=True))
            return
        fields = [(":status", "500"), ("content-length", "0"), ("server", self.settings.server_name)]
        stream._head_sent = stream._ended = True
        try:
            self.send_headers(state, fields, True)
        except StreamReset:
            return  # the stream is reset instead
        if self.settings.on_local_reply is not None:
            self.settings.on_local_reply(500, "handler failed")

    def _finish(self, stream: H2ServerStream) -> None:
        state = stream._state
        if state.error is None and not self._closed:
            if not stream.response_ended:
                unfinished = StreamReset("INTERNAL_ERROR", "response left unfinished", local=True)
                self.reset_stream(state, unfinished)
            elif not stream.request_ended:
                self.reset_stream(state, StreamReset("NO_ERROR", "response complete", local=True))
        state.release()
        self._streams.pop(state.stream_id, None)
        if not self._streams:
            self._close_if_done()
            self._arm_idle_timer()

    # -- sending ------------------------------------------------------------- #

    def send_headers(self, state: H2StreamState, fields: list[tuple[str, str]], end_stream: bool) -> None:
        self._check_sendable(state)
        try:
            self._conn.send_headers(state.stream_id, fields, end_stream=end_stream)
        except ProtocolError as exc:
            error = StreamReset("INTERNAL_ERROR", f"cannot send headers: {exc}", local=True)
            self.reset_stream(state, error)
            raise error from exc
        self.schedule_flush()

    async def wait_writable(self, state: H2StreamState) -> None:
        await self._wait_writable(state)

    # -- connection lifecycle ------------------------------------------------ #

    def _send_goaway(self, code: ErrorCodes) -> None:
        if self._last_stream_id is None:
            self._last_stream_id = self._conn.highest_inbound_stream_id
        self._conn.send_goaway(self._last_stream_id, int(code))
        self.flush()

    def _close_if_done(self) -> None:
        if self._draining and not self._streams and self._transport is not None and not self._closed:
            if self._last_stream_id is None:
                self._send_goaway(ErrorCodes.NO_ERROR)
            self.flush()
            self.close_transport()

    def _abort_connection(self, code: int, why: str, *, send_goaway: bool = True) -> None:
        """A connection error: flush the GOAWAY (queued by h2 or here) and close."""
        if send_goaway:
            self.flush()
        self._fail_all(StreamReset(error_name(code), why, local=send_goaway))
        if self._transport is not None and not self._closed:
            self.close_transport()

    def _fail_all(self, error: StreamReset) -> None:
        for stream in list(self._streams.values()):
            stream._state.fail(error)
        self.wake_all_windows()

    def _arm_idle_timer(self) -> None:
        timeout = self.settings.idle_timeout
        if timeout is None or self._closed or self._loop is None or self._idle_timer is not None:
            return
        self._idle_timer = self._loop.call_later(timeout, self._on_idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _on_idle(self) -> None:
        self._idle_timer = None
        if not self._streams:
            self._draining = True
            self._close_if_done()
