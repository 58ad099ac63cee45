"""HTTP/1.1 downstream codec: an asyncio protocol over httptools (llhttp).

``H1ServerProtocol`` parses requests as bytes arrive and hands each one to the
connection manager's handler as an ``H1ServerStream`` (a ``DownstreamStream``)
as soon as its head is parsed; the body keeps streaming into the stream's
``BodyStream``. Pipelined requests are parsed ahead (up to a bound) but
dispatched one at a time, so responses leave in request order.

The codec answers on its own only for what it alone can judge: malformed
requests (400), oversized heads (431), slow heads (408), and a handler that
failed before responding (500). Each of those closes the connection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import cast

import httptools

from meshlet.proxy.http.h1_common import (
    CRLF,
    HOP_BY_HOP,
    LAST_CHUNK,
    MAX_HEADERS_COUNT,
    BadMessage,
    HeadTooLarge,
    ParsedRequest,
    build_request_head,
    chunk_prefix,
    connection_tokens,
    decode_fields,
    last_chunk,
    reason_phrase,
    response_has_no_body,
    serialize_head,
)
from meshlet.proxy.http.h1_flow import H1WriteFlow
from meshlet.proxy.http.stream import (
    BodyStream,
    CodecSettings,
    DownstreamStream,
    Headers,
    ResponseHead,
    StreamReset,
)
from meshlet.proxy.transport import ConnectionInfo

Handler = Callable[[DownstreamStream], Awaitable[None]]

# Parsed requests allowed to wait behind the one being answered before
# reading pauses.
MAX_PIPELINED = 16
# llhttp cannot stop mid-buffer, so input is parsed in slices of this size:
# a burst of tiny pipelined requests overshoots MAX_PIPELINED by at most one
# slice's worth.
FEED_SLICE = 8 * 1024
# After a response that ends the connection, how long input is still read
# (and dropped) before closing; see _close_after_response.
LINGER_TIMEOUT = 2.0
# Ceiling on the write buffer before send_* start waiting for the client.
WRITE_HIGH_WATER = 256 * 1024

# Response framings.
_NO_BODY = 0
_LENGTH = 1
_CHUNKED = 2
_UNTIL_CLOSE = 3
_TUNNEL = 4

# Why reading is paused (bit mask: reading resumes only when all are clear).
_PAUSE_BODY = 1
_PAUSE_PIPELINE = 2
_PAUSE_HALTED = 4

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

class H1ServerStream:
    """One request/response exchange on an HTTP/1.1 connection."""

    __slots__ = (
        "_conn",
        "_dispatched",
        "_done",
        "_expect_continue",
        "_framing",
        "_head_sent",
        "_held",
        "_keep_alive",
        "_pressured",
        "_raw_body_left",
        "_remaining",
        "_request_done",
        "_tunnel_request",
        "body",
        "head",
        "info",
    )

    def __init__(self, conn: H1ServerProtocol, parsed: ParsedRequest, body_limit: int) -> None:
        self._conn = conn
        self.head = parsed.head
        self.info = conn.info
        self.body = BodyStream(body_limit, self._on_body_pressure)
        self._keep_alive = parsed.keep_alive
        self._expect_continue = parsed.expect_continue
        self._tunnel_request = parsed.tunnel
        self._raw_body_left = parsed.raw_body
        self._head_sent = False
        self._held: bytes | None = None
        self._dispatched = False
        self._done = False
        self._request_done = False
        self._pressured = False
        self._framing = _NO_BODY
        self._remaining = 0

    @property
    def head_sent(self) -> bool:
        return self._head_sent

    @property
    def done(self) -> bool:
        """True once the response is complete (or the exchange was reset)."""
        return self._done

    # -- DownstreamStream ------------------------------------------------- #

    async def send_head(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        conn = self._conn
        if self._head_sent or self._done:
            raise RuntimeError("response head already sent")
        if conn.closed:
            raise StreamReset("CONNECTION_RESET", "downstream connection closed")
        status = head.status
        if status < 200 and status != 101:
            conn.write(self._informational(head))
            return
        data = self._encode_head(head, end_stream)
        self._head_sent = True
        if end_stream:
            conn.write(data)
            if self._framing == _LENGTH and self._remaining:
                self._truncated("response ended before the content-length it declared")
            self._finish()
            return
        # Held until the first body bytes (or the end of this loop iteration)
        # so that head and body usually leave in one write: one syscall.
        self._held = data
        conn.flush_soon(self)

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        conn = self._conn
        if self._done:
            raise RuntimeError("response already complete")
        if conn.closed:
            raise StreamReset("CONNECTION_RESET", "downstream connection closed")
        framing = self._framing
        payload: tuple[bytes, ...]
        if framing == _LENGTH:
            self._count(len(data), end_stream)
            payload = (data,) if data else ()
        elif framing == _CHUNKED:
            if data:
                chunk = (chunk_prefix(len(data)), data, CRLF)
                payload = (*chunk, LAST_CHUNK) if end_stream else chunk
            else:
                payload = (LAST_CHUNK,) if end_stream else ()
        elif framing == _NO_BODY or not data:
            payload = ()
        else:
            payload = (data,)
        self._write(payload)
        if end_stream:
            self._finish()
        elif conn.write_paused:
            await conn.writable()

    async def send_trailers(self, trailers: Headers) -> None:
        conn = self._conn
        if self._done:
            raise RuntimeError("response already complete")
        if conn.closed:
            raise StreamReset("CONNECTION_RESET", "downstream connection closed")
        if self._framing == _CHUNKED:
            self._write((last_chunk(trailers),))
        else:
            if self._framing == _LENGTH and self._remaining:
                self._truncated("response body shorter than its content-length")
            # Other framings have nowhere to put trailers: they are dropped.
            self._write(())
        self._finish()

    def flush_held(self) -> None:
        """Write a held response head that no body bytes came to join."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._conn.closed:
                self._conn.write(held)

    def reset(self, code: str = "INTERNAL_ERROR") -> None:
        """HTTP/1.1 has no stream reset: the connection is closed instead."""
        if self._done:
            return
        self._done = True
        self.flush_held()  # the client then sees a head and a truncated body
        self._conn.stream_reset(self)

    # -- response framing ------------------------------------------------- #

    def _informational(self, head: ResponseHead) -> bytes:
        lines = [f"{k}: {v}\r\n" for k, v in head.headers if k not in HOP_BY_HOP]
        return serialize_head(f"HTTP/1.1 {head.status} {reason_phrase(head.status, head.reason)}\r\n", lines)

    def _encode_head(self, head: ResponseHead, end_stream: bool) -> bytes:
        status = head.status
        request = self.head
        tunnel = self._tunnel_request and (
            status == 101 if request.method != "CONNECT" else 200 <= status < 300
        )
        lines: list[str] = []
        content_length: str | None = None
        close_asked = False
        for k, v in head.headers:
            if k in HOP_BY_HOP:
                if tunnel and status == 101 and (k == "upgrade" or k == "connection"):
                    lines.append(f"{k}: {v}\r\n")
                elif k == "connection" and "close" in connection_tokens(v):
                    close_asked = True  # the handler wants this connection closed
                continue
            if k == "content-length":
                content_length = v
            lines.append(f"{k}: {v}\r\n")
        # A response that starts before its request is complete closes the
        # connection (the rest of the request is never read), so say so.
        keep_alive = (
            self._keep_alive
            and self._request_done
            and not close_asked
            and not self._conn.draining
            and not self._tunnel_request
        )
        if tunnel:
            self._framing = _TUNNEL
        elif response_has_no_body(status, request.method):
            self._framing = _NO_BODY
        elif content_length is not None:
            self._framing = _LENGTH
            self._remaining = _parse_length(content_length)
        elif end_stream:
            lines.append("content-length: 0\r\n")
            self._framing = _NO_BODY
        elif request.version == "1.1":
            lines.append("transfer-encoding: chunked\r\n")
            self._framing = _CHUNKED
        else:
            self._framing = _UNTIL_CLOSE
            keep_alive = False
        if not keep_alive:
            if not tunnel:
                lines.append("connection: close\r\n")
        elif request.version == "1.0":
            lines.append("connection: keep-alive\r\n")
        self._keep_alive = keep_alive
        return serialize_head(f"HTTP/1.1 {status} {reason_phrase(status, head.reason)}\r\n", lines)

    def _count(self, size: int, end_stream: bool) -> None:
        if size > self._remaining:
            self._truncated("response body longer than its content-length")
        self._remaining -= size
        if end_stream and self._remaining:
            self._truncated("response body shorter than its content-length")

    def _write(self, payload: tuple[bytes, ...]) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._conn.writelines((held, *payload))
        elif len(payload) == 1:
            self._conn.write(payload[0])
        elif payload:
            self._conn.writelines(payload)

    def _truncated(self, detail: str) -> None:
        self.reset()
        raise StreamReset("INTERNAL_ERROR", detail, local=True)

    def _finish(self) -> None:
        self._done = True
        self._conn.stream_finished(self)

    # -- request side ------------------------------------------------------ #

    def _on_body_pressure(self, pressured: bool) -> None:
        if pressured != self._pressured and not self._done:
            self._pressured = pressured
            self._conn.body_pressure(pressured)

    def release_body(self) -> None:
        """The exchange is over: its unread body must no longer hold reading paused."""
        self.body.on_pressure = None
        if self._pressured:
            self._pressured = False
            self._conn.body_pressure(False)


