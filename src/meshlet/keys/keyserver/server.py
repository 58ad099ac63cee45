"""The key server: holds private keys in its own process, signs by handle.

An asyncio Unix-socket server. Each connection's peer is identified by
``SO_PEERCRED`` (the kernel's word, not the client's) and must be on the
allow-list; ``generate`` and ``import`` also need an admin uid. Requests are
bounded in size (``protocol.MAX_FRAME``), rate-limited per connection and
globally (token buckets; an empty bucket answers RATE_LIMITED at once),
bounded in flight (BUSY beyond the global limit; a connection past its own
limit stops being read), and every operation has a timeout. Signing runs in
a thread pool (OpenSSL releases the GIL) so the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from meshlet.keys.keyserver.protocol import (
    FrameDecoder,
    GenerateRequest,
    ImportRequest,
    ListRequest,
    ProtocolError,
    PublicKeyRequest,
    Request,
    Response,
    SignRequest,
    Status,
    decode_request,
    encode_response,
)
from meshlet.keys.keyserver.store import KeyExists, KeyStore, KeyStoreError, UnknownKey, spki_der

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return PeerCredentials(*_PEERCRED.unpack(raw))


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class ServerPolicy:
    allowed_uids: frozenset[int] = field(default_factory=lambda: frozenset({os.geteuid()}))
    admin_uids: frozenset[int] = field(default_factory=lambda: frozenset({os.geteuid()}))
    rate: float = 20000.0  # requests per second, all connections together
    burst: float = 2000.0
    connection_rate: float = 5000.0
    connection_burst: float = 500.0
    max_in_flight: int = 256
    max_connection_in_flight: int = 64
    max_connections: int = 1024
    operation_timeout: float = 5.0
    frame_timeout: float = 5.0  # a started frame must complete within this
    idle_timeout: float = 600.0
    sign_workers: int = max(1, min(4, os.cpu_count() or 1))


class KeyServer:
    def __init__(self, store: KeyStore, policy: ServerPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or ServerPolicy()
        self.in_flight = 0
        self.connections: set[_Connection] = set()
        self.counters: dict[str, int] = dict.fromkeys(
            ("connections", "refused_peers", "requests", "signs", "errors", "rate_limited", "busy",
             "protocol_errors", "timeouts"), 0)
        self._bucket = TokenBucket(self.policy.rate, self.policy.burst)
        self._executor = ThreadPoolExecutor(self.policy.sign_workers, thread_name_prefix="meshlet-keyserver")
        self._server: asyncio.AbstractServer | None = None

    async def start(self, socket_path: Path) -> None:
        loop = asyncio.get_running_loop()
        if _socket_is_live(socket_path):
            raise OSError(errno.EADDRINUSE, f"another key server is serving on {socket_path}")
        _remove_stale_socket(socket_path)
        self._server = await loop.create_unix_server(lambda: _Connection(self), str(socket_path))
        # Other uids on the allow-list must be able to connect; SO_PEERCRED
        # is the check, the file mode only keeps everyone else out early.
        others = self.policy.allowed_uids - {os.geteuid()}
        os.chmod(socket_path, 0o666 if others else 0o600)
        log.info("key server listening on %s with %d keys", socket_path, len(self.store.names()))

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.abort()
            await self._server.wait_closed()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- admission ----------------------------------------------------------- #

    def admit(self, peer: PeerCredentials) -> bool:
        if peer.uid not in self.policy.allowed_uids:
            self.counters["refused_peers"] += 1
            log.warning("refused key server peer pid=%d uid=%d: uid not allowed", peer.pid, peer.uid)
            return False
        if len(self.connections) >= self.policy.max_connections:
            self.counters["refused_peers"] += 1
            log.warning("refused key server peer pid=%d: too many connections", peer.pid)
            return False
        return True

    def throttle(self, conn: _Connection, request_id: int) -> Response | None:
        """A refusal for a request over a rate or in-flight limit, else None."""
        if not conn.bucket.take() or not self._bucket.take():
            self.counters["rate_limited"] += 1
            return Response(request_id, Status.RATE_LIMITED, b"rate limit exceeded")
        if self.in_flight >= self.policy.max_in_flight:
            self.counters["busy"] += 1
            return Response(request_id, Status.BUSY, b"too many operations in flight")
        return None

    # -- operations --------------------------------------------------------- #

    async def execute(self, request: Request, peer: PeerCredentials) -> Response:
        self.counters["requests"] += 1
        rid = request.request_id
        try:
            return await asyncio.wait_for(self._dispatch(request, peer), self.policy.operation_timeout)
        except TimeoutError:
            self.counters["timeouts"] += 1
            return Response(rid, Status.INTERNAL, b"operation timed out")
        except UnknownKey as exc:
            return self._error(rid, Status.NOT_FOUND, exc)
        except KeyExists as exc:
            return self._error(rid, Status.EXISTS, exc)
        except (KeyStoreError, ValueError) as exc:
            return self._error(rid, Status.BAD_REQUEST, exc)
        except PermissionError as exc:
            return self._error(rid, Status.FORBIDDEN, exc)
        except Exception as exc:
            log.exception("key server operation failed")
            return self._error(rid, Status.INTERNAL, exc)

    def _error(self, request_id: int, status: Status, exc: Exception) -> Response:
        self.counters["errors"] += 1
        return Response(request_id, status, str(exc).encode())

    async def _dispatch(self, request: Request, peer: PeerCredentials) -> Response:
        rid = request.request_id
        if isinstance(request, SignRequest):
            signature = await self._in_pool(self.store.sign, request.handle, request.scheme, request.data)
            self.counters["signs"] += 1
            return Response(rid, Status.OK, signature)
        if isinstance(request, PublicKeyRequest):
            return Response(rid, Status.OK, spki_der(self.store.public_key(request.handle)))
        if isinstance(request, ListRequest):
            return Response(rid, Status.OK, "\n".join(self.store.names()).encode())
        if peer.uid not in self.policy.admin_uids:
            raise PermissionError(f"uid {peer.uid} may not add keys")
        if isinstance(request, GenerateRequest):
            public = await self._in_pool(self.store.generate, request.key_type, request.name)
            log.info("generated key %r (%s) for uid %d", request.name, request.key_type, peer.uid)
        else:
            assert isinstance(request, ImportRequest)
            public = await self._in_pool(self.store.import_pem, request.name, request.pem)
            log.info("imported key %r for uid %d", request.name, peer.uid)
        return Response(rid, Status.OK, spki_der(public))

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def stats(self) -> dict[str, int]:
        return {**self.counters, "in_flight": self.in_flight, "open_connections": len(self.connections)}


class _Connection(asyncio.Protocol):
    def __init__(self, server: KeyServer) -> None:
        self.server = server
        policy = server.policy
        self.bucket = TokenBucket(policy.connection_rate, policy.connection_burst)
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.peer = PeerCredentials(0, -1, -1)
        self.pending: set[asyncio.Task[None]] = set()
        self.paused = False
        self._frame_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_active = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        try:
            self.peer = peer_credentials(transport.get_extra_info("socket"))
        except OSError:
            self.transport.abort()
            return
        if not self.server.admit(self.peer):
            self.transport.abort()
            return
        self.server.connections.add(self)
        self.server.counters["connections"] += 1
        loop = asyncio.get_running_loop()
        self._last_active = loop.time()
        self._idle_timer = loop.call_later(self.server.policy.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for timer in (self._frame_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        for task in self.pending:
            task.cancel()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _check_idle(self) -> None:
        # One timer per connection, re-armed lazily: no timer churn per request.
        loop = asyncio.get_running_loop()
        idle_for = loop.time() - self._last_active
        if idle_for >= self.server.policy.idle_timeout and not self.pending:
            self.server.counters["timeouts"] += 1
            self.abort()
            return
        remaining = max(self.server.policy.idle_timeout - idle_for, 1.0)
        self._idle_timer = loop.call_later(remaining, self._check_idle)

    def _frame_expired(self) -> None:
        self.server.counters["timeouts"] += 1
        self.abort()

    def data_received(self, data: bytes) -> None:
        if self not in self.server.connections:
            return  # refused in connection_made; abort is on its way
        self._last_active = asyncio.get_running_loop().time()
        try:
            bodies = self.decoder.feed(data)
            requests = [decode_request(body) for body in bodies]
        except ProtocolError as exc:
            self.server.counters["protocol_errors"] += 1
            log.warning("key server peer pid=%d sent bad input: %s", self.peer.pid, exc)
            self.abort()
            return
        self._watch_partial_frame()
        for request in requests:
            self._start(request)

    def _watch_partial_frame(self) -> None:
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
        if self.decoder.partial:
            loop = asyncio.get_running_loop()
            self._frame_timer = loop.call_later(self.server.policy.frame_timeout, self._frame_expired)

    def _start(self, request: Request) -> None:
        refusal = self.server.throttle(self, request.request_id)
        if refusal is not None:
            self._send(refusal)
            return
        task = asyncio.get_running_loop().create_task(self._run(request))
        self.pending.add(task)
        self.server.in_flight += 1
        if len(self.pending) >= self.server.policy.max_connection_in_flight and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    async def _run(self, request: Request) -> None:
        try:
            self._send(await self.server.execute(request, self.peer))
        finally:
            self.server.in_flight -= 1
            task = asyncio.current_task()
            if task is not None:
                self.pending.discard(task)
            if self.paused and len(self.pending) < self.server.policy.max_connection_in_flight:
                self.paused = False
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.resume_reading()

    def _send(self, response: Response) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_response(response))


async def run_key_server(
    socket_path: Path, key_dir: Path, policy: ServerPolicy | None = None,
    ready: Callable[[KeyServer], None] | None = None,
) -> None:
    """Serve until cancelled (the CLI's ``meshlet keyserver run``)."""
    store = KeyStore(key_dir)
    server = KeyServer(store, policy)
    await server.start(socket_path)
    if ready is not None:
        ready(server)
    try:
        await server.serve_forever()
    finally:
        await server.close()
        _remove_stale_socket(socket_path)


def _socket_is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def _remove_stale_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
