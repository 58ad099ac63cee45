"""Choosing the downstream codec for a new connection.

ALPN decides on TLS ("h2" or "http/1.1"); otherwise ``codec_type`` does; on
plaintext with ``AUTO`` the first bytes do: the HTTP/2 connection preface
(``PRI * HTTP/2.0``) means prior-knowledge HTTP/2, anything else HTTP/1.1
(as Envoy). ``DownstreamConnection`` is the protocol the listener installs:
it holds the first bytes until it can decide, then forwards every event to
the chosen codec, and counts the connection in the manager's stats.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from meshlet.config.model import CodecType
from meshlet.proxy.http.stream import DownstreamStream

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

HTTP1 = "http1"
HTTP2 = "http2"


def choose_codec(codec_type: CodecType, alpn: str) -> str | None:
    """The codec a connection uses, or None when the first bytes must decide."""
    if alpn == "h2":
        return HTTP2
    if alpn in ("http/1.1", "http/1.0"):
        return HTTP1
    if codec_type is CodecType.HTTP2:
        return HTTP2
    if codec_type is CodecType.HTTP1:
        return HTTP1
    return None


def sniff(data: bytes) -> str | None:
    """HTTP2 if ``data`` starts with the preface, HTTP1 as soon as it cannot,
    None while ``data`` is a proper prefix of the preface."""
    if data.startswith(H2_PREFACE):
        return HTTP2
    if H2_PREFACE.startswith(data):
        return None
    return HTTP1


CodecFactory = Callable[[str], asyncio.Protocol]
Handler = Callable[[DownstreamStream], Awaitable[None]]
# A handler told which task serves the request (looked up once, here).
TaskHandler = Callable[[DownstreamStream, "asyncio.Task[object] | None"], Awaitable[None]]


class DownstreamConnection(asyncio.Protocol):
    """Installed by the listener; delegates to the codec once chosen."""

    __slots__ = ("_buffer", "_codec", "_kind", "_loop", "_make_codec", "_on_close", "_tasks", "_transport")

    def __init__(
        self, kind: str | None, make_codec: CodecFactory, on_close: Callable[[str | None], None]
    ) -> None:
        self._kind = kind
        self._make_codec = make_codec
        self._on_close = on_close
        self._codec: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer = b""
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def codec(self) -> asyncio.Protocol | None:
        return self._codec

    def guard(self, handler: TaskHandler) -> Handler:
        """Wrap the request handler so that requests still being served when
        the connection goes away are cancelled (and with them their upstream
        requests): nobody is left to read the answer."""
        tasks = self._tasks

        async def guarded(stream: DownstreamStream) -> None:
            # With the loop given, current_task skips get_running_loop (a
            # getpid system call per request on Python 3.11).
            task = asyncio.current_task(self._loop) if self._loop is not None else asyncio.current_task()
            if task is None:
                await handler(stream, None)
                return
            tasks.add(task)
            try:
                await handler(stream, task)
            finally:
                tasks.discard(task)

        return guarded

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        if self._kind is not None:
            self._start(self._kind)

    def _start(self, kind: str) -> None:
        self._kind = kind
        codec = self._codec = self._make_codec(kind)
        assert self._transport is not None
        codec.connection_made(self._transport)

    def data_received(self, data: bytes) -> None:
        codec = self._codec
        if codec is not None:
            codec.data_received(data)
            return
        data = self._buffer + data if self._buffer else data
        kind = sniff(data)
        if kind is None:
            self._buffer = data  # at most len(H2_PREFACE) - 1 bytes
            return
        self._buffer = b""
        self._start(kind)
        assert self._codec is not None
        self._codec.data_received(data)

    def eof_received(self) -> bool | None:
        if self._codec is None:
            # EOF before a decision: a client that sent (almost) nothing.
            if self._transport is not None:
                self._transport.close()
            return False
        return self._codec.eof_received()

    def pause_writing(self) -> None:
        if self._codec is not None:
            self._codec.pause_writing()

    def resume_writing(self) -> None:
        if self._codec is not None:
            self._codec.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._codec is not None:
            self._codec.connection_lost(exc)
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._on_close(self._kind if self._codec is not None else None)

    def drain(self) -> None:
        """Graceful shutdown (listener drain): the codec's own drain, or close
        a connection that has not chosen a codec yet."""
        codec = self._codec
        drain = getattr(codec, "drain", None)
        if drain is not None:
            drain()
        elif codec is None and self._transport is not None:
            self._transport.close()

    def close(self) -> None:
        codec = self._codec
        close = getattr(codec, "close", None)
        if close is not None:
            close()
        elif self._transport is not None:
            self._transport.close()
