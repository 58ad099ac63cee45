"""The server side of ``meshlet bench tls``: one TLS listener on one engine.

Run as ``python -m meshlet.bench.tls_server --engine meshlet|stdlib-ssl
--cert PEM --key PEM``; it prints ``listening on 127.0.0.1:PORT`` once bound
and serves until SIGTERM. The listener is built from the real transport socket
factories (``MeshletTlsSocketFactory`` / ``OpenSslTransportSocketFactory``)
from a ``TlsContext``, on uvloop, so the benchmark measures what the proxy runs.

After the handshake the connection speaks a tiny protocol:

- ``GET ...`` (what ``openssl s_time -www`` sends): a fixed HTTP/1.0 reply,
  then close; reading the reply is what makes a TLS 1.3 client take the
  session ticket that ``s_time -reuse`` resumes with;
- ``BULK <n>\\n`` then ``n`` bytes: the bytes are discarded, and ``DONE\\n``
  is written once all ``n`` arrived (the end mark of the upload measurement);
- ``SEND <n>\\n``: the server writes ``n`` bytes as fast as the transport's
  flow control lets it (the download measurement);
- anything else, or no request at all: the connection is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import cast

import uvloop

from meshlet.config.model import TlsCertificate, TlsContext
from meshlet.proxy.transport import HandshakeError, SecurityInfo, TransportSocketFactory

ENGINES = ("meshlet", "stdlib-ssl")
# OpenSSL's server picks AES-256-GCM first; meshlet is told to prefer it too so
# both engines move bulk data under the same cipher suite.
MESHLET_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256")
HTTP_REPLY = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
MAX_REQUEST_LINE = 64
MAX_BULK_BYTES = 1 << 40
HANDSHAKE_TIMEOUT = 10.0
SEND_CHUNK = 1 << 18
SEND_PAYLOAD = bytes(range(256)) * (SEND_CHUNK // 256)
BACKLOG = 1024


def build_context(engine: str, cert_pem: bytes, key_pem: bytes) -> TlsContext:
    suites = MESHLET_SUITES if engine == "meshlet" else ()
    return TlsContext(
        server_side=True,
        certificates=(TlsCertificate(cert_chain_pem=cert_pem, private_key_pem=key_pem, source="bench"),),
        min_version="TLSv1_3",
        max_version="TLSv1_3",
        cipher_suites=suites,
        engine=engine,
    )


def build_factory(engine: str, context: TlsContext) -> TransportSocketFactory:
    if engine == "meshlet":
        from meshlet.tls.aio import MeshletTlsSocketFactory

        factory = MeshletTlsSocketFactory.from_context(context)
        factory.handshake_timeout = HANDSHAKE_TIMEOUT
        return factory
    if engine == "stdlib-ssl":
        from meshlet.proxy.listeners.tls_openssl import OpenSslTransportSocketFactory

        return OpenSslTransportSocketFactory(context, handshake_timeout=HANDSHAKE_TIMEOUT)
    raise ValueError(f"unknown TLS engine {engine!r} (known: {', '.join(ENGINES)})")


class BenchApp(asyncio.Protocol):
    """The plaintext side: answers GET, sinks BULK, closes on anything else."""

    __slots__ = ("_head", "_paused", "_remaining", "_to_send", "_transport")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._remaining = -1  # bytes of BULK payload still expected; -1: no request yet
        self._to_send = 0  # bytes of a SEND still to write
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        remaining = self._remaining
        if remaining > 0:
            # The bulk hot path: count and drop.
            remaining -= len(data)
            self._remaining = remaining
            if remaining <= 0:
                self._bulk_done(remaining)
            return
        if remaining == -1:
            self._request(data)
        else:
            self._close()  # nothing is expected after DONE

    def _request(self, data: bytes) -> None:
        head = self._head + data
        if head.startswith(b"GET "):
            self._reply(HTTP_REPLY)
            self._close()
            return
        end = head.find(b"\n")
        if end < 0:
            if len(head) > MAX_REQUEST_LINE:
                self._close()
            else:
                self._head = head
            return
        self._head = b""
        parts = head[:end].split()
        if len(parts) != 2 or parts[0] not in (b"BULK", b"SEND") or not parts[1].isdigit():
            self._close()
            return
        total = int(parts[1])
        if not 0 < total <= MAX_BULK_BYTES:
            self._close()
            return
        if parts[0] == b"SEND":
            self._remaining = 0
            self._to_send = total
            self._send_more()
            return
        self._remaining = total
        rest = head[end + 1:]
        if rest:
            self.data_received(rest)

    def _bulk_done(self, remaining: int) -> None:
        self._remaining = 0
        if remaining < 0:
            self._close()  # more than announced: a broken client
            return
        self._reply(b"DONE\n")

    def _send_more(self) -> None:
        transport = self._transport
        while self._to_send > 0 and not self._paused and transport is not None:
            size = min(self._to_send, SEND_CHUNK)
            transport.write(SEND_PAYLOAD if size == SEND_CHUNK else SEND_PAYLOAD[:size])
            self._to_send -= size

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._send_more()

    def _reply(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


def _new_app(_security: SecurityInfo) -> asyncio.BaseProtocol:
    return BenchApp()


def _ignore_failure(_error: HandshakeError) -> None:
    """A failed handshake closes its own connection; the benchmark's clients
    count their failures."""


class Acceptor(asyncio.Protocol):
    """Hands each accepted raw connection to the engine's transport socket."""

    __slots__ = ("_factory",)

    def __init__(self, factory: TransportSocketFactory) -> None:
        self._factory = factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        raw = cast(asyncio.Transport, transport)
        self._factory.create().start(raw, _new_app, on_failure=_ignore_failure)


async def serve(factory: TransportSocketFactory, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Acceptor(factory), host, port, backlog=BACKLOG)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    async with server:
        await stop.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m meshlet.bench.tls_server", description=__doc__)
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--cert", type=Path, required=True, help="certificate chain, PEM")
    parser.add_argument("--key", type=Path, required=True, help="private key, PEM")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    context = build_context(args.engine, args.cert.read_bytes(), args.key.read_bytes())
    factory = build_factory(args.engine, context)
    uvloop.run(serve(factory, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
