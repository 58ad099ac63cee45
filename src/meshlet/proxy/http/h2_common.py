"""What the HTTP/2 server and client codecs share, on the ``h2`` library.

``h2`` is the sans-IO protocol core; ``H2Endpoint`` is the thin asyncio
adapter around it: it owns the transport, batches ``data_to_send()`` into one
write, sends bodies within the peer's flow-control windows and the transport's
write buffer, and acknowledges received body bytes only as the reader
consumes them, so a slow reader throttles the sender.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from h2.exceptions import DenialOfServiceError, ProtocolError
from h2.settings import SettingCodes, Settings
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame

from meshlet.proxy.http.stream import BodyStream, Headers, StreamReset

# Hop-by-hop headers of HTTP/1.1 that HTTP/2 forbids (RFC 9113 §8.2.2).
CONNECTION_SPECIFIC_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)

# How long a sender waits for the peer to open its flow-control window or
# for the transport to drain before the stream is given up.
DEFAULT_STALL_TIMEOUT = 300.0

# How long a closing connection may take to deliver its last bytes.
CLOSE_GRACE = 5.0

# Flush the h2 output buffer at least every this many bytes while sending a body.
_FLUSH_EVERY = 256 * 1024
# A send smaller than this is left for the coalesced end-of-turn write.
_FLUSH_NOW = 16 * 1024

_UNLIMITED_STREAMS = 2**32 + 1

# The connection flow-control window every HTTP/2 connection starts with
# (RFC 9113 §6.9.2); SETTINGS cannot change it, only WINDOW_UPDATE.
_INITIAL_CONNECTION_WINDOW = 65535


def error_name(code: int) -> str:
    """HTTP/2 error code → its RFC name ("CANCEL"); unknown codes keep their number."""
    try:
        return str(ErrorCodes(code).name)
    except ValueError:
        return f"UNKNOWN_ERROR_{code}"


def error_code(name: str) -> int:
    """An HTTP/2 error code name → its value; unknown names map to INTERNAL_ERROR."""
    member = ErrorCodes.__members__.get(name)
    return int(member) if member is not None else int(ErrorCodes.INTERNAL_ERROR)


def h2_fields(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Regular header fields fit for HTTP/2: lower-case names, no hop-by-hop
    headers, no ``host`` (it travels as ``:authority``), ``te`` only as ``trailers``."""
    out: list[tuple[str, str]] = []
    for name, value in headers:
        name = name.lower()
        if name in CONNECTION_SPECIFIC_HEADERS or name == "host" or name.startswith(":"):
            continue
        if name == "te":
            if value.strip().lower() != "trailers":
                continue
            value = "trailers"
        out.append((name, value))
    return out


def decode_fields(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    """h2's byte headers → the ``str`` headers the proxy works with (latin-1)."""
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]


class _AdvertisedStreamLimit(Settings):  # type: ignore[misc]  # h2 is untyped here
    """Local settings whose MAX_CONCURRENT_STREAMS is advertised but not
    enforced by h2: h2 treats an excess stream as a connection error, while
    RFC 9113 §5.1.2 wants a stream error, so the codec refuses the stream
    itself with REFUSED_STREAM (retryable) and the other streams live on."""

    @property
    def max_concurrent_streams(self) -> int:
        return _UNLIMITED_STREAMS

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[SettingCodes.MAX_CONCURRENT_STREAMS] = value


