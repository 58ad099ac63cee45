"""HTTP/2 upstream codec: one ``H2ClientConnection`` per upstream connection.

The upstream pool connects the socket, runs the transport socket's handshake
and installs this protocol; requests are then multiplexed on it. Each
``request`` returns once the response head arrives, while the request body
streams within the upstream's flow-control windows and the response body
streams into a ``BodyStream`` acknowledged only as it is read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    TrailersReceived,
    WindowUpdated,
)
from h2.events import StreamReset as H2StreamReset
from h2.exceptions import ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes

from meshlet.config.model import Http2Settings
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
    Headers,
    RequestHead,
    ResponseHead,
    StreamReset,
    UpstreamResponse,
)

log = logging.getLogger(__name__)

_HIGHEST_STREAM_ID = 2**31 - 1
_STREAMS_BEFORE_SETTINGS = 100
DEFAULT_BUFFER_LIMIT = 1024 * 1024


def request_fields(head: RequestHead) -> list[tuple[str, str]]:
    """An HTTP/1.1- or HTTP/2-origin request head as an HTTP/2 header list."""
    authority = head.authority or head.get("host") or ""
    if head.method == "CONNECT" and not head.protocol:
        pseudo = [(":method", "CONNECT"), (":authority", authority)]
    else:
        pseudo = [(":method", head.method), (":scheme", head.scheme), (":authority", authority)]
        if head.protocol:
            pseudo.append((":protocol", head.protocol))
        pseudo.append((":path", head.path))
    return pseudo + h2_fields(head.headers)


def response_head(raw: Iterable[tuple[bytes, bytes]]) -> ResponseHead:
    status = 0
    headers: Headers = []
    for name, value in raw:
        if name == b":status":
            status = int(value)
        elif name[:1] != b":":
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
    return ResponseHead(status, headers)


class _Exchange:
    """One request/response on the connection."""

    __slots__ = ("request_done", "response", "response_ended", "sender", "state", "trailers")

    def __init__(self, state: H2StreamState, response: asyncio.Future[ResponseHead]) -> None:
        self.state = state
        self.response = response
        self.response_ended = False
        self.request_done = False
        self.trailers: Headers | None = None
        self.sender: asyncio.Task[None] | None = None

    def fail(self, error: StreamReset) -> None:
        """The stream died: before the head ``request`` raises, after it the
        response body aborts (unless it had already arrived whole)."""
        if not self.response.done():
            self.response.set_exception(error)
        self.state.fail(error, abort_body=not self.response_ended)


class H2ClientConnection(H2Endpoint):
    """asyncio protocol implementing ``UpstreamConnection`` over HTTP/2."""

    def __init__(
        self,
        settings: Http2Settings | None = None,
        *,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        cfg = settings or Http2Settings()
        self._buffer_limit = buffer_limit
        # Never advertise more window than we are willing to buffer: the
        # response body queue is only bounded by what flow control lets in.
        self._stream_window = min(cfg.initial_stream_window_size, buffer_limit)
        self._connection_window = min(cfg.initial_connection_window_size, 16 * buffer_limit)
        config = H2Configuration(client_side=True, header_encoding=None)
        conn = MeshletH2Connection(
            config,
            {SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: self._stream_window},
        )
        super().__init__(conn, stall_timeout)
        self._exchanges: dict[int, _Exchange] = {}
        self._goaway_received = False
        self._closing = False
        self.idle_since = time.monotonic()
        self._ready: asyncio.Future[None] | None = None

    @property
    def ready(self) -> asyncio.Future[None]:
        """Resolved when the upstream's SETTINGS arrived; fails if the
        connection is lost first."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
        return self._ready

    # -- UpstreamConnection ------------------------------------------------- #

    @property
    def available(self) -> bool:
        if self._transport is None or self._closed or self._closing or self._goaway_received:
            return False
        if self._conn.highest_outbound_stream_id >= _HIGHEST_STREAM_ID - 2:
            return False
        limit: int = self._conn.remote_settings.max_concurrent_streams
        if self._ready is None or not self._ready.done():
            # The peer's limit is unknown until its SETTINGS arrive: RFC 9113
            # §5.1.2 suggests assuming no more than 100 meanwhile.
            limit = min(limit, _STREAMS_BEFORE_SETTINGS)
        return len(self._exchanges) < limit

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def active_requests(self) -> int:
        return len(self._exchanges)

    async def wait_connected(self, timeout: float | None = 10.0) -> None:
        """Wait for the upstream's SETTINGS (its stream limit is known then)."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self.ready)

    async def request(self, head: RequestHead, body: BodyStream | None) -> UpstreamResponse:
        if not self.available:
            raise StreamReset("REFUSED_STREAM", "HTTP/2 connection cannot take a new stream", local=True)
        assert self._loop is not None
        conn = self._conn
        sid = conn.get_next_available_stream_id()
        state = H2StreamState(self, sid, BodyStream(high_water=self._buffer_limit))
        exchange = _Exchange(state, self._loop.create_future())
        # A body already complete and empty (a GET from HTTP/1.1) ends the
        # stream with the headers: no empty DATA frame, no sender task.
        end_stream = body is None or (
            body.ended and not body.aborted and body.buffered == 0 and not body.trailers
        )
        try:
            conn.send_headers(sid, request_fields(head), end_stream=end_stream)
        except TooManyStreamsError as exc:
            raise StreamReset("REFUSED_STREAM", f"upstream stream limit reached: {exc}", local=True) from exc
        except ProtocolError as exc:
            raise StreamReset("PROTOCOL_ERROR", f"cannot send request headers: {exc}", local=True) from exc
        self._exchanges[sid] = exchange
        self.schedule_flush()
        if end_stream or body is None:
            exchange.request_done = True
        else:
            exchange.sender = self._loop.create_task(self._send_request_body(exchange, body))
        try:
            response = await exchange.response
        except asyncio.CancelledError:
            self.reset_stream(state, StreamReset("CANCEL", "request cancelled", local=True))
            self._stop_sender(exchange)
            self._forget(exchange)
            raise
        return UpstreamResponse(response, state.body, cancel=lambda: self._abandon(exchange))

    def _abandon(self, exchange: _Exchange) -> None:
        """The router gave up on a response after its head arrived (timeout,
        downstream reset): reset just this stream, the connection lives on."""
        state = exchange.state
        if self._exchanges.get(state.stream_id) is not exchange:
            return
        self.reset_stream(state, StreamReset("CANCEL", "response abandoned by the proxy", local=True))
        self._stop_sender(exchange)
        self._forget(exchange)

    def close(self) -> None:
        if self._transport is not None and not self._closed and not self._closing:
            self._closing = True
            self._conn.send_goaway(0)
            self.flush()
            self.close_transport()
        self._fail_all(StreamReset("CONNECTION_RESET", "upstream connection closed by the proxy", local=True))

    # -- request body ------------------------------------------------------- #

    async def _send_request_body(self, exchange: _Exchange, body: BodyStream) -> None:
        state = exchange.state
        try:
            while True:
                try:
                    chunk = await body.read()
                except StreamReset as exc:
                    # The downstream side gave up mid-body: so does the upstream stream.
                    self.reset_stream(
                        state, StreamReset("CANCEL", f"request body aborted: {exc}", local=True)
                    )
                    exchange.fail(StreamReset("CANCEL", "request body aborted", local=True))
                    return
                if not chunk:
                    break
                await self.send_body(state, chunk, False)
            if body.trailers:
                self._check_sendable(state)
                self._conn.send_headers(state.stream_id, h2_fields(body.trailers), end_stream=True)
                self.schedule_flush()
            else:
                await self.send_body(state, b"", True)
        except StreamReset:
            pass  # the stream is reset: the reset handler has told the response side
        except ProtocolError as exc:
            error = StreamReset("INTERNAL_ERROR", f"cannot send request body: {exc}", local=True)
            self.reset_stream(state, error)
            exchange.fail(error)
        finally:
            exchange.request_done = True
            self._forget_if_done(exchange)

    # -- asyncio.Protocol ---------------------------------------------------- #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.send_preface(self._connection_window)

    def data_received(self, data: bytes) -> None:
        if self._closed or self._transport is None or self._transport.is_closing():
            return
        try:
            events = self._conn.receive_data(data)
        except ProtocolError as exc:
            self.flush()  # the GOAWAY h2 queued
            self._fail_all(
                StreamReset(error_name(exc.error_code), f"upstream protocol error: {exc}", local=True)
            )
            self.close_transport()
            return
        try:
            for event in events:
                self._dispatch(event)
        except Exception as exc:
            log.exception("HTTP/2 upstream connection: internal error")
            self._conn.send_goaway(self._conn.highest_inbound_stream_id, int(ErrorCodes.INTERNAL_ERROR))
            self.flush()
            self._fail_all(StreamReset("INTERNAL_ERROR", f"internal error: {exc}", local=True))
            self.close_transport()
            return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._fail_all(StreamReset("CONNECTION_RESET", "upstream connection lost"))
        ready = self.ready
        if not ready.done():
            ready.set_exception(StreamReset("CONNECTION_RESET", "upstream connection lost before SETTINGS"))
            ready.exception()  # mark it retrieved: nobody may be waiting

    # -- events -------------------------------------------------------------- #

    def _dispatch(self, event: object) -> None:
        if isinstance(event, DataReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is None:
                self.acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                exchange.state.received(event.data, event.flow_controlled_length)
        elif isinstance(event, ResponseReceived):
            self._on_response(event)
        elif isinstance(event, TrailersReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.trailers = decode_fields(event.headers)
        elif isinstance(event, StreamEnded):
            self._on_response_end(event.stream_id)
        elif isinstance(event, WindowUpdated):
            self.window_updated(event.stream_id)
        elif isinstance(event, H2StreamReset):
            self._on_reset(event)
        elif isinstance(event, RemoteSettingsChanged):
            self.wake_all_windows()
            if not self.ready.done():
                self.ready.set_result(None)
        elif isinstance(event, ConnectionTerminated):
            self._on_goaway(event)

    def _on_response(self, event: ResponseReceived) -> None:
        exchange = self._exchanges.get(event.stream_id)
        if exchange is not None and not exchange.response.done():
            exchange.response.set_result(response_head(event.headers))

    def _on_response_end(self, stream_id: int) -> None:
        exchange = self._exchanges.get(stream_id)
        if exchange is None:
            return
        exchange.response_ended = True
        if not exchange.response.done():
            exchange.response.set_exception(StreamReset("PROTOCOL_ERROR", "stream ended without a response"))
        exchange.state.body.end(exchange.trailers)
        self._forget_if_done(exchange)

    def _on_reset(self, event: H2StreamReset) -> None:
        exchange = self._exchanges.get(event.stream_id)
        if exchange is None:
            return
        code = error_name(event.error_code)
        who = "upstream" if event.remote_reset else "protocol error in the upstream's stream"
        exchange.fail(StreamReset(code, f"stream reset by the {who}", local=not event.remote_reset))
        self.wake_window(event.stream_id)
        self._stop_sender(exchange)
        self._forget(exchange)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        """No new streams; those the upstream never processed are retryable."""
        self._goaway_received = True
        refused = StreamReset("REFUSED_STREAM", "upstream GOAWAY: stream not processed")
        for sid, exchange in list(self._exchanges.items()):
            if sid > event.last_stream_id:
                exchange.fail(refused)
                self._stop_sender(exchange)
                self._forget(exchange)
        if event.error_code != ErrorCodes.NO_ERROR:
            error = StreamReset(error_name(event.error_code), "upstream GOAWAY with an error")
            self._fail_all(error)
        self._close_if_drained()

    # -- bookkeeping ----------------------------------------------------------- #

    @staticmethod
    def _stop_sender(exchange: _Exchange) -> None:
        """The request body has nowhere to go: stop waiting for it."""
        sender = exchange.sender
        if sender is not None and not sender.done() and sender is not asyncio.current_task():
            sender.cancel()

    def _forget_if_done(self, exchange: _Exchange) -> None:
        if exchange.response_ended and exchange.request_done:
            self._forget(exchange)

    def _forget(self, exchange: _Exchange) -> None:
        exchange.state.release()
        if self._exchanges.pop(exchange.state.stream_id, None) is not None and not self._exchanges:
            self.idle_since = time.monotonic()
            self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self._goaway_received and not self._exchanges and self._transport is not None and not self._closed:
            self._closing = True
            self.close_transport()

    def _fail_all(self, error: StreamReset) -> None:
        for exchange in list(self._exchanges.values()):
            exchange.fail(error)
            self._stop_sender(exchange)
            self._forget(exchange)
        self.wake_all_windows()
