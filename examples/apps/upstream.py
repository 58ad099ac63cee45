"""A small, fast HTTP/1.1 upstream app for meshlet's demo, tests and benchmarks.

Deliberately independent of meshlet (stdlib + httptools, uvloop when present)
so that it is a fair peer in interop tests and a cheap upstream in benchmarks:
the default response is a precomputed 1 KiB body over keep-alive.

Endpoints:
  /                 (and any other path) 200 with a 1 KiB body
  /status/<code>    a response with that status (e.g. /status/503)
  /delay/<ms>       200 after <ms> milliseconds (capped at 60 s)
  /bytes/<n>        200 with an n-byte body (capped at 16 MiB)
  /echo             200 echoing the request body (and its content-type)
  /headers          200 with a JSON object: method, path, version, headers
  any request with an Upgrade header gets 101 and then a raw byte echo

Run: ``python examples/apps/upstream.py --port 8080`` (``--port 0`` picks a
free port). The first line on stdout is ``listening on http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import signal
import sys
from collections import deque
from collections.abc import Callable

import httptools

DEFAULT_BODY = (b"meshlet sample upstream " * 43)[:1023] + b"\n"
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_DELAY_MS = 60_000
MAX_GENERATED_BYTES = 16 * 1024 * 1024
# The HTTP pipeline depth we accept before pausing reads: bounds memory per connection.
MAX_PENDING_RESPONSES = 64
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 204: "No Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
    413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


def build_response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"text/plain",
    extra: bytes = b"",
    head_only: bool = False,
    close: bool = False,
) -> bytes:
    reason = REASONS.get(status, "Status").encode()
    bodyless = status in (204, 304) or status < 200
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        b"content-type: " + content_type + b"\r\n",
        b"" if bodyless else b"content-length: %d\r\n" % len(body),
        extra,
        b"connection: close\r\n" if close else b"",
        b"\r\n",
    ]
    if not head_only and not bodyless:
        parts.append(body)
    return b"".join(parts)


class Slot:
    __slots__ = ("response",)

    def __init__(self) -> None:
        self.response: bytes | None = None


class Request:
    __slots__ = ("body", "body_size", "content_type", "headers", "method", "path", "version")

    def __init__(self) -> None:
        self.method = b""
        self.path = b""
        self.version = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b"application/octet-stream"
        self.body: list[bytes] = []
        self.body_size = 0


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse with httptools, answer in request order."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.request = Request()
        self.url = b""
        self.header_bytes = 0
        # Responses in request order; a slot whose response is None is still being
        # produced (a delay), and holds back the ones behind it.
        self.slots: deque[Slot] = deque()
        self.close_after_flush = False
        self.upgraded = False
        self.reading_paused = False

    # -- transport callbacks ------------------------------------------------ #

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        self.app.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self._write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._start_tunnel(data[offset:])
        except httptools.HttpParserError:
            # httptools wraps exceptions raised in callbacks, so the cause is a flag.
            if self.header_bytes > MAX_HEADER_BYTES:
                self._fail(431, b"request headers too large\n")
            else:
                self._fail(400, b"malformed request\n")

    def eof_received(self) -> bool | None:
        # Half-close from the client: finish pending responses, then close.
        self.close_after_flush = True
        self._flush()
        return True

    # -- httptools callbacks ------------------------------------------------ #

    def on_message_begin(self) -> None:
        self.request = Request()
        self.url = b""
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        name = name.lower()
        self.request.headers.append((name, value))
        if name == b"content-type":
            self.request.content_type = value

    def on_headers_complete(self) -> None:
        req = self.request
        req.method = self.parser.get_method()
        req.version = self.parser.get_http_version()
        req.path = self.url
        for name, value in req.headers:
            if name == b"expect" and value.lower() == b"100-continue" and not self.slots:
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self.request
        req.body_size += len(body)
        # Only /echo needs the bytes; everything else just counts them.
        if req.body_size <= MAX_BODY_BYTES and req.path.startswith(b"/echo"):
            req.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # answered when httptools raises HttpParserUpgrade
        keep_alive = self.parser.should_keep_alive()
        self.app.handle(self, self.request, keep_alive)

    # -- responses ---------------------------------------------------------- #

    def reserve_slot(self) -> Slot:
        slot = Slot()
        self.slots.append(slot)
        if len(self.slots) >= MAX_PENDING_RESPONSES and self.transport and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        return slot

    def fill_slot(self, slot: Slot, response: bytes, keep_alive: bool) -> None:
        if not keep_alive:
            self.close_after_flush = True
        slot.response = response
        self._flush()

    def respond(self, response: bytes, keep_alive: bool) -> None:
        if not self.slots:
            # The common case: nothing queued ahead, write straight away.
            self._write(response)
            if not keep_alive:
                self._close()
            return
        self.fill_slot(self.reserve_slot(), response, keep_alive)

    def _flush(self) -> None:
        while self.slots:
            response = self.slots[0].response
            if response is None:
                break
            self.slots.popleft()
            self._write(response)
        if self.reading_paused and self.transport and len(self.slots) < MAX_PENDING_RESPONSES:
            self.transport.resume_reading()
            self.reading_paused = False
        if self.close_after_flush and not self.slots:
            self._close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, status: int, message: bytes) -> None:
        self.slots.clear()
        self._write(build_response(status, message, close=True))
        self._close()

    def _count_header_bytes(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _HeadersTooLarge

    def _start_tunnel(self, rest: bytes) -> None:
        req = self.request
        req.method = self.parser.get_method()
        req.path = self.url
        headers = dict(req.headers)
        protocol = headers.get(b"upgrade", b"")
        extra = b"upgrade: " + protocol + b"\r\nconnection: upgrade\r\n"
        key = headers.get(b"sec-websocket-key")
        if key is not None:
            accept = base64.b64encode(hashlib.sha1(key.strip() + WEBSOCKET_GUID).digest())
            extra += b"sec-websocket-accept: " + accept + b"\r\n"
        self._write(b"HTTP/1.1 101 Switching Protocols\r\n" + extra + b"\r\n")
        self.upgraded = True
        if rest:
            self._write(rest)


class _HeadersTooLarge(Exception):
    """Raised from a parser callback to stop parsing an oversized header block."""


Handler = Callable[[UpstreamProtocol, Request, bool], None]


class App:
    def __init__(self, name: str = "") -> None:
        self.connections: set[UpstreamProtocol] = set()
        served_by = b"x-served-by: " + name.encode() + b"\r\n" if name else b""
        self.served_by = served_by
        self.default_response = build_response(200, DEFAULT_BODY, extra=served_by)
        self.default_head_response = build_response(200, DEFAULT_BODY, extra=served_by, head_only=True)

    def handle(self, conn: UpstreamProtocol, req: Request, keep_alive: bool) -> None:
        path = req.path.split(b"?", 1)[0]
        head = req.method == b"HEAD"
        if path.startswith(b"/status/"):
            status = _int_or(path[8:], 200, 100, 599)
            conn.respond(self._response(status, b"status %d\n" % status, head, keep_alive), keep_alive)
        elif path.startswith(b"/delay/"):
            delay_ms = _int_or(path[7:], 0, 0, MAX_DELAY_MS)
            slot = conn.reserve_slot()
            response = self._response(200, b"delayed %d ms\n" % delay_ms, head, keep_alive)
            loop = asyncio.get_running_loop()
            loop.call_later(delay_ms / 1000, conn.fill_slot, slot, response, keep_alive)
        elif path.startswith(b"/bytes/"):
            size = _int_or(path[7:], 0, 0, MAX_GENERATED_BYTES)
            conn.respond(self._response(200, b"x" * size, head, keep_alive), keep_alive)
        elif path == b"/echo":
            conn.respond(self._echo(req, head, keep_alive), keep_alive)
        elif path == b"/headers":
            conn.respond(self._headers(req, head, keep_alive), keep_alive)
        elif keep_alive:
            conn.respond(self.default_head_response if head else self.default_response, True)
        else:
            conn.respond(self._response(200, DEFAULT_BODY, head, False), False)

    def _response(self, status: int, body: bytes, head: bool, keep_alive: bool,
                  content_type: bytes = b"text/plain") -> bytes:
        return build_response(status, body, content_type=content_type, extra=self.served_by,
                              head_only=head, close=not keep_alive)

    def _echo(self, req: Request, head: bool, keep_alive: bool) -> bytes:
        if req.body_size > MAX_BODY_BYTES:
            return self._response(413, b"request body too large\n", head, keep_alive)
        return self._response(200, b"".join(req.body), head, keep_alive, req.content_type)

    def _headers(self, req: Request, head: bool, keep_alive: bool) -> bytes:
        doc = {
            "method": req.method.decode("latin-1"),
            "path": req.path.decode("latin-1"),
            "version": req.version,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers],
            "body_bytes": req.body_size,
        }
        body = json.dumps(doc).encode() + b"\n"
        return self._response(200, body, head, keep_alive, b"application/json")


def _int_or(text: bytes, default: int, low: int, high: int) -> int:
    try:
        value = int(text.split(b"/", 1)[0])
    except ValueError:
        return default
    return min(max(value, low), high)


async def serve(host: str, port: int, name: str) -> None:
    loop = asyncio.get_running_loop()
    app = App(name)
    server = await loop.create_server(lambda: UpstreamProtocol(app), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()
    shown_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"listening on http://{shown_host}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for conn in list(app.connections):
        conn._close()
    try:
        await asyncio.wait_for(server.wait_closed(), timeout=2)
    except TimeoutError:
        pass  # a client still holding a connection must not keep us alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="meshlet sample upstream HTTP app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--name", default="", help="sent back in an x-served-by header")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        runner: Callable[..., object] = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(args.host, args.port, args.name))
    except OSError as exc:
        print(f"upstream: error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