class MeshletH2Connection(H2Connection):  # type: ignore[misc]  # h2 is untyped here
    """``H2Connection`` with graceful GOAWAY in both directions.

    h2 moves the whole connection to CLOSED when a GOAWAY is sent or
    received and then refuses every frame, but a graceful GOAWAY must let the
    streams at or below ``last_stream_id`` finish (RFC 9113 §6.8). Here a
    received GOAWAY only surfaces as ``ConnectionTerminated`` and
    ``send_goaway`` writes one without closing the state machine; the codecs
    then refuse new streams themselves.
    """

    local_settings: Settings

    def __init__(self, config: H2Configuration, local_settings: dict[SettingCodes, int]) -> None:
        super().__init__(config)
        # Given as initial values (not as an update) so they count from the
        # first frame, and are sent by ``initiate_connection``.
        current: Settings = self.local_settings
        values: dict[SettingCodes, int] = {SettingCodes(c): current[c] for c in current}
        values.update(local_settings)
        settings_class = Settings if config.client_side else _AdvertisedStreamLimit
        self.local_settings = settings_class(client=config.client_side, initial_values=values)

    def _receive_frame(self, frame: Any) -> list[Any]:
        try:
            events: list[Any] = super()._receive_frame(frame)
        except DenialOfServiceError:
            raise
        except ProtocolError as exc:
            # h2 reports an undecodable field block as PROTOCOL_ERROR; RFC 9113
            # §4.3 makes it a COMPRESSION_ERROR (the HPACK state is lost).
            if isinstance(exc.__cause__, HPACKError):
                raise _CompressionError(str(exc)) from exc
            raise
        return events

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        event = ConnectionTerminated()
        event.error_code = _error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def send_goaway(self, last_stream_id: int, code: int = 0, debug: bytes = b"") -> None:
        frame = GoAwayFrame(
            stream_id=0, last_stream_id=last_stream_id, error_code=code, additional_data=debug
        )
        self._prepare_for_sending([frame])


class _CompressionError(ProtocolError):  # type: ignore[misc]  # h2 is untyped here
    error_code = ErrorCodes.COMPRESSION_ERROR


