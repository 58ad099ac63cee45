"""The asyncio adapter as a proxy transport socket: config compilation,
registry, SecurityInfo, signing as an awaited pause, timeouts, backpressure
and close_notify."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tls_helpers import SPIFFE_CLIENT, SPIFFE_SERVER, Collector, Echo, MiniPki, meshlet_connect, meshlet_serve

from meshlet.config.model import (
    CertificateValidation,
    TlsCertificate,
    TlsContext,
    TransportSocketConfig,
)
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.proxy.listeners.transport_sockets import make_factory
from meshlet.tls.aio import MeshletTlsSocketFactory, config_from_context
from meshlet.tls.config import TlsConfig
from meshlet.tls.connection import TlsConnection
from meshlet.tls.events import HandshakeComplete, SignatureRequired
from meshlet.tls.keys_local import LocalKey


@pytest.fixture
def pki(tmp_path: Path) -> MiniPki:
    return MiniPki.create(tmp_path)


def _contexts(pki: MiniPki) -> tuple[TlsContext, TlsContext]:
    server = pki.issue("server")
    client = pki.issue("client", "ed25519", dns=(), uris=(SPIFFE_CLIENT,))
    validation = CertificateValidation(trusted_ca_pem=pki.ca_file.read_bytes())
    server_ctx = TlsContext(
        server_side=True,
        certificates=(TlsCertificate(server.cert_file.read_bytes(), server.key_file.read_bytes()),),
        validation=validation,
        require_client_certificate=True,
        alpn_protocols=("h2", "http/1.1"),
        engine="meshlet",
    )
    client_ctx = TlsContext(
        server_side=False,
        certificates=(TlsCertificate(client.cert_file.read_bytes(), client.key_file.read_bytes()),),
        validation=validation,
        alpn_protocols=("http/1.1",),
        sni="localhost",
    )
    return server_ctx, client_ctx


async def test_registered_engine_builds_working_sockets(pki: MiniPki) -> None:
    server_ctx, client_ctx = _contexts(pki)
    server_factory = make_factory(
        TransportSocketConfig("envoy.transport_sockets.tls", server_ctx), default_engine="openssl"
    )
    client_factory = make_factory(
        TransportSocketConfig("envoy.transport_sockets.tls", client_ctx), default_engine="meshlet"
    )
    assert isinstance(server_factory, MeshletTlsSocketFactory) and server_factory.is_tls
    assert isinstance(client_factory, MeshletTlsSocketFactory)
    served = await meshlet_serve(server_factory, Echo)
    try:
        app = await meshlet_connect(client_factory, served.port)
        assert app.transport is not None
        app.transport.write(b"ping")
        await app.wait_for(b"ping")
    finally:
        served.server.close()
    client_info, server_info = app.info, served.apps[0].info
    assert client_info is not None and server_info is not None
    assert (client_info.version, client_info.alpn, client_info.sni) == ("TLSv1.3", "http/1.1", "localhost")
    assert client_info.peer_spiffe_id == SPIFFE_SERVER
    assert client_info.local_uri_sans == (SPIFFE_CLIENT,)
    assert server_info.peer_spiffe_id == SPIFFE_CLIENT and server_info.sni == "localhost"
    assert server_info.cipher == client_info.cipher == "TLS_AES_128_GCM_SHA256"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_version": "TLSv1_2"}, "tls_maximum_protocol_version"),
        ({"ecdh_curves": ("X448",)}, "ecdh_curves"),
    ],
)
def test_unsupported_settings_are_refused_by_name(
    pki: MiniPki, change: dict[str, object], field: str
) -> None:
    from dataclasses import replace

    server_ctx, _ = _contexts(pki)
    with pytest.raises(UnsupportedConfig) as err:
        config_from_context(replace(server_ctx, **change))  # type: ignore[arg-type]
    assert field in err.value.path


def test_server_context_without_certificate_is_refused() -> None:
    with pytest.raises(ConfigError):
        config_from_context(TlsContext(server_side=True))


class SlowKey:
    """A key handle that answers later, like an offload engine or key server."""

    def __init__(self, inner: LocalKey, delay: float, fail: bool = False) -> None:
        self.inner = inner
        self.delay = delay
        self.fail = fail
        self.calls = 0

    @property
    def public_key(self):  # type: ignore[no-untyped-def]
        return self.inner.public_key

    @property
    def schemes(self):  # type: ignore[no-untyped-def]
        return self.inner.schemes

    async def sign(self, scheme: int, data: bytes) -> bytes:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("key server unavailable")
        return self.inner.sign_now(scheme, data)


async def test_signing_is_awaited_on_the_key_handle(pki: MiniPki) -> None:
    leaf = pki.issue("server")
    key = SlowKey(leaf.local_key, 0.05)
    factory = MeshletTlsSocketFactory(TlsConfig(certificate_chain=leaf.chain, key=key), server_side=True)
    served = await meshlet_serve(factory, Echo)
    try:
        client = MeshletTlsSocketFactory(TlsConfig(), server_side=False)
        apps = await asyncio.gather(*(meshlet_connect(client, served.port) for _ in range(20)))
    finally:
        served.server.close()
    assert key.calls == 20 and all(a.info is not None and a.info.tls for a in apps)


async def test_failing_key_handle_aborts_with_internal_error(pki: MiniPki) -> None:
    leaf = pki.issue("server")
    factory = MeshletTlsSocketFactory(
        TlsConfig(certificate_chain=leaf.chain, key=SlowKey(leaf.local_key, 0, fail=True)), server_side=True
    )
    served = await meshlet_serve(factory, Echo)
    try:
        client = MeshletTlsSocketFactory(TlsConfig(), server_side=False)
        with pytest.raises(Exception) as err:
            await meshlet_connect(client, served.port)
    finally:
        served.server.close()
    assert "internal_error" in str(err.value)
    assert served.failures[0].alert == "internal_error"
    assert "key server unavailable" in str(served.failures[0])


async def test_handshake_timeout(pki: MiniPki) -> None:
    leaf = pki.issue("server")
    factory = MeshletTlsSocketFactory(
        TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key), server_side=True, handshake_timeout=0.2
    )
    served = await meshlet_serve(factory, Echo)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
        writer.close()
    finally:
        served.server.close()
    assert "timed out" in str(served.failures[0])


async def test_close_notify_reaches_the_peer_app(pki: MiniPki) -> None:
    leaf = pki.issue("server")
    factory = MeshletTlsSocketFactory(
        TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key), server_side=True
    )
    served = await meshlet_serve(factory, Collector)
    try:
        app = await meshlet_connect(MeshletTlsSocketFactory(TlsConfig(), server_side=False), served.port)
        assert app.transport is not None
        app.transport.write(b"bye")
        app.transport.close()
        await asyncio.wait_for(served_app_lost(served.apps), 5)
    finally:
        served.server.close()
    server_app = served.apps[0]
    assert server_app.eof and server_app.data == b"bye"
    assert server_app.lost.result() is None  # a clean close, not an error


async def served_app_lost(apps: list[Collector]) -> None:
    while not apps:
        await asyncio.sleep(0.01)
    await apps[0].lost


async def test_backpressure_both_ways(pki: MiniPki) -> None:
    """A server app that stops reading makes the client's writer pause."""
    leaf = pki.issue("server")
    factory = MeshletTlsSocketFactory(
        TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key), server_side=True
    )

    class Stalling(Collector):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert self.transport is not None
            self.transport.pause_reading()

    served = await meshlet_serve(factory, lambda info: Stalling(info, keep=False))
    try:
        app = await meshlet_connect(
            MeshletTlsSocketFactory(TlsConfig(), server_side=False), served.port, keep=False
        )
        sender = asyncio.ensure_future(app.send_stream(32 << 20))
        for _ in range(200):
            if not app._writable.is_set():
                break
            await asyncio.sleep(0.01)
        assert not app._writable.is_set(), "the client was never asked to pause writing"
        assert not sender.done()
        received_while_paused = served.apps[0].count
        assert received_while_paused < 32 << 20
        assert served.apps[0].transport is not None
        served.apps[0].transport.resume_reading()
        digest = await asyncio.wait_for(sender, 30)
        await served.apps[0].wait_count(32 << 20, timeout=30)
        assert served.apps[0].digest.hexdigest() == digest
    finally:
        served.server.close()


