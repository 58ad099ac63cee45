"""A minimal HTTP/1.1 keep-alive client connection for load generation.

One request in flight per connection (no pipelining: that is how wrk, h2load
--h1 and browsers talk to a proxy). Responses are parsed with httptools so
chunked and content-length bodies both work; the body is counted, not kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools

# Called once per request: the connection, and the status (None: the request failed).
DoneCallback = Callable[["ClientConnection", "int | None"], None]


def build_request(method: str, path: str, host: str, headers: dict[str, str] | None = None,
                  body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ClientConnection(asyncio.Protocol):
    def __init__(self, on_done: DoneCallback) -> None:
        self.on_done = on_done
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.in_flight = False
        self.keep_alive = True
        self.body_bytes = 0
        # Free for the caller: e.g. the scheduled send time of the request in flight.
        self.tag: float = 0.0
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    async def open(cls, host: str, port: int, on_done: DoneCallback, timeout: float) -> ClientConnection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(lambda: cls(on_done), host, port), timeout)
        return conn

    @property
    def usable(self) -> bool:
        return self.transport is not None and self.keep_alive and not self.transport.is_closing()

    def send(self, request: bytes) -> None:
        if self.transport is None:
            raise ConnectionError("connection is closed")
        self.in_flight = True
        self.body_bytes = 0
        self.transport.write(request)

    def abort(self) -> None:
        """Give up on the request in flight (e.g. a timeout): it completes as failed."""
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol --------------------------------------------------- #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.keep_alive = False
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.keep_alive = False
        if self.in_flight:
            self.in_flight = False
            self.on_done(self, None)

    # -- httptools callbacks ------------------------------------------------ #

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        if not self.in_flight:
            return  # an unsolicited response: ignore it, the next send resets state
        self.in_flight = False
        self.keep_alive = self.parser.should_keep_alive()
        status = self.parser.get_status_code()
        if not self.keep_alive:
            self.close()
        self.on_done(self, status)


async def fetch(host: str, port: int, request: bytes, timeout: float) -> tuple[int | None, int]:
    """One request on a new connection: (status or None on failure, body bytes)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int | None] = loop.create_future()

    def finished(_conn: ClientConnection, status: int | None) -> None:
        if not done.done():
            done.set_result(status)

    try:
        conn = await ClientConnection.open(host, port, finished, timeout)
    except (OSError, TimeoutError):
        return None, 0
    try:
        conn.send(request)
        status = await asyncio.wait_for(done, timeout)
    except TimeoutError:
        status = None
    finally:
        conn.close()
    return status, conn.body_bytes