def _error_code_from_int(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


class H2StreamState:
    """Receive-side bookkeeping of one stream shared by server and client:
    the inbound body and the bytes received but not yet acknowledged."""

    __slots__ = ("_endpoint", "body", "error", "released", "stream_id", "unacked")

    def __init__(self, endpoint: H2Endpoint, stream_id: int, body: BodyStream) -> None:
        self._endpoint = endpoint
        self.stream_id = stream_id
        self.body = body
        self.unacked = 0
        self.released = False
        # Set once the stream is reset or the connection is gone: sends raise it.
        self.error: StreamReset | None = None
        body.on_consumed = self._consumed

    def received(self, data: bytes, flow_controlled_length: int) -> None:
        if self.released:
            # Nobody will read it: give the connection window back at once.
            self._endpoint.acknowledge(self.stream_id, flow_controlled_length)
            return
        self.unacked += flow_controlled_length
        self.body.feed(data)
        padding = flow_controlled_length - len(data)
        if padding:
            # Padding is never read, so it is acknowledged at once.
            self._consumed(padding)

    def _consumed(self, size: int) -> None:
        size = min(size, self.unacked)
        if size <= 0:
            return
        self.unacked -= size
        self._endpoint.acknowledge(self.stream_id, size)

    def release(self) -> None:
        """Return the connection window held by unread bytes; the stream is done."""
        if self.released:
            return
        self.released = True
        self.body.on_consumed = None
        if self.unacked:
            size, self.unacked = self.unacked, 0
            self._endpoint.acknowledge(self.stream_id, size)

    def fail(self, error: StreamReset, *, abort_body: bool = True) -> None:
        """Later sends raise ``error``; unless told otherwise the inbound body
        aborts with it too (not when it already arrived complete)."""
        if self.error is None:
            self.error = error
        if abort_body:
            self.body.abort(error)


class H2Endpoint(asyncio.Protocol):
    """The asyncio side of one HTTP/2 connection (server or client)."""

    def __init__(self, conn: MeshletH2Connection, stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> None:
        self._conn = conn
        self._stall_timeout = stall_timeout
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._flush_scheduled = False
        self._writable: asyncio.Future[None] | None = None
        self._window_waiters: dict[int, asyncio.Future[None]] = {}

    # -- output ----------------------------------------------------------- #

    def flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._transport is not None and not self._closed:
            self._transport.write(data)

    def schedule_flush(self) -> None:
        """Coalesce the output of several streams into one write this loop turn."""
        if not self._flush_scheduled and self._loop is not None and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def close_transport(self, *, abort: bool = False) -> None:
        """Close after the buffered output, but never wait on a peer that
        stopped reading for more than ``CLOSE_GRACE`` seconds."""
        transport = self._transport
        if transport is None or self._closed:
            return
        if abort:
            transport.abort()
            return
        transport.close()
        if self._loop is not None and transport.get_write_buffer_size():
            self._loop.call_later(CLOSE_GRACE, self._abort_if_open, transport)

    def _abort_if_open(self, transport: asyncio.Transport) -> None:
        if self._transport is transport and not self._closed:
            transport.abort()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if self._closed:
            return
        self._conn.acknowledge_received_data(size, stream_id)
        self.schedule_flush()

    # -- asyncio.Protocol ------------------------------------------------- #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's and the TLS adapters' transports are not asyncio.Transport
        # subclasses, but they provide its interface.
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()

    def send_preface(self, connection_window: int) -> None:
        """Send our preface (SETTINGS) and open the connection window to
        ``connection_window``, then write it out."""
        conn = self._conn
        conn.initiate_connection()
        extra = connection_window - _INITIAL_CONNECTION_WINDOW
        if extra > 0:
            conn.increment_flow_control_window(extra)
        self.flush()

    def pause_writing(self) -> None:
        if self._writable is None and self._loop is not None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport = None
        self.resume_writing()
        self.wake_all_windows()

    # -- sending bodies ----------------------------------------------------- #

    async def send_body(self, state: H2StreamState, data: bytes, end_stream: bool) -> None:
        """Send ``data`` on the stream in frames the peer accepts, waiting for
        its flow-control window and for the transport's write buffer."""
        try:
            await self._send_body(state, data, end_stream)
        except ProtocolError as exc:
            # h2 refused the frame (the stream closed under us): a local error.
            error = StreamReset("INTERNAL_ERROR", f"cannot send body: {exc}", local=True)
            self.reset_stream(state, error)
            raise error from exc

    async def _send_body(self, state: H2StreamState, data: bytes, end_stream: bool) -> None:
        conn = self._conn
        sid = state.stream_id
        total = len(data)
        view = memoryview(data) if total > conn.max_outbound_frame_size else None
        pos = 0
        unflushed = 0
        while pos < total:
            self._check_sendable(state)
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                self.flush()
                unflushed = 0
                await self._wait_for_window(state)
                continue
            size = min(window, total - pos)
            last = pos + size == total
            chunk = data if view is None else view[pos : pos + size]
            conn.send_data(sid, chunk, end_stream=end_stream and last)
            pos += size
            unflushed += size
            if unflushed >= _FLUSH_EVERY:
                self.flush()
                unflushed = 0
                await self._wait_writable(state)
        if total == 0 and end_stream:
            self._check_sendable(state)
            conn.end_stream(sid)
        if unflushed >= _FLUSH_NOW:
            self.flush()
        else:
            # Small sends of many streams share one write at the end of this
            # loop turn; the unflushed output stays below streams x _FLUSH_NOW.
            self.schedule_flush()
        await self._wait_writable(state)

    def _check_sendable(self, state: H2StreamState) -> None:
        if state.error is not None:
            raise state.error
        if self._closed:
            raise StreamReset("CONNECTION_RESET", "connection closed")

    async def _wait_for_window(self, state: H2StreamState) -> None:
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._window_waiters[state.stream_id] = waiter
        try:
            async with asyncio.timeout(self._stall_timeout):
                await waiter
        except TimeoutError:
            self.stalled(state, "the peer's flow-control window stayed closed")
        finally:
            if self._window_waiters.get(state.stream_id) is waiter:
                del self._window_waiters[state.stream_id]

    async def _wait_writable(self, state: H2StreamState) -> None:
        waiter = self._writable
        if waiter is None:
            return
        try:
            async with asyncio.timeout(self._stall_timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            self.stalled(state, "the peer stopped reading")

    def stalled(self, state: H2StreamState, why: str) -> None:
        """A send waited too long: reset the stream and raise."""
        error = StreamReset("CANCEL", f"send stalled: {why}", local=True)
        self.reset_stream(state, error)
        raise error

    def reset_stream(self, state: H2StreamState, error: StreamReset) -> None:
        """Send RST_STREAM (once) and fail the stream locally."""
        if state.error is None and not self._closed:
            try:
                self._conn.reset_stream(state.stream_id, error_code(error.code))
            except Exception:  # already closed in h2: nothing left to send
                pass
            self.schedule_flush()
        state.fail(error)
        self.wake_window(state.stream_id)

    def window_updated(self, stream_id: int) -> None:
        """A WINDOW_UPDATE arrived: stream 0 is the connection's window, which
        every waiting stream may use."""
        if stream_id == 0:
            self.wake_all_windows()
        else:
            self.wake_window(stream_id)

    def wake_window(self, stream_id: int) -> None:
        waiter = self._window_waiters.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake_all_windows(self) -> None:
        waiters, self._window_waiters = self._window_waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_result(None)