def test_thousands_of_handshakes_paused_at_once(pki: MiniPki) -> None:
    """Signing is a pause: many connections wait at once, and finish in any order."""
    leaf = pki.issue("server")
    server_config = TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key)
    client_config = TlsConfig()
    pairs = []
    for _ in range(1000):
        client = TlsConnection(client_config, client=True, server_name="localhost")
        server = TlsConnection(server_config, client=False)
        (request,) = server.receive_data(client.data_to_send())
        assert isinstance(request, SignatureRequired) and server.awaiting_signature
        pairs.append((client, server, request))
    for client, server, request in reversed(pairs):
        assert server.provide_signature(leaf.local_key.sign_now(request.scheme, request.data)) == []
        events = client.receive_data(server.data_to_send())
        assert isinstance(events[0], HandshakeComplete)
        server_events = server.receive_data(client.data_to_send())
        assert isinstance(server_events[0], HandshakeComplete)


def test_key_provider_from_the_registry_signs(pki: MiniPki) -> None:
    from dataclasses import replace

    from meshlet.config.model import PrivateKeyProviderConfig
    from meshlet.registry import registry

    server_ctx, _ = _contexts(pki)
    leaf_key = LocalKey.from_pem(server_ctx.certificates[0].private_key_pem or b"")
    built: list[PrivateKeyProviderConfig] = []

    def factory(provider: PrivateKeyProviderConfig) -> SlowKey:
        built.append(provider)
        return SlowKey(leaf_key, 0)

    name = "meshlet.test.slow_key"
    if name not in registry.names("key_provider"):
        registry.register("key_provider", name, factory)
    provider = PrivateKeyProviderConfig(name, {"delay": 0})
    cert = replace(server_ctx.certificates[0], private_key_pem=None, private_key_provider=provider)
    config = config_from_context(replace(server_ctx, certificates=(cert,)))
    assert isinstance(config.key, SlowKey)

    missing = PrivateKeyProviderConfig("meshlet.test.absent", {}, fallback=True)
    with_fallback = replace(server_ctx.certificates[0], private_key_provider=missing)
    assert isinstance(config_from_context(replace(server_ctx, certificates=(with_fallback,))).key, LocalKey)
    without = replace(with_fallback, private_key_pem=None)
    with pytest.raises(UnsupportedConfig):
        config_from_context(replace(server_ctx, certificates=(without,)))


def test_fallback_when_the_provider_backend_is_down(pki: MiniPki) -> None:
    """``fallback: true`` also covers a registered provider whose backend (a
    key server, a token) cannot be reached when the socket is built."""
    from dataclasses import replace

    from meshlet.config.model import PrivateKeyProviderConfig
    from meshlet.keys.base import ProviderUnavailable
    from meshlet.registry import registry
    from meshlet.tls.config import KeyHandle

    server_ctx, _ = _contexts(pki)

    def unreachable(provider: PrivateKeyProviderConfig) -> KeyHandle:
        raise ProviderUnavailable("private_key_provider", "key server socket /nonexistent: not reachable")

    name = "meshlet.test.unreachable"
    if name not in registry.names("key_provider"):
        registry.register("key_provider", name, unreachable)
    down = PrivateKeyProviderConfig(name, {}, fallback=True)
    cert = replace(server_ctx.certificates[0], private_key_provider=down)
    assert isinstance(config_from_context(replace(server_ctx, certificates=(cert,))).key, LocalKey)
    no_fallback = replace(cert, private_key_provider=replace(down, fallback=False))
    with pytest.raises(ProviderUnavailable, match="not reachable"):
        config_from_context(replace(server_ctx, certificates=(no_fallback,)))
