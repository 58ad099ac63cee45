"""HTTP/1.1 upstream codec: one connection to one upstream host, one request at a time.

The upstream pool opens the socket, runs the transport socket's handshake and
installs an ``H1ClientConnection`` as the application protocol; the connection
then carries requests one after another for as long as the upstream keeps it
alive (``available`` tells the pool when it can take the next one).

``request`` writes the head at once, streams the request body from a task and
returns as soon as the response head arrives, so an upstream that answers
before the request body is finished (an early response) is seen at once. The
response body streams into a ``BodyStream`` whose backpressure pauses reading
from the upstream.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import httptools

from meshlet.proxy.http.h1_common import (
    CRLF,
    DEFAULT_MAX_HEAD_BYTES,
    HOP_BY_HOP,
    MAX_HEADERS_COUNT,
    HeadTooLarge,
    build_response_head,
    chunk_prefix,
    connection_tokens,
    decode_fields,
    last_chunk,
    response_has_no_body,
    serialize_head,
)
from meshlet.proxy.http.h1_flow import H1WriteFlow
from meshlet.proxy.http.stream import (
    BodyStream,
    RequestHead,
    ResponseHead,
    StreamReset,
    UpstreamResponse,
)

DEFAULT_BUFFER_LIMIT = 1024 * 1024
WRITE_HIGH_WATER = 256 * 1024

# Request body framings.
_NO_BODY = 0
_LENGTH = 1
_CHUNKED = 2
_AFTER_UPGRADE = 3  # raw bytes, sent only once the upstream answered 101

# Methods whose empty body is announced with "content-length: 0" (servers may
# otherwise answer 411 Length Required).
_LENGTH_REQUIRED = frozenset({"POST", "PUT", "PATCH"})

_HEAD_END = b"\r\n\r\n"


class H1ClientConnection(H1WriteFlow):
    """An HTTP/1.1 connection to an upstream (``UpstreamConnection``)."""

    def __init__(
        self,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        max_response_headers_kb: int = DEFAULT_MAX_HEAD_BYTES // 1024,
    ) -> None:
        super().__init__()
        self._buffer_limit = buffer_limit
        self._max_head = max_response_headers_kb * 1024
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self._connected = False
        self._closed = False
        self._reusable = True
        self._active = False
        self.idle_since = time.monotonic()
        self._read_paused = False
        # The exchange in progress.
        self._method = ""
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._body: BodyStream | None = None
        self._pump: asyncio.Task[None] | None = None
        self._request_done = True
        self._response_done = True
        self._informational = False
        self._until_close = False
        self._tunnel = False
        self._await_head_only = False
        self._head_buffer = b""
        # Parse state of the response head in progress.
        self._reason = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._head_size = 0
        self._fields = 0
        self._raw_head_bytes = 0

    # -- UpstreamConnection ------------------------------------------------- #

    @property
    def available(self) -> bool:
        return self._connected and not self._closed and not self._active and self._reusable

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def active_requests(self) -> int:
        return 1 if self._active else 0

    @property
    def ready(self) -> asyncio.Future[None]:
        """Resolved once the transport is connected (fails if it closes first)."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            if self._connected:
                self._ready.set_result(None)
            elif self._closed:
                self._fail_ready()
        return self._ready

    async def wait_connected(self, timeout: float | None = None) -> None:
        if not self._connected:
            await asyncio.wait_for(asyncio.shield(self.ready), timeout)

    def close(self) -> None:
        self._reusable = False
        if self._transport is not None and not self._closed:
            self._transport.close()

    async def request(self, head: RequestHead, body: BodyStream | None) -> UpstreamResponse:
        if not self.available:
            raise StreamReset("REFUSED_STREAM", "upstream connection is busy or closed", local=True)
        if head.method == "CONNECT":
            raise StreamReset(
                "REFUSED_STREAM", "CONNECT to an HTTP/1.1 upstream is not supported", local=True
            )
        if body is not None and body.aborted:
            raise StreamReset("CANCEL", "request body aborted before the request was sent", local=True)
        assert self._transport is not None and self._loop is not None
        try:
            data, framing, length = _encode_request(head, body)
        except ValueError as exc:
            raise StreamReset("INTERNAL_ERROR", f"request not sent: {exc}", local=True) from None
        self._start_exchange(head.method)
        waiter = self._head_waiter = self._loop.create_future()
        if framing == _NO_BODY or body is None:
            self._request_done = True
            self._transport.write(data)
        elif framing != _AFTER_UPGRADE and body.ended and _complete_body_fits(body, framing, length):
            self._transport.write(data + _frame_whole_body(body, framing))
            self._request_done = True
        else:
            self._transport.write(data)
            if framing != _AFTER_UPGRADE:
                self._pump = self._loop.create_task(self._send_body(body, framing, length))
        try:
            response_head = await waiter
        except asyncio.CancelledError:
            self._abort()
            raise
        response_body = self._body
        assert response_body is not None
        if self._tunnel and body is not None:
            self._pump = self._loop.create_task(self._send_body(body, _AFTER_UPGRADE, None))
        return UpstreamResponse(response_head, response_body)

    # -- asyncio.Protocol ---------------------------------------------------- #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self._transport = transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._connected = True
        self.idle_since = time.monotonic()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._spent():
            return
        if self._tunnel:
            assert self._body is not None
            self._body.feed(data)
        elif not self._active or self._response_done:
            # Nothing was asked: an upstream talking out of turn (often a 408
            # before it closes) cannot be trusted with another request.
            self._abort()
        elif self._await_head_only:
            self._feed_head_only(data)
        else:
            self._feed(data)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._reusable = False
        self._fail_ready()
        detail = f"upstream connection closed: {exc}" if exc else "upstream connection closed"
        error = StreamReset("CONNECTION_RESET", detail)
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        body = self._body
        if body is not None and not self._response_done:
            self._response_done = True
            if (self._until_close or self._tunnel) and exc is None:
                body.end()
            else:
                body.abort(error)
        if self._pump is not None:
            self._pump.cancel()
        self._fail_write_waiter(error)

    # -- request side ---------------------------------------------------------- #

    def _start_exchange(self, method: str) -> None:
        self._active = True
        self._method = method
        self._body = None
        self._pump = None
        self._request_done = False
        self._response_done = False
        self._until_close = False
        self._tunnel = False
        self._informational = False
        self._await_head_only = method == "HEAD"
        self._head_buffer = b""
        self._raw_head_bytes = 0

    async def _send_body(self, body: BodyStream, framing: int, length: int | None) -> None:
        transport = self._transport
        assert transport is not None
        sent = 0
        try:
            while chunk := await body.read():
                if self._closed:
                    return
                sent += len(chunk)
                if framing == _CHUNKED:
                    transport.writelines((chunk_prefix(len(chunk)), chunk, CRLF))
                else:
                    if length is not None and sent >= length:
                        if sent > length:
                            raise StreamReset("INTERNAL_ERROR", "request body longer than its content-length")
                        # Complete on the wire: the upstream may answer before
                        # the downstream body formally ends.
                        transport.write(chunk)
                        break
                    transport.write(chunk)
                if self.write_paused:
                    await self._write_resumed()
            if framing == _AFTER_UPGRADE:
                if transport.can_write_eof():
                    transport.write_eof()
                return
            if framing == _CHUNKED:
                transport.write(last_chunk(body.trailers))
            elif length is not None and sent != length:
                raise StreamReset("INTERNAL_ERROR", "request body shorter than its content-length")
        except Exception as exc:
            # The upstream can never get a complete request: the connection is spent.
            self._fail(StreamReset("CANCEL", f"request body not sent: {exc}", local=True))
            return
        self._request_done = True
        if self._response_done:
            self._exchange_done()

    # -- response side ------------------------------------------------------------ #

    def _feed(self, data: bytes) -> None:
        counting = self._body is None
        if counting:
            self._raw_head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[int(upgrade.args[0]) :]
            if rest and self._body is not None:
                self._body.feed(rest)
            return
        except Exception as exc:  # whatever the upstream sent, data_received must not raise
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            if isinstance(cause, HeadTooLarge):
                self._protocol_error(str(cause) or "response headers too large")
            else:
                self._protocol_error(f"malformed response: {cause or exc}")
            return
        # llhttp holds a partial header line internally; this bounds it.
        if counting and self._body is None and self._raw_head_bytes > self._max_head:
            self._protocol_error("response headers too large")

    def _feed_head_only(self, data: bytes) -> None:
        """Responses to HEAD: httptools cannot be told there is no body, so
        each head is cut out by its blank line and the parser replaced after
        the final one (llhttp insists on CRLF line ends, so the cut is exact)."""
        buffer = self._head_buffer + data if self._head_buffer else data
        while True:
            end = buffer.find(_HEAD_END)
            if end < 0:
                if len(buffer) > self._max_head:
                    self._protocol_error("response headers too large")
                else:
                    self._head_buffer = buffer
                return
            head, buffer = buffer[: end + 4], buffer[end + 4 :]
            self._feed(head)
            if self._body is not None or self._spent():
                break
        self._await_head_only = False
        self._head_buffer = b""
        self._parser = httptools.HttpResponseParser(self)
        if not self._response_done and self._body is not None:
            self._message_done()
        if buffer and not self._spent():
            self.data_received(buffer)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._reason = b""
        self._raw_headers = []
        self._trailers = None
        self._head_size = 0
        self._fields = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._max_head:
            raise HeadTooLarge("response headers too large")
        self._fields += 1
        if self._fields > MAX_HEADERS_COUNT:
            raise HeadTooLarge("too many response header fields")
        if self._body is None:
            self._raw_headers.append((name, value))
        elif self._trailers is None:
            self._trailers = [(name, value)]
        else:
            self._trailers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200 and status != 101:
            self._informational = True  # 100 Continue, 103 Early Hints: not forwarded
            return
        head, keep_alive, framed = build_response_head(
            status, self._reason, self._raw_headers, parser.get_http_version()
        )
        self._head_size = 0
        self._fields = 0
        no_body = response_has_no_body(status, self._method) and status != 101
        self._until_close = not no_body and not framed and status != 101
        self._tunnel = status == 101
        if not keep_alive or self._until_close or self._tunnel:
            self._reusable = False
        self._body = BodyStream(self._buffer_limit, self._on_body_pressure)
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(head)

    def on_body(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            body.feed(data)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._tunnel or self._body is None:
            return
        self._message_done()

    def _message_done(self) -> None:
        body = self._body
        assert body is not None
        body.end(decode_fields(self._trailers))
        self._response_done = True
        body.on_pressure = None
        if self._read_paused:
            self._set_reading(True)
        if self._request_done:
            self._exchange_done()
        else:
            # Early response: the rest of the request body has nowhere to go.
            self._abort()

    def _exchange_done(self) -> None:
        if not self._reusable:
            self.close()
            return
        self._active = False
        self._pump = None
        self._head_waiter = None
        self.idle_since = time.monotonic()

    def _on_body_pressure(self, pressured: bool) -> None:
        self._set_reading(not pressured)

    def _set_reading(self, reading: bool) -> None:
        transport = self._transport
        if transport is None or self._closed or self._read_paused != reading:
            return
        self._read_paused = not reading
        if reading:
            transport.resume_reading()
        else:
            transport.pause_reading()

    # -- failure ----------------------------------------------------------------- #

    def _protocol_error(self, detail: str) -> None:
        self._fail(StreamReset("PROTOCOL_ERROR", detail))

    def _fail(self, error: StreamReset) -> None:
        """End the exchange with ``error`` and drop the connection."""
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self._body is not None and not self._response_done:
            self._response_done = True
            self._body.abort(error)
        self._abort()

    def _abort(self) -> None:
        self._reusable = False
        if self._transport is not None and not self._closed:
            self._transport.abort()

    def _spent(self) -> bool:
        return self._closed or self._transport is None or self._transport.is_closing()

    def _fail_ready(self) -> None:
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(StreamReset("CONNECTION_RESET", "upstream connection closed before ready"))
            ready.exception()


def _encode_request(head: RequestHead, body: BodyStream | None) -> tuple[bytes, int, int | None]:
    """The request head, the framing of its body and the declared length."""
    lines = [f"host: {head.authority}\r\n"]
    content_length: str | None = None
    upgrade = ""
    connection_upgrade = False
    for k, v in head.headers:
        if k in HOP_BY_HOP:
            if k == "upgrade":
                upgrade = v
            elif k == "connection":
                connection_upgrade = "upgrade" in connection_tokens(v)
            elif k == "te" and v.lower() == "trailers":
                lines.append("te: trailers\r\n")
            continue
        if k == "host":
            continue
        if k == "content-length":
            content_length = v
        lines.append(f"{k}: {v}\r\n")
    length: int | None = None
    if upgrade and connection_upgrade:
        lines.append("connection: upgrade\r\n")
        lines.append(f"upgrade: {upgrade}\r\n")
        framing = _AFTER_UPGRADE
    elif content_length is not None:
        if not content_length.isdigit():
            raise ValueError(f"invalid content-length {content_length!r}")
        length = int(content_length)
        if length and body is None:
            raise ValueError(f"content-length {length} declared without a body")
        framing = _LENGTH if length else _NO_BODY
    elif body is None or (body.ended and not body.buffered and not body.trailers):
        if head.method in _LENGTH_REQUIRED:
            lines.append("content-length: 0\r\n")
        framing = _NO_BODY
    else:
        lines.append("transfer-encoding: chunked\r\n")
        framing = _CHUNKED
    # Always HTTP/1.1 upstream, whatever the client spoke (as Envoy does):
    # keep-alive and chunked bodies need it.
    start = f"{head.method} {head.path or '/'} HTTP/1.1\r\n"
    return serialize_head(start, lines), framing, length


def _complete_body_fits(body: BodyStream, framing: int, length: int | None) -> bool:
    """A body already complete in memory can go out with the head in one write."""
    if framing == _LENGTH:
        return body.buffered == length
    return True


def _frame_whole_body(body: BodyStream, framing: int) -> bytes:
    data = body.read_nowait()
    if framing != _CHUNKED:
        return data
    chunk = chunk_prefix(len(data)) + data + CRLF if data else b""
    return chunk + last_chunk(body.trailers)
