"""Transport sockets: what sits between a raw TCP transport and a codec.

A transport socket takes over a freshly accepted (or connected) raw asyncio
transport, runs its handshake if it has one, and then hands an application
protocol (an HTTP codec, the TCP proxy) a transport to write plaintext to.

Implementations:
- ``raw_buffer`` (plain TCP): zero-copy, the app protocol gets the raw transport.
- ``tls`` on the stdlib ``ssl`` module (engine "openssl"):
  ``meshlet.proxy.listeners.tls_openssl``.
- ``tls`` on meshlet's own TLS 1.3 engine (engine "meshlet"): ``meshlet.tls.aio``.

Engines register a factory in the extension registry under category
``"tls_engine"`` and name ``"openssl"`` / ``"meshlet"``:
``factory(context: meshlet.config.model.TlsContext) -> TransportSocketFactory``.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SecurityInfo:
    """What the transport socket established. ``tls`` False means plaintext;
    ``reason`` then says why there is no TLS (linkerd's NoServerTls)."""

    tls: bool
    version: str = ""
    cipher: str = ""
    alpn: str = ""
    sni: str = ""
    # DER certificates presented by the peer, leaf first (empty if none).
    peer_certificates: tuple[bytes, ...] = ()
    peer_uri_sans: tuple[str, ...] = ()
    peer_dns_sans: tuple[str, ...] = ()
    peer_subject: str = ""
    local_uri_sans: tuple[str, ...] = ()
    resumed: bool = False
    reason: str = ""

    @property
    def peer_spiffe_id(self) -> str:
        return next((u for u in self.peer_uri_sans if u.startswith("spiffe://")), "")


PLAINTEXT_INFO = SecurityInfo(tls=False, reason="plaintext transport socket")


@dataclass(slots=True)
class ConnectionInfo:
    """Facts about one downstream connection, shared by all its streams."""

    peer: tuple[str, int]
    local: tuple[str, int]
    security: SecurityInfo = PLAINTEXT_INFO
    listener: str = ""
    filter_chain: str = ""
    connection_id: int = 0
    # Original destination (transparent capture); None when not redirected.
    original_dst: tuple[str, int] | None = None
    extras: dict[str, object] = field(default_factory=dict)


class HandshakeError(Exception):
    """The transport socket's handshake failed. ``alert`` is the TLS alert
    description (e.g. "certificate_unknown") when one applies. ``stat`` is the
    Envoy ``ssl.*`` counter the failure counts under ("fail_verify_san",
    "fail_verify_no_cert", "fail_verify_error"); empty means "connection_error"."""

    def __init__(self, message: str, *, alert: str = "", local: bool = True, stat: str = "") -> None:
        self.alert = alert
        self.local = local
        self.stat = stat
        super().__init__(message)


AppProtocolFactory = Callable[[SecurityInfo], asyncio.BaseProtocol]
"""Builds the application protocol once the handshake is done; it is given
the negotiated security (ALPN decides between HTTP/1.1 and HTTP/2)."""


class TransportSocket(ABC):
    """One connection's transport socket."""

    @abstractmethod
    def start(
        self,
        raw: asyncio.Transport,
        app_factory: AppProtocolFactory,
        *,
        initial_data: bytes = b"",
        on_failure: Callable[[HandshakeError], None] | None = None,
    ) -> None:
        """Take over ``raw`` (``raw.set_protocol``), feed it ``initial_data``
        (bytes a listener filter already read, e.g. the TLS inspector's peek),
        run the handshake, then call ``app_factory`` and ``connection_made`` on
        the protocol it returns with a transport carrying plaintext. On a
        failed handshake: ``on_failure`` is called and ``raw`` is closed."""

    @property
    @abstractmethod
    def security(self) -> SecurityInfo:
        """Valid once established."""


class TransportSocketFactory(ABC):
    """Per filter chain (downstream) or per cluster (upstream): builds the
    per-connection sockets and holds the shared state (SSLContext, session
    ticket keys, certificates), which it may swap on rotation."""

    name: str = ""

    @abstractmethod
    def create(self, *, server_hostname: str | None = None) -> TransportSocket: ...

    @property
    def is_tls(self) -> bool:
        return False

    async def connect(
        self,
        raw: asyncio.Transport,
        app_factory: AppProtocolFactory,
        *,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> asyncio.BaseProtocol:
        """Client side: run the handshake over an already connected ``raw``
        transport and return the application protocol once established."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[asyncio.BaseProtocol] = loop.create_future()

        def factory(info: SecurityInfo) -> asyncio.BaseProtocol:
            proto = app_factory(info)
            if not done.done():
                done.set_result(proto)
            return proto

        def failed(err: HandshakeError) -> None:
            if not done.done():
                done.set_exception(err)

        self.create(server_hostname=server_hostname).start(raw, factory, on_failure=failed)
        try:
            return await asyncio.wait_for(done, timeout)
        except TimeoutError:
            raw.abort()
            raise HandshakeError("TLS handshake timed out") from None


class _PlainSocket(TransportSocket):
    __slots__ = ()

    def start(
        self,
        raw: asyncio.Transport,
        app_factory: AppProtocolFactory,
        *,
        initial_data: bytes = b"",
        on_failure: Callable[[HandshakeError], None] | None = None,
    ) -> None:
        app = app_factory(PLAINTEXT_INFO)
        raw.set_protocol(app)
        app.connection_made(raw)
        if initial_data and isinstance(app, asyncio.Protocol):
            app.data_received(initial_data)

    @property
    def security(self) -> SecurityInfo:
        return PLAINTEXT_INFO


class PlainTransportSocketFactory(TransportSocketFactory):
    """``envoy.transport_sockets.raw_buffer``: the codec talks to the socket directly."""

    name = "envoy.transport_sockets.raw_buffer"
    _socket = _PlainSocket()

    def create(self, *, server_hostname: str | None = None) -> TransportSocket:
        return self._socket


PLAIN = PlainTransportSocketFactory()
