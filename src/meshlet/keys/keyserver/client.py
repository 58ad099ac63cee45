"""``meshlet.keyserver``: the proxy's side of the key server.

The proxy holds only a handle (a key name) and the public key. Signing goes
over a small pool of pipelined Unix-socket connections. When the server goes
away, requests in flight on the lost connection fail at once with
``KeyProviderUnavailable`` (the TLS adapter turns that into an internal_error
alert on that one handshake); the next request reconnects, and while the
server stays down, attempts back off (0.05 s doubling to 2 s) and requests in
the back-off window fail fast. Settings::

    socket: PATH                (required)
    handle: NAME                (required)
    pool_size: 1..32            (default 2)
    request_timeout: seconds    (default 5)
    connect_timeout: seconds    (default 1)
    max_in_flight: 1..65536     (default 256)
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError
from meshlet.keys.base import (
    InFlightLimit,
    KeyProvider,
    KeyProviderError,
    KeyProviderUnavailable,
    ProviderUnavailable,
    Settings,
)
from meshlet.keys.keyserver.protocol import (
    FrameDecoder,
    ProtocolError,
    PublicKeyRequest,
    Request,
    Response,
    SignRequest,
    Status,
    decode_response,
    encode_request,
)

INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 2.0
_REQUEST_IDS = 1 << 32


class KeyServerError(KeyProviderError):
    """The key server answered with an error status."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"key server: {response.status.name}: {response.message}")
        self.status = response.status


# --------------------------------------------------------------------------- #
# Blocking calls (config time and the CLI)
# --------------------------------------------------------------------------- #