def _parse_length(value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"invalid content-length {value!r} in response")
    return int(value)


class H1ServerProtocol(H1WriteFlow):
    """Downstream HTTP/1.1 connection: parses requests, runs ``handler`` for
    each, writes the responses in order."""

    def __init__(
        self,
        handler: Handler,
        info: ConnectionInfo,
        settings: CodecSettings,
        *,
        max_pipelined: int = MAX_PIPELINED,
    ) -> None:
        super().__init__()
        self.info = info
        self._handler = handler
        self._settings = settings
        self._max_head = settings.max_request_headers_kb * 1024
        self._max_pipelined = max_pipelined
        self._parser = httptools.HttpRequestParser(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        # Parsed requests in arrival order; [0] is the one being answered.
        self._streams: deque[H1ServerStream] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        # The request whose body the parser is currently reading.
        self._parsing: H1ServerStream | None = None
        # The stream that owns the connection after an upgrade / CONNECT.
        self._tunnel: H1ServerStream | None = None
        # Per-head parse state.
        self._in_head = False
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._head_size = 0
        self._fields = 0
        self._raw_head_bytes = 0
        # Input parsed later because too many requests were already queued.
        self._backlog: bytes | None = None
        self._pending_error: tuple[int, str] | None = None
        self._dispatch_due = False
        self._pause_reasons = 0
        self._pressured_bodies = 0
        self._closed = False
        self._closing = False
        self._peer_eof = False
        self.draining = False
        # Deadlines (loop time) and the one timer that enforces them.
        self._head_deadline: float | None = None
        self._idle_deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._linger: asyncio.TimerHandle | None = None
        timeouts = [t for t in (settings.request_headers_timeout, settings.idle_timeout) if t]
        self._tick = min(timeouts) if timeouts else None

    # -- public ------------------------------------------------------------ #

    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def drain(self) -> None:
        """Graceful shutdown: the next response says ``Connection: close``;
        an idle connection closes now."""
        self.draining = True
        if not self._streams and not self._in_head:
            self.close()

    def close(self) -> None:
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.close()

    def _close_after_response(self, framed: bool = True) -> None:
        """Close once the written responses reach the client.

        Closing a socket that still has unread input makes the kernel send a
        RST, which can destroy the response before the client reads it (a 413
        or 400 answered before the body arrived). So: half-close our side,
        keep reading and dropping input until the client closes or
        LINGER_TIMEOUT passes, then close. Transports that cannot half-close
        (TLS) linger the same way when the last response is ``framed`` (its
        end is visible, the client closes on it); a response that ends only
        with the connection needs the close now.
        """
        transport = self._transport
        if transport is None or self._closing:
            return
        if transport.can_write_eof():
            transport.write_eof()
        elif not framed:
            self.close()
            return
        self._closing = True
        if self._pause_reasons:
            self._pause_reasons = 0
            transport.resume_reading()
        assert self._loop is not None
        self._linger = self._loop.call_later(LINGER_TIMEOUT, transport.close)

    # -- asyncio.Protocol -------------------------------------------------- #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self._transport = transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(high=min(self._settings.buffer_limit, WRITE_HIGH_WATER))
        self._go_idle()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._pause_reasons & _PAUSE_HALTED:
            return  # input after the last response (lingering close) is dropped
        if self._tunnel is not None:
            self._tunnel.body.feed(data)
        elif self._backlog is not None:
            self._backlog += data
        else:
            self._feed(data)

    def eof_received(self) -> bool | None:
        if self._closing:
            return False
        if self._tunnel is not None:
            self._tunnel.body.end()
            return True  # keep writing the upstream's side of the tunnel
        if self._parsing is not None or self._in_head or not self._streams:
            return False  # mid-request or idle: close (connection_lost aborts bodies)
        self._peer_eof = True
        return True  # finish the responses already owed, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._linger is not None:
            self._linger.cancel()
        tunnel = self._tunnel
        for stream in self._streams:
            if stream is tunnel and exc is None:
                stream.body.end()
            elif not stream.body.ended:
                stream.body.abort(StreamReset("CONNECTION_RESET", "downstream connection closed"))
        self._streams.clear()
        self._parsing = None
        self._fail_write_waiter(StreamReset("CONNECTION_RESET", "downstream connection closed"))

    # -- writing (used by H1ServerStream) ---------------------------------- #

    def write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        assert self._transport is not None
        self._transport.writelines(parts)

    def flush_soon(self, stream: H1ServerStream) -> None:
        assert self._loop is not None
        self._loop.call_soon(stream.flush_held)

    async def writable(self) -> None:
        """Wait until the client has drained the write buffer below its low mark."""
        if self._closed:
            raise StreamReset("CONNECTION_RESET", "downstream connection closed")
        try:
            await asyncio.wait_for(asyncio.shield(self._write_resumed()), self._settings.idle_timeout)
        except TimeoutError:
            self.close()
            raise StreamReset("CONNECTION_RESET", "client stopped reading the response", local=True) from None

    # -- stream lifecycle ---------------------------------------------------- #

    def stream_finished(self, stream: H1ServerStream) -> None:
        """The response to ``stream`` is complete: close, or move to the next request."""
        stream.release_body()
        if not self._streams or self._streams[0] is not stream:
            return
        self._streams.popleft()
        if self._closing or self._closed:
            return
        if not (stream._keep_alive and stream._request_done) or self.draining:
            # A request whose body was not read to its end leaves the parser
            # mid-message: the connection cannot carry another request.
            self._close_after_response(framed=stream._framing < _UNTIL_CLOSE)
            return
        if self._streams:
            self._dispatch(self._streams[0])
        elif self._pending_error is not None:
            self._local_reply(*self._pending_error)
            return
        elif self._peer_eof:
            self._close_after_response()
            return
        else:
            self._go_idle()
        if self._pause_reasons & _PAUSE_PIPELINE and len(self._streams) <= self._max_pipelined:
            self._resume(_PAUSE_PIPELINE)
            if self._backlog is not None:
                assert self._loop is not None
                self._loop.call_soon(self._parse_backlog)

    def stream_reset(self, stream: H1ServerStream) -> None:
        stream.release_body()
        self.close()

    def body_pressure(self, pressured: bool) -> None:
        # Counted: parsing ahead, a pipelined request's body can fill up
        # while an earlier one is still full.
        if pressured:
            self._pressured_bodies += 1
            self._pause(_PAUSE_BODY)
        else:
            self._pressured_bodies -= 1
            if not self._pressured_bodies:
                self._resume(_PAUSE_BODY)

    def _dispatch(self, stream: H1ServerStream) -> None:
        stream._dispatched = True
        if stream._expect_continue and not stream._request_done:
            self.write(_CONTINUE)
        assert self._loop is not None
        task = self._loop.create_task(self._serve(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: H1ServerStream) -> None:
        try:
            await self._handler(stream)
        except asyncio.CancelledError:
            stream.reset()
            raise
        except Exception as exc:
            self._handler_failed(stream, f"handler failed: {type(exc).__name__}")
            return
        if not stream.done:
            self._handler_failed(stream, "handler returned without completing the response")

    def _handler_failed(self, stream: H1ServerStream, detail: str) -> None:
        if stream.done or self.closed:
            return
        if stream.head_sent or not self._streams or self._streams[0] is not stream:
            stream.reset()
            return
        stream._done = True
        stream.release_body()
        self._streams.popleft()
        self._local_reply(500, detail)

    # -- parsing --------------------------------------------------------------- #

    def _feed(self, data: bytes) -> None:
        self._parse(data)
        # Dispatch only once the input is parsed: a request that turns out
        # malformed further on (an invalid Transfer-Encoding, a bad first
        # chunk) is then answered 400 here instead of reaching the handler.
        if self._dispatch_due:
            self._dispatch_due = False
            if self._streams and not self.closed:
                self._dispatch(self._streams[0])

    def _parse(self, data: bytes) -> None:
        stream = self._parsing
        if stream is not None and stream._raw_body_left:
            self._take_raw_body(stream, data)
            return
        if stream is None:
            self._raw_head_bytes += len(data)
        try:
            if len(data) <= FEED_SLICE:
                self._parser.feed_data(data)
            else:
                self._feed_slices(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._start_tunnel(data[int(upgrade.args[0]) :])
            return
        except Exception as exc:  # whatever the client sent, data_received must not raise
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            if isinstance(cause, HeadTooLarge):
                self._protocol_error(431, str(cause) or "request headers too large")
            else:
                self._protocol_error(400, _parse_error_detail(exc, cause))
            return
        if self._parsing is None and self._in_head and self._raw_head_bytes > self._max_head:
            self._protocol_error(431, "request headers too large")

    def _feed_slices(self, data: bytes) -> None:
        view = memoryview(data)
        size = len(data)
        for start in range(0, size, FEED_SLICE):
            try:
                self._parser.feed_data(view[start : start + FEED_SLICE])
            except httptools.HttpParserUpgrade as upgrade:
                raise httptools.HttpParserUpgrade(start + int(upgrade.args[0])) from None
            if len(self._streams) > self._max_pipelined and start + FEED_SLICE < size:
                self._backlog = bytes(view[start + FEED_SLICE :])
                return

    def _parse_backlog(self) -> None:
        data = self._backlog
        self._backlog = None
        if data and not self.closed and not self._pause_reasons & _PAUSE_HALTED:
            self._raw_head_bytes = 0
            self._feed(data)

    # httptools callbacks (llhttp calls them from feed_data)

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._raw_headers = []
        self._trailers = None
        self._head_size = 0
        self._fields = 0
        timeout = self._settings.request_headers_timeout
        if timeout:
            assert self._loop is not None
            self._head_deadline = deadline = self._loop.time() + timeout
            self._arm(deadline)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self._fields += 1
        if self._fields > MAX_HEADERS_COUNT:
            raise HeadTooLarge("too many request header fields")
        if self._in_head:
            self._raw_headers.append((name, value))
        elif self._trailers is None:
            self._trailers = [(name, value)]
        else:
            self._trailers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        parsed = build_request_head(
            parser.get_method().decode("ascii"),
            self._url,
            self._raw_headers,
            parser.get_http_version(),
            self._settings.scheme,
            parser.should_upgrade(),
        )
        self._in_head = False
        self._head_deadline = None
        self._idle_deadline = None
        self._raw_head_bytes = 0
        self._head_size = 0
        self._fields = 0
        stream = H1ServerStream(self, parsed, self._settings.buffer_limit)
        self._parsing = stream
        streams = self._streams
        streams.append(stream)
        if len(streams) == 1:
            self._dispatch_due = True
        elif len(streams) > self._max_pipelined:
            self._pause(_PAUSE_PIPELINE)

    def on_body(self, data: bytes) -> None:
        stream = self._parsing
        if stream is not None:
            stream.body.feed(data)

    def on_message_complete(self) -> None:
        stream = self._parsing
        if stream is None or stream._raw_body_left:
            return
        self._parsing = None
        stream._request_done = True
        if not stream._tunnel_request:
            stream.body.end(decode_fields(self._trailers))

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._max_head:
            raise HeadTooLarge

    def _start_tunnel(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade / CONNECT head: what follows is raw bytes."""
        stream = self._streams[-1] if self._streams else None
        if stream is None:
            self._protocol_error(400, "unexpected upgrade")
            return
        if not stream._tunnel_request:
            # A declined h2c offer: its body (if any) and the next requests follow.
            self._take_raw_body(stream, rest)
            return
        self._tunnel = stream
        self._parsing = None
        if rest:
            stream.body.feed(rest)

    def _take_raw_body(self, stream: H1ServerStream, data: bytes) -> None:
        """Body bytes the codec frames itself (see ParsedRequest.raw_body), then parse on."""
        left = stream._raw_body_left
        if left:
            piece = data[:left]
            stream.body.feed(piece)
            stream._raw_body_left = left = left - len(piece)
            data = data[len(piece) :]
            if left:
                return
            if self._parsing is stream:
                self._parsing = None
            stream._request_done = True
            stream.body.end()
        if data:
            self._parse(data)

    def _protocol_error(self, status: int, detail: str) -> None:
        """Stop parsing; answer ``status`` once the responses already owed are written."""
        self._pause(_PAUSE_HALTED)
        self._backlog = None
        stream = self._parsing
        if stream is not None:
            self._parsing = None
            if stream._dispatched:
                # The error is inside a body being proxied: the handler sees
                # the abort and answers; the connection closes after that.
                stream.body.abort(StreamReset("PROTOCOL_ERROR", detail))
                return
            self._streams.pop()  # never handed to the handler: answered here
            self._dispatch_due = False
        self._head_deadline = None
        self._in_head = False
        if self._streams:
            self._pending_error = (status, detail)
        else:
            self._local_reply(status, detail)

    def _local_reply(self, status: int, detail: str) -> None:
        body = f"{detail}\n".encode("latin-1", "replace")
        head = (
            f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"
            f"content-length: {len(body)}\r\ncontent-type: text/plain\r\n"
            f"server: {self._settings.server_name}\r\nconnection: close\r\n\r\n"
        )
        self.write(head.encode("latin-1") + body)
        self._close_after_response()
        callback = self._settings.on_local_reply
        if callback is not None:
            callback(status, detail)

    # -- flow control ------------------------------------------------------------ #

    def _pause(self, reason: int) -> None:
        if not self._pause_reasons and self._transport is not None and not self._closed:
            self._transport.pause_reading()
        self._pause_reasons |= reason

    def _resume(self, reason: int) -> None:
        if not self._pause_reasons & reason:
            return
        self._pause_reasons &= ~reason
        if not self._pause_reasons and self._transport is not None and not self._closed:
            self._transport.resume_reading()

    # -- timeouts ------------------------------------------------------------------ #

    def _go_idle(self) -> None:
        idle = self._settings.idle_timeout
        if idle and not self._in_head:
            assert self._loop is not None
            self._idle_deadline = deadline = self._loop.time() + idle
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        # Only ever moves the timer earlier. The timer re-arms itself at most
        # one tick ahead, so with steady traffic no request touches it.
        if self._timer is not None:
            if self._timer_when <= when:
                return
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_at(when, self._on_timer)
        self._timer_when = when

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        assert self._loop is not None
        now = self._loop.time()
        head_deadline = self._head_deadline
        if head_deadline is not None and now >= head_deadline:
            if self._pause_reasons:
                # We stopped reading (backpressure), not the client.
                self._head_deadline = head_deadline = now + (self._settings.request_headers_timeout or 0)
            else:
                self._protocol_error(408, "request headers not received in time")
                return
        idle_deadline = self._idle_deadline
        if idle_deadline is not None and now >= idle_deadline and not self._streams:
            self.close()
            return
        deadlines = [d for d in (head_deadline, idle_deadline) if d is not None]
        if deadlines and self._tick is not None:
            self._arm(min(min(deadlines), now + self._tick))


def _parse_error_detail(exc: Exception, cause: BaseException | None) -> str:
    if isinstance(cause, BadMessage):
        return str(cause)
    if isinstance(exc, httptools.HttpParserError) and str(exc):
        return f"malformed request: {exc}"
    return "malformed request"
