"""Shared by the listener tests: TLS contexts from the test PKI and a tiny echo app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from certs import Pki
from meshlet.config.model import (
    CertificateValidation,
    SanMatcher,
    SanType,
    StringMatcher,
    StringMatchKind,
    TlsCertificate,
    TlsContext,
)
from meshlet.proxy.transport import HandshakeError, SecurityInfo, TransportSocketFactory


def exact(value: str) -> StringMatcher:
    return StringMatcher(StringMatchKind.EXACT, value, False, match=lambda s: s == value)


def prefix(value: str) -> StringMatcher:
    return StringMatcher(StringMatchKind.PREFIX, value, False, match=lambda s: s.startswith(value))


def server_tls(
    pki: Pki,
    *,
    require_client: bool = False,
    verify_clients: bool = False,
    sans: tuple[SanMatcher, ...] = (),
    alpn: tuple[str, ...] = (),
    **kw: object,
) -> TlsContext:
    validation = None
    if require_client or verify_clients or sans:
        validation = CertificateValidation(trusted_ca_pem=pki.ca_pem, san_matchers=sans)
    cert = TlsCertificate(pki.server.cert_pem, pki.server.key_pem)
    return TlsContext(
        server_side=True, certificates=(cert,), validation=validation,
        require_client_certificate=require_client, alpn_protocols=alpn, **kw,  # type: ignore[arg-type]
    )


def client_tls(
    pki: Pki, *, with_cert: bool = True, sans: tuple[SanMatcher, ...] = (), sni: str | None = "localhost",
    alpn: tuple[str, ...] = (),
) -> TlsContext:
    certs = (TlsCertificate(pki.client.cert_pem, pki.client.key_pem),) if with_cert else ()
    return TlsContext(
        server_side=False, certificates=certs,
        validation=CertificateValidation(trusted_ca_pem=pki.ca_pem, san_matchers=sans),
        sni=sni, alpn_protocols=alpn,
    )


def uri_san(value: str) -> SanMatcher:
    return SanMatcher(SanType.URI, exact(value))


class Echo(asyncio.Protocol):
    """Echoes what it reads; remembers the security it was built with."""

    def __init__(self, security: SecurityInfo) -> None:
        self.security = security
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


class TlsServer:
    """A loopback server whose connections run a transport socket, then ``app``."""

    def __init__(
        self,
        factory: TransportSocketFactory,
        app: Callable[[SecurityInfo], asyncio.BaseProtocol] = Echo,
    ) -> None:
        self.factory = factory
        self.app = app
        self.apps: list[asyncio.BaseProtocol] = []
        self.failures: list[HandshakeError] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def _build(self, security: SecurityInfo) -> asyncio.BaseProtocol:
        proto = self.app(security)
        self.apps.append(proto)
        return proto

    async def __aenter__(self) -> TlsServer:
        outer = self

        class Handoff(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                outer.factory.create().start(transport, outer._build, on_failure=outer.failures.append)

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(Handoff, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for app in self.apps:
            transport = getattr(app, "transport", None)
            if transport is not None:
                transport.abort()
        await asyncio.wait_for(self.server.wait_closed(), 5)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