def call(socket_path: str, request: Request, timeout: float = 5.0) -> Response:
    """One request over a fresh blocking connection. OSError if unreachable."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(encode_request(request))
        decoder = FrameDecoder()
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("the key server closed the connection")
            for body in decoder.feed(data):
                response = decode_response(body)
                if response.request_id == request.request_id:
                    return response


def checked(response: Response) -> bytes:
    if response.status is not Status.OK:
        raise KeyServerError(response)
    return response.payload


def load_public_key(spki: bytes) -> CertificatePublicKeyTypes:
    key = serialization.load_der_public_key(spki)
    return key  # type: ignore[return-value]  # the server only holds certificate key types


# --------------------------------------------------------------------------- #
# The asyncio connection pool
# --------------------------------------------------------------------------- #


class _Connection(asyncio.Protocol):
    """One pipelined connection; responses are matched to requests by id."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.pending: dict[int, asyncio.Future[Response]] = {}
        self.lost = False
        self._ids = itertools.count(1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            for body in self.decoder.feed(data):
                response = decode_response(body)
                future = self.pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except ProtocolError as exc:
            self._fail_all(KeyProviderUnavailable(f"key server sent bad input: {exc}"))
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_all(KeyProviderUnavailable("connection to the key server was lost"))

    def _fail_all(self, error: Exception) -> None:
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def send(self, make: Callable[[int], Request]) -> tuple[int, asyncio.Future[Response]]:
        """Send ``make(request_id)``; the future gets its response."""
        assert self.transport is not None
        if self.lost or self.transport.is_closing():
            raise KeyProviderUnavailable("connection to the key server was lost")
        request_id = next(self._ids) % _REQUEST_IDS
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        self.transport.write(encode_request(make(request_id)))
        return request_id, future

    def forget(self, request_id: int) -> None:
        self.pending.pop(request_id, None)

    def close(self) -> None:
        if self.transport is not None:
            try:
                self.transport.close()
            except RuntimeError:  # its event loop is already closed
                pass


class KeyServerPool:
    """Up to ``size`` connections to the key server, opened on demand."""

    def __init__(self, socket_path: str, *, size: int = 2, connect_timeout: float = 1.0) -> None:
        self.socket_path = socket_path
        self.size = size
        self.connect_timeout = connect_timeout
        self.reconnects = 0
        self._connections: list[_Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next = 0
        self._backoff = 0.0
        self._retry_at = 0.0
        self._connecting: asyncio.Future[_Connection] | None = None
        self._connect_task: asyncio.Task[None] | None = None

    async def connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            self.close()
            self._loop = loop
        self._connections = [c for c in self._connections if not c.lost]
        live = self._connections
        if len(live) < self.size and self._connecting is None and time.monotonic() >= self._retry_at:
            self._connecting = loop.create_future()
            self._connect_task = loop.create_task(self._connect(self._connecting))
        if live:
            self._next = (self._next + 1) % len(live)
            return live[self._next]
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        raise KeyProviderUnavailable(
            f"key server at {self.socket_path} is unreachable "
            f"(next attempt in {self._retry_at - time.monotonic():.2f} s)"
        )

    async def _connect(self, done: asyncio.Future[_Connection]) -> None:
        try:
            done.set_result(await self._open())
        except Exception as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: a waiter-less failure is not an error to log
        finally:
            self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_unix_connection(_Connection, self.socket_path), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            self._backoff = min(MAX_BACKOFF, self._backoff * 2 or INITIAL_BACKOFF)
            self._retry_at = time.monotonic() + self._backoff
            raise KeyProviderUnavailable(f"key server at {self.socket_path} is unreachable: {exc}") from None
        if self._backoff:
            self.reconnects += 1
        self._backoff = 0.0
        self._retry_at = 0.0
        self._connections.append(conn)
        return conn

    def close(self) -> None:
        for conn in self._connections:
            conn.close()
        self._connections = []
        self._connecting = None


# --------------------------------------------------------------------------- #
# The provider
# --------------------------------------------------------------------------- #


class KeyServerProvider(KeyProvider):
    provider_name = "meshlet.keyserver"

    def __init__(
        self,
        socket_path: str,
        handle: str,
        public_key: CertificatePublicKeyTypes,
        *,
        pool_size: int = 2,
        request_timeout: float = 5.0,
        connect_timeout: float = 1.0,
        max_in_flight: int = 256,
    ) -> None:
        super().__init__(public_key)
        self.handle = handle
        self._pool = KeyServerPool(socket_path, size=pool_size, connect_timeout=connect_timeout)
        self._timeout = request_timeout
        self._limit = InFlightLimit(max_in_flight, request_timeout)

    async def _sign(self, scheme: int, data: bytes) -> bytes:
        await self._limit.acquire()
        try:
            conn = await self._pool.connection()
            request_id, future = conn.send(lambda rid: SignRequest(rid, self.handle, scheme, data))
            try:
                response = await asyncio.wait_for(future, self._timeout)
            except TimeoutError:
                raise KeyProviderUnavailable(
                    f"key server gave no answer within {self._timeout:g} s"
                ) from None
            finally:
                conn.forget(request_id)
            return checked(response)
        finally:
            self._limit.release()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "reconnects": self._pool.reconnects}

    def close(self) -> None:
        self._pool.close()


def build_keyserver(config: PrivateKeyProviderConfig) -> KeyServerProvider:
    settings = Settings(config.settings, KeyServerProvider.provider_name)
    settings.only("socket", "handle", "pool_size", "request_timeout", "connect_timeout", "max_in_flight")
    socket_path = settings.string("socket")
    handle = settings.string("handle")
    request_timeout = settings.number("request_timeout", 5.0, minimum=0.01, maximum=60.0)
    connect_timeout = settings.number("connect_timeout", 1.0, minimum=0.01, maximum=60.0)
    try:
        response = call(socket_path, PublicKeyRequest(0, handle), timeout=connect_timeout + request_timeout)
    except (OSError, ProtocolError) as exc:
        raise ProviderUnavailable(
            settings.field_path("socket"), f"cannot reach the key server at {socket_path}: {exc}"
        ) from None
    if response.status is Status.NOT_FOUND:
        raise ConfigError(settings.field_path("handle"), f"the key server has no key {handle!r}")
    if response.status is not Status.OK:
        raise ProviderUnavailable(settings.field_path("socket"), f"key server refused: {response.message}")
    try:
        public_key = load_public_key(response.payload)
    except ValueError:
        raise ProviderUnavailable(settings.field_path("socket"), "key server sent a bad public key") from None
    return KeyServerProvider(
        socket_path,
        handle,
        public_key,
        pool_size=settings.integer("pool_size", 2, minimum=1, maximum=32),
        request_timeout=request_timeout,
        connect_timeout=connect_timeout,
        max_in_flight=settings.integer("max_in_flight", 256, minimum=1, maximum=65536),
    )
