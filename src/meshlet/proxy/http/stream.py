"""The protocol-neutral HTTP exchange that codecs and the router share.

Downstream codecs (HTTP/1.1 on httptools, HTTP/2 on h2) turn bytes into a
``DownstreamStream`` per request; upstream codecs take a ``RequestHead`` and a
``BodyStream`` and give back an ``UpstreamResponse``. The connection manager
(router) only ever sees these types, so any downstream protocol can be proxied
to any upstream protocol.

Header names are lower-case ``str`` (latin-1 decoded); pseudo-headers never
appear in ``headers``: they are the head's own fields.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from meshlet.proxy.transport import ConnectionInfo

Headers = list[tuple[str, str]]


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """First value of ``name`` (lower-case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


@dataclass(slots=True)
class RequestHead:
    method: str
    scheme: str  # "http" or "https"
    authority: str  # Host / :authority
    path: str  # origin-form request target, query included ("*" for OPTIONS *)
    headers: Headers = field(default_factory=list)
    version: str = "1.1"  # "1.0", "1.1" or "2"
    # :protocol for extended CONNECT (RFC 8441); "" otherwise.
    protocol: str = ""

    def get(self, name: str) -> str | None:
        return header_value(self.headers, name)


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: Headers = field(default_factory=list)
    reason: str = ""

    def get(self, name: str) -> str | None:
        return header_value(self.headers, name)


class StreamReset(Exception):
    """The peer reset the stream or the connection died mid-message.

    ``code`` is an HTTP/2 error code name ("CANCEL", "REFUSED_STREAM",
    "INTERNAL_ERROR", ...) or "CONNECTION_RESET"; ``local`` tells whether we
    caused it (a local protocol error) or the remote side did.
    """

    def __init__(self, code: str = "CONNECTION_RESET", detail: str = "", *, local: bool = False) -> None:
        self.code = code
        self.detail = detail
        self.local = local
        super().__init__(f"{code}: {detail}" if detail else code)


class BodyStream:
    """A bounded, single-reader queue of body chunks with backpressure both ways.

    Producers are either codecs fed from ``data_received`` (synchronous:
    ``feed``; when the buffer passes ``high_water`` the ``on_pressure(True)``
    callback fires so the codec can pause reading its transport, and
    ``on_pressure(False)`` fires once the reader drained it below
    ``high_water // 2``), or coroutines (``write``, which waits instead).

    The reader calls ``read()`` until it returns ``b""`` (end of body); the
    trailers, if any, are in ``trailers`` afterwards. ``abort(exc)`` makes the
    pending and later reads raise ``exc``.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_ended",
        "_error",
        "_pressured",
        "_reader_waiter",
        "_writer_waiter",
        "high_water",
        "on_consumed",
        "on_pressure",
        "received",
        "trailers",
    )

    def __init__(
        self,
        high_water: int = 256 * 1024,
        on_pressure: Callable[[bool], None] | None = None,
        on_consumed: Callable[[int], None] | None = None,
    ) -> None:
        self.high_water = high_water
        self.on_pressure = on_pressure
        # Called with the size of every chunk the reader takes: HTTP/2 codecs
        # acknowledge received data (WINDOW_UPDATE) only as it is consumed.
        self.on_consumed = on_consumed
        self.trailers: Headers | None = None
        self.received = 0  # total body bytes fed, for stats and retries
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._ended = False
        self._error: BaseException | None = None
        self._pressured = False
        self._reader_waiter: asyncio.Future[None] | None = None
        self._writer_waiter: asyncio.Future[None] | None = None

    @classmethod
    def of(cls, data: bytes, trailers: Headers | None = None) -> BodyStream:
        """A complete body, already ended (local replies, direct responses)."""
        body = cls()
        if data:
            body.feed(data)
        body.end(trailers)
        return body

    @property
    def ended(self) -> bool:
        """True once the producer has finished (all data fed, or aborted)."""
        return self._ended or self._error is not None

    @property
    def aborted(self) -> bool:
        """True once ``abort`` was called: the body will never complete."""
        return self._error is not None

    @property
    def buffered(self) -> int:
        return self._buffered

    # -- producer side ---------------------------------------------------- #

    def feed(self, data: bytes) -> None:
        if self._ended or self._error is not None or not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self.received += len(data)
        self._wake_reader()
        if not self._pressured and self._buffered >= self.high_water:
            self._pressured = True
            if self.on_pressure is not None:
                self.on_pressure(True)

    async def write(self, data: bytes) -> None:
        """Feed ``data``, then wait while the buffer is above the high-water mark."""
        self.feed(data)
        while self._buffered >= self.high_water and self._error is None:
            loop = asyncio.get_running_loop()
            self._writer_waiter = loop.create_future()
            try:
                await self._writer_waiter
            finally:
                self._writer_waiter = None
        if self._error is not None:
            raise self._error

    def end(self, trailers: Headers | None = None) -> None:
        if self._ended:
            return
        self.trailers = trailers
        self._ended = True
        self._wake_reader()

    def abort(self, error: BaseException) -> None:
        if self._error is not None:
            return
        self._error = error
        self._wake_reader()
        self._wake_writer()

    # -- reader side ------------------------------------------------------ #

    async def read(self) -> bytes:
        """Next chunk; ``b""`` at the end of the body. Raises the abort error."""
        while True:
            if self._chunks:
                return self._take(self._chunks.popleft())
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            loop = asyncio.get_running_loop()
            self._reader_waiter = loop.create_future()
            try:
                await self._reader_waiter
            finally:
                self._reader_waiter = None

    def read_nowait(self) -> bytes:
        """Everything buffered right now, joined (``b""`` when nothing is)."""
        if not self._chunks:
            return b""
        data = b"".join(self._chunks)
        self._chunks.clear()
        return self._take(data)

    async def read_all(self, limit: int) -> bytes:
        """The whole body; raises ValueError if it grows beyond ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read():
            size += len(chunk)
            if size > limit:
                raise ValueError(f"body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def _take(self, data: bytes) -> bytes:
        self._buffered -= len(data)
        if self.on_consumed is not None:
            self.on_consumed(len(data))
        if self._buffered < self.high_water:
            self._wake_writer()
        if self._pressured and self._buffered <= self.high_water // 2:
            self._pressured = False
            if self.on_pressure is not None:
                self.on_pressure(False)
        return data

    def _wake_reader(self) -> None:
        w = self._reader_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_writer(self) -> None:
        w = self._writer_waiter
        if w is not None and not w.done():
            w.set_result(None)


class DownstreamStream(Protocol):
    """One request arriving from a client, as a downstream codec presents it.

    The connection manager reads ``head`` and ``body`` and answers through the
    ``send_*`` coroutines, which wait when the client is slow (flow control /
    transport write buffer). For HTTP/1.1 the codec answers pipelined requests
    in order; for HTTP/2 streams are independent.
    """

    head: RequestHead
    body: BodyStream
    info: ConnectionInfo

    async def send_head(self, head: ResponseHead, *, end_stream: bool = False) -> None: ...

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None: ...

    async def send_trailers(self, trailers: Headers) -> None: ...

    def reset(self, code: str = "INTERNAL_ERROR") -> None:
        """Abort the response: RST_STREAM for HTTP/2, close the connection for HTTP/1.1."""
        ...

    @property
    def head_sent(self) -> bool: ...


# The connection manager's entry point, called once per request by a codec.
StreamHandler = Callable[[DownstreamStream], "asyncio.Future[None] | object"]


@dataclass(slots=True)
class UpstreamResponse:
    head: ResponseHead
    body: BodyStream
    # Abandon the exchange after the head arrived (the downstream went away):
    # HTTP/2 codecs reset just this stream. None: the codec has no such
    # operation and the pool closes the connection instead.
    cancel: Callable[[], None] | None = field(default=None, compare=False)
    # Informational (1xx other than 101) responses are not surfaced; 101 is,
    # and then ``body`` carries the upgraded byte stream.


class UpstreamConnection(Protocol):
    """A connection to one upstream host (HTTP/1.1 or HTTP/2)."""

    @property
    def available(self) -> bool:
        """Can take another request now (idle h1, h2 below max streams)."""
        ...

    @property
    def closed(self) -> bool: ...

    @property
    def active_requests(self) -> int: ...

    async def request(self, head: RequestHead, body: BodyStream | None) -> UpstreamResponse:
        """Send a request; returns once the response head arrived. The request
        body is streamed concurrently; the response body streams after return.
        Raises StreamReset if the connection or stream dies before the head."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CodecSettings:
    """What a downstream codec needs from http_connection_manager's config."""

    max_request_headers_kb: int = 60
    # Whole request head must arrive within this (408 otherwise); None: no limit.
    request_headers_timeout: float | None = 10.0
    # Connection with no active stream for this long is closed (h2: GOAWAY).
    idle_timeout: float | None = 3600.0
    # Bytes buffered per request body / per connection before reading pauses.
    buffer_limit: int = 1024 * 1024
    scheme: str = "http"  # "https" when the transport socket is TLS
    server_name: str = "meshlet"
    # HTTP/2
    max_concurrent_streams: int = 2147483647
    initial_stream_window_size: int = 65535 * 16
    initial_connection_window_size: int = 1024 * 1024
    # Called for every reply the codec makes itself (400, 408, 431, ...),
    # so the connection manager can count it and access-log it.
    on_local_reply: Callable[[int, str], None] | None = field(default=None, compare=False)
