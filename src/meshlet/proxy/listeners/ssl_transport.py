"""The asyncio adapter that runs a stdlib ``ssl.SSLObject`` over a raw transport.

asyncio's own ``start_tls`` cannot be used: the TLS inspector has already
read the first bytes of the connection, and they must be fed to the TLS
engine before anything else. So the engine runs on memory BIOs:

    raw transport  ──ciphertext──►  SslConnection (asyncio.Protocol)  ──plaintext──►  app protocol
                   ◄──ciphertext──  (SSLObject + BIOs)                ◄──write()────  TlsAppTransport

Backpressure crosses in both directions: the app pausing its transport
pauses the raw socket (and plaintext is only decrypted while the app reads),
and the raw transport's pause/resume_writing reaches the app protocol.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from meshlet.proxy.transport import AppProtocolFactory, HandshakeError, SecurityInfo

log = logging.getLogger(__name__)

# Plaintext handed to the app per SSLObject.read call.
_READ_CHUNK = 256 * 1024

Verifier = Callable[[ssl.SSLObject], SecurityInfo]
"""Checks the established session (SAN matching, ...) and describes it;
raises ``HandshakeError`` to refuse the peer."""


def classify_ssl_error(exc: ssl.SSLError) -> HandshakeError:
    """A handshake ``SSLError`` as a ``HandshakeError`` with its Envoy stat name."""
    reason = exc.reason or ""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return HandshakeError(
            f"peer certificate verification failed: {exc.verify_message}",
            alert="bad_certificate", stat="fail_verify_error",
        )
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return HandshakeError(
            "peer did not present a certificate", alert="certificate_required", stat="fail_verify_no_cert"
        )
    alert = ""
    for marker in ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_"):
        if reason.startswith(marker):
            alert = reason[len(marker):].lower()
            return HandshakeError(f"peer sent TLS alert {alert}", alert=alert, local=False)
    return HandshakeError(f"TLS handshake failed: {reason or exc}", alert=alert)


class SslConnection(asyncio.Protocol):
    """One TLS connection: the protocol of the raw transport."""

    def __init__(
        self,
        sslobj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        *,
        app_factory: AppProtocolFactory,
        verify: Verifier,
        on_failure: Callable[[HandshakeError], None] | None,
        handshake_timeout: float | None,
        on_closed: Callable[[ssl.SSLObject], None] | None = None,
    ) -> None:
        self._ssl = sslobj
        # Called once an established connection is gone (client session caching).
        self._on_closed = on_closed
        self._incoming = incoming
        self._outgoing = outgoing
        self._app_factory = app_factory
        self._verify = verify
        self._on_failure = on_failure
        self._handshake_timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._raw: asyncio.Transport | None = None
        self._app: asyncio.BaseProtocol | None = None
        self._app_transport: TlsAppTransport | None = None
        self.security: SecurityInfo | None = None
        self._closing = False
        # close_notify sent (write_eof): reads go on until the peer closes.
        self._write_closed = False
        self._lost = False
        self._app_reading = True
        self._resume_scheduled = False

    # -- raw side -------------------------------------------------------- #

    def start(self, raw: asyncio.Transport, initial_data: bytes) -> None:
        self._raw = raw
        raw.set_protocol(self)
        if self._handshake_timeout is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._handshake_timeout, self._handshake_timed_out)
        if initial_data:
            self._incoming.write(initial_data)
        self._step_handshake()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The raw transport is handed over with set_protocol, not through here.
        pass

    def data_received(self, data: bytes) -> None:
        if self._closing and self._app is None:
            return
        self._incoming.write(data)
        if self._app is None:
            self._step_handshake()
        elif self._app_reading:
            self._read_plaintext()

    def eof_received(self) -> bool | None:
        if self._app is None:
            self._fail(HandshakeError("peer closed the connection during the TLS handshake", local=False))
            return False
        self._deliver_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timer()
        if self._app is None:
            if not self._closing:
                self._fail(HandshakeError("connection lost during the TLS handshake", local=False))
            return
        try:
            self._app.connection_lost(exc)
        finally:
            if self._on_closed is not None:
                self._on_closed(self._ssl)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # -- handshake ------------------------------------------------------- #

    def _step_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert OpenSSL queued for the peer
            self._fail(classify_ssl_error(exc))
            return
        self._flush()
        try:
            security = self._verify(self._ssl)
        except HandshakeError as exc:
            self._fail(exc)
            return
        self._established(security)

    def _established(self, security: SecurityInfo) -> None:
        self._cancel_timer()
        self.security = security
        app = self._app_factory(security)
        self._app = app
        self._app_transport = TlsAppTransport(self, app)
        app.connection_made(self._app_transport)
        # Application data may have arrived together with the last handshake flight.
        if self._app_reading and not self._closing:
            self._read_plaintext()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._app is None:
            self._fail(HandshakeError("TLS handshake timed out"))

    def _fail(self, err: HandshakeError) -> None:
        if self._closing:
            return
        self._closing = True
        self._cancel_timer()
        if self._on_failure is not None:
            self._on_failure(err)
        if self._raw is not None and not self._lost:
            self._raw.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- established ----------------------------------------------------- #

    def _read_plaintext(self) -> None:
        app = self._app
        assert app is not None
        incoming = self._incoming
        sslobj = self._ssl
        while self._app_reading and not self._closing:
            # Skip the read that could only raise SSLWantReadError (exceptions are costly).
            if not incoming.pending and not sslobj.pending():
                break
            try:
                chunk = sslobj.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._flush()
                self._deliver_eof()
                return
            except ssl.SSLError as exc:
                log.debug("TLS read failed: %s", exc)
                self._flush()
                self.abort()
                return
            if not chunk:
                # Reading the peer's close_notify makes SSLObject.read return
                # b"" rather than raise SSLZeroReturnError (CPython's _ssl):
                # the peer is done sending, so the app gets its EOF now.
                self._flush()
                self._deliver_eof()
                return
            if isinstance(app, asyncio.Protocol):
                app.data_received(chunk)
        # Reads can produce records to send (TLS 1.3 key updates, alerts).
        self._flush()

    def _deliver_eof(self) -> None:
        app = self._app
        keep_open = isinstance(app, asyncio.Protocol) and app.eof_received()
        if not keep_open:
            self.close()

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None and not self._lost:
            self._raw.write(self._outgoing.read())

    # -- called by TlsAppTransport --------------------------------------- #

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._write_closed or not data:
            return
        view = memoryview(data)
        try:
            while view:
                written = self._ssl.write(view)
                view = view[written:]
        except ssl.SSLError as exc:
            log.debug("TLS write failed: %s", exc)
            self.abort()
            return
        self._flush()

    def write_eof(self) -> None:
        """Half-close: send close_notify and keep reading until the peer closes.

        TLS 1.3 lets either side close its write direction alone (RFC 8446
        §6.1), so an HTTP/1.1 server can end a ``Connection: close`` response
        at once without risking the RST that closing a socket with unread
        input causes; the peer answers with its own close_notify or a FIN."""
        if self._closing or self._write_closed:
            return
        self._write_closed = True
        try:
            self._ssl.unwrap()  # queues close_notify; the peer's is awaited by reading on
        except ssl.SSLError:
            pass
        self._flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._ssl.unwrap()  # queues close_notify
        except ssl.SSLError:
            pass
        self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def pause_reading(self) -> None:
        if self._app_reading:
            self._app_reading = False
            if self._raw is not None:
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._app_reading:
            return
        self._app_reading = True
        if self._raw is not None and not self._lost:
            self._raw.resume_reading()
        if not self._resume_scheduled:
            # Not re-entrant: the app may call this from inside data_received.
            self._resume_scheduled = True
            asyncio.get_running_loop().call_soon(self._resume_plaintext)

    def _resume_plaintext(self) -> None:
        self._resume_scheduled = False
        if self._app is not None and self._app_reading and not self._closing:
            self._read_plaintext()

    def is_reading(self) -> bool:
        return self._app_reading and not self._closing

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def raw_transport(self) -> asyncio.Transport | None:
        return self._raw

    @property
    def sslobj(self) -> ssl.SSLObject:
        return self._ssl

    def set_app(self, app: asyncio.BaseProtocol) -> None:
        self._app = app


class TlsAppTransport(asyncio.Transport):
    """The plaintext transport the application protocol writes to."""

    def __init__(self, conn: SslConnection, app: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._conn = conn
        self._app = app

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._conn.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._conn.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True  # close_notify closes our write side only

    def write_eof(self) -> None:
        self._conn.write_eof()

    def close(self) -> None:
        self._conn.close()

    def abort(self) -> None:
        self._conn.abort()

    def is_closing(self) -> bool:
        return self._conn.is_closing()

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    def is_reading(self) -> bool:
        return self._conn.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol
        self._conn.set_app(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def get_write_buffer_size(self) -> int:
        raw = self._conn.raw_transport()
        return raw.get_write_buffer_size() if raw is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._conn.raw_transport()
        return raw.get_write_buffer_limits() if raw is not None else (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raw = self._conn.raw_transport()
        if raw is not None:
            raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        conn = self._conn
        sslobj = conn.sslobj
        if name == "ssl_object":
            return sslobj
        if name == "security":
            return conn.security
        if name == "peercert":
            return sslobj.getpeercert()
        if name == "cipher":
            return sslobj.cipher()
        if name == "sslcontext":
            return sslobj.context
        if name == "compression":
            return sslobj.compression()
        raw = conn.raw_transport()
        return raw.get_extra_info(name, default) if raw is not None else default
