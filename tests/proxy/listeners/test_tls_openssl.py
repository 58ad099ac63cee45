"""stdlib-ssl transport sockets against stdlib ssl, openssl s_client/s_server and curl."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
from pathlib import Path

import pytest
from listener_tls_helpers import Echo, TlsServer, client_tls, exact, prefix, server_tls, uri_san

from certs import CLIENT_SPIFFE_ID, SERVER_SPIFFE_ID, Pki, make_pki
from meshlet.config.model import SanMatcher, SanType, TlsCertificate, TlsContext, TransportSocketConfig
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.proxy.listeners.tls_inspector import ClientHelloInspector
from meshlet.proxy.listeners.tls_openssl import OpenSslTransportSocketFactory
from meshlet.proxy.listeners.transport_sockets import TLS, make_factory
from meshlet.proxy.transport import PLAIN, HandshakeError, SecurityInfo

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def stdlib_client(pki: Pki, *, cert: bool = True, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def echo_roundtrip(port: int, ctx: ssl.SSLContext, payload: bytes, sni: str = "localhost") -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni), 5
    )
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()


# --------------------------------------------------------------------------- #
# Downstream (server side)
# --------------------------------------------------------------------------- #


async def test_stdlib_client_echo_and_security_info(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(server_tls(pki, verify_clients=True, alpn=("h2", "http/1.1")))
    async with TlsServer(factory) as srv:
        got = await echo_roundtrip(srv.port, stdlib_client(pki, alpn=["http/1.1"]), b"hello tls")
        assert got == b"hello tls"
        app = srv.apps[0]
        assert isinstance(app, Echo)
        sec = app.security
        assert sec.tls and sec.version in ("TLSv1.2", "TLSv1.3")
        assert sec.alpn == "http/1.1"
        assert sec.sni == "localhost"
        assert sec.peer_spiffe_id == CLIENT_SPIFFE_ID
        assert sec.peer_dns_sans == ("client.mesh.local",)
        assert sec.peer_certificates and sec.peer_certificates[0][:1] == b"\x30"
        assert sec.local_uri_sans == (SERVER_SPIFFE_ID,)
        assert "client" in sec.peer_subject
        assert app.transport is not None
        assert app.transport.get_extra_info("peername")[0] == "127.0.0.1"
        assert app.transport.get_extra_info("ssl_object") is not None


async def test_large_transfer_both_ways_with_backpressure(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(server_tls(pki))
    async with TlsServer(factory) as srv:
        payload = os.urandom(8 * 1024 * 1024)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", srv.port, ssl=stdlib_client(pki, cert=False), server_hostname="localhost"
        )
        try:
            # Write everything before reading anything: the echo must stall on
            # the client's full receive window instead of buffering 8 MiB.
            async def send() -> None:
                writer.write(payload)
                await writer.drain()

            sender = asyncio.create_task(send())
            await asyncio.sleep(0.3)
            app = srv.apps[0]
            assert isinstance(app, Echo) and app.transport is not None
            assert app.transport.get_write_buffer_size() < len(payload)
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
            await asyncio.wait_for(sender, 5)
            assert got == payload
        finally:
            writer.close()


class PausingEcho(Echo):
    """Pauses its transport on every chunk and resumes a tick later."""

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(0.001, self.transport.resume_reading)


async def test_app_pause_and_resume_reading(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(server_tls(pki))
    async with TlsServer(factory, PausingEcho) as srv:
        payload = os.urandom(2 * 1024 * 1024)
        got = await echo_roundtrip(srv.port, stdlib_client(pki, cert=False), payload)
        assert got == payload


async def test_initial_data_from_inspector_is_replayed(pki: Pki) -> None:
    """The listener feeds the ClientHello it already read as initial_data."""
    factory = OpenSslTransportSocketFactory(server_tls(pki))
    apps: list[Echo] = []
    failures: list[HandshakeError] = []

    class Inspecting(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.raw = transport
            self.inspector = ClientHelloInspector()

        def data_received(self, data: bytes) -> None:
            if self.inspector.feed(data) is not None:
                def build(sec: SecurityInfo) -> Echo:
                    apps.append(Echo(sec))
                    return apps[-1]

                factory.create().start(self.raw, build, initial_data=self.inspector.data,
                                       on_failure=failures.append)

    server = await asyncio.get_running_loop().create_server(Inspecting, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        assert await echo_roundtrip(port, stdlib_client(pki), b"after peek") == b"after peek"
        assert apps[0].security.sni == "localhost"
        assert not failures
    finally:
        server.close()
        for app in apps:
            if app.transport:
                app.transport.abort()


async def test_mtls_required_rejects_client_without_certificate(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(server_tls(pki, require_client=True))
    async with TlsServer(factory) as srv:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await echo_roundtrip(srv.port, stdlib_client(pki, cert=False), b"x")
        await srv.wait_for(lambda: bool(srv.failures))
        assert srv.failures[0].stat == "fail_verify_no_cert"
        assert not srv.apps


async def test_mtls_rejects_untrusted_client_certificate(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ca_name="another CA")
    factory = OpenSslTransportSocketFactory(server_tls(pki, require_client=True))
    async with TlsServer(factory) as srv:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(other.client_cert, other.client_key)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await echo_roundtrip(srv.port, ctx, b"x")
        await srv.wait_for(lambda: bool(srv.failures))
        assert srv.failures[0].stat == "fail_verify_error"


async def test_spiffe_uri_san_match_accepts(pki: Pki) -> None:
    sans = (uri_san(CLIENT_SPIFFE_ID),)
    factory = OpenSslTransportSocketFactory(server_tls(pki, require_client=True, sans=sans))
    async with TlsServer(factory) as srv:
        assert await echo_roundtrip(srv.port, stdlib_client(pki), b"spiffe") == b"spiffe"


async def test_spiffe_uri_san_mismatch_rejects(pki: Pki) -> None:
    sans = (uri_san("spiffe://mesh.local/ns/default/sa/someone-else"),
            SanMatcher(SanType.DNS, exact("not-the-client.mesh.local")))
    factory = OpenSslTransportSocketFactory(server_tls(pki, require_client=True, sans=sans))
    async with TlsServer(factory) as srv:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await echo_roundtrip(srv.port, stdlib_client(pki), b"x")
        await srv.wait_for(lambda: bool(srv.failures))
        assert srv.failures[0].stat == "fail_verify_san"
        assert "match none" in str(srv.failures[0])
        assert not srv.apps


async def test_handshake_timeout(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(server_tls(pki), handshake_timeout=0.2)
    async with TlsServer(factory) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            # The server gives up and closes: we read EOF.
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert "timed out" in str(srv.failures[0])
        finally:
            writer.close()


async def test_garbage_instead_of_client_hello(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(server_tls(pki))
    async with TlsServer(factory) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.read(), 5)  # alert bytes, then EOF
            await srv.wait_for(lambda: bool(srv.failures))
            assert srv.failures[0].stat == ""
        finally:
            writer.close()
        # The server still serves others.
        assert await echo_roundtrip(srv.port, stdlib_client(pki, cert=False), b"ok") == b"ok"


@needs_openssl
async def test_openssl_s_client_mtls(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(
        server_tls(pki, require_client=True, sans=(uri_san(CLIENT_SPIFFE_ID),), alpn=("h2",))
    )
    async with TlsServer(factory) as srv:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{srv.port}", "-servername", "server.mesh.local",
            "-CAfile", str(pki.ca_cert), "-cert", str(pki.client_cert), "-key", str(pki.client_key),
            "-alpn", "h2", "-verify_return_error", "-quiet",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"ping from openssl\n")
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), 5)
            assert line == b"ping from openssl\n"
            app = srv.apps[0]
            assert isinstance(app, Echo)
            assert app.security.alpn == "h2"
            assert app.security.sni == "server.mesh.local"
            assert app.security.peer_spiffe_id == CLIENT_SPIFFE_ID
        finally:
            proc.kill()
            await proc.wait()


@needs_openssl
async def test_openssl_s_client_tls12_only(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(server_tls(pki, max_version="TLSv1_2"))
    async with TlsServer(factory) as srv:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{srv.port}", "-CAfile", str(pki.ca_cert),
            "-verify_return_error", "-quiet",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"twelve\n")
            assert await asyncio.wait_for(proc.stdout.readline(), 5) == b"twelve\n"
            app = srv.apps[0]
            assert isinstance(app, Echo) and app.security.version == "TLSv1.2"
        finally:
            proc.kill()
            await proc.wait()


class TinyHttp(asyncio.Protocol):
    """Answers one HTTP/1.1 request with its SNI, then closes."""

    def __init__(self, security: SecurityInfo) -> None:
        self.security = security
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            body = f"sni={self.security.sni} alpn={self.security.alpn}".encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
            )
            self.transport.close()


@needs_curl
async def test_curl_cacert(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(server_tls(pki, alpn=("http/1.1",)))
    async with TlsServer(factory, TinyHttp) as srv:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", "5", "--cacert", str(pki.ca_cert),
            "--resolve", f"server.mesh.local:{srv.port}:127.0.0.1", f"https://server.mesh.local:{srv.port}/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err
        assert out == b"sni=server.mesh.local alpn=http/1.1"


# --------------------------------------------------------------------------- #
# Upstream (client side)
# --------------------------------------------------------------------------- #


async def connect_upstream(factory: OpenSslTransportSocketFactory, port: int) -> Echo:
    loop = asyncio.get_running_loop()
    raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    proto = await factory.connect(raw, Echo, timeout=5)
    assert isinstance(proto, Echo)
    return proto


class Collect(asyncio.Protocol):
    def __init__(self, security: SecurityInfo) -> None:
        self.security = security
        self.data = b""
        self.transport: asyncio.Transport | None = None
        self.got = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got.set()


async def test_client_side_against_stdlib_server(pki: Pki) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert))
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.set_alpn_protocols(["h2"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readline()
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        factory = OpenSslTransportSocketFactory(
            client_tls(pki, sans=(uri_san(SERVER_SPIFFE_ID),), sni="server.mesh.local", alpn=("h2",))
        )
        loop = asyncio.get_running_loop()
        raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        proto = await factory.connect(raw, Collect, timeout=5)
        assert isinstance(proto, Collect) and proto.transport is not None
        assert proto.security.peer_spiffe_id == SERVER_SPIFFE_ID
        assert proto.security.alpn == "h2"
        assert proto.security.sni == "server.mesh.local"
        proto.transport.write(b"hi\n")
        await asyncio.wait_for(proto.got.wait(), 5)
        assert proto.data.startswith(b"echo:hi")
        proto.transport.close()
    finally:
        server.close()


async def test_client_side_san_mismatch(pki: Pki) -> None:
    factory = OpenSslTransportSocketFactory(server_tls(pki))
    async with TlsServer(factory) as srv:
        client = OpenSslTransportSocketFactory(
            client_tls(pki, with_cert=False, sans=(SanMatcher(SanType.URI, prefix("spiffe://other.domain/")),))
        )
        with pytest.raises(HandshakeError) as err:
            await connect_upstream(client, srv.port)
        assert err.value.stat == "fail_verify_san"


async def test_client_side_untrusted_server(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ca_name="another CA")
    async with TlsServer(OpenSslTransportSocketFactory(server_tls(pki))) as srv:
        client = OpenSslTransportSocketFactory(client_tls(other, with_cert=False))
        with pytest.raises(HandshakeError) as err:
            await connect_upstream(client, srv.port)
        assert err.value.stat == "fail_verify_error"


@needs_openssl
async def test_client_side_against_openssl_s_server(pki: Pki) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(pki.server_cert),
        "-key", str(pki.server_key), "-CAfile", str(pki.ca_cert), "-Verify", "1", "-rev",
        "-alpn", "http/1.1",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        client = OpenSslTransportSocketFactory(
            client_tls(pki, sans=(SanMatcher(SanType.DNS, exact("server.mesh.local")),), alpn=("http/1.1",))
        )
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            while True:
                try:
                    raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.05)
        proto = await client.connect(raw, Collect, timeout=5)
        assert isinstance(proto, Collect) and proto.transport is not None
        assert proto.security.alpn == "http/1.1"
        proto.transport.write(b"olleh\n")  # s_server -rev answers lines reversed
        async with asyncio.timeout(5):
            while b"hello" not in proto.data:
                proto.got.clear()
                await proto.got.wait()
        proto.transport.close()
    finally:
        proc.kill()
        await proc.wait()


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #


def test_make_factory_plain_and_tls(pki: Pki) -> None:
    assert make_factory(TransportSocketConfig(name="envoy.transport_sockets.raw_buffer"),
                        default_engine="openssl") is PLAIN
    factory = make_factory(TransportSocketConfig(name=TLS, tls=server_tls(pki)), default_engine="openssl")
    assert factory.is_tls and isinstance(factory, OpenSslTransportSocketFactory)


def test_make_factory_unknown_engine(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="tls engine 'nope' is not available"):
        make_factory(
            TransportSocketConfig(name=TLS, tls=server_tls(pki, engine="nope")), default_engine="openssl"
        )


def test_bad_key_is_a_config_error(pki: Pki) -> None:
    mismatched = TlsCertificate(pki.server.cert_pem, pki.client.key_pem)
    with pytest.raises(ConfigError, match=r"tls_certificates\[0\]"):
        OpenSslTransportSocketFactory(TlsContext(server_side=True, certificates=(mismatched,)))


def test_unsupported_settings_are_refused(pki: Pki) -> None:
    with pytest.raises(UnsupportedConfig, match="single curve"):
        OpenSslTransportSocketFactory(server_tls(pki, ecdh_curves=("X25519", "P-256")))
    with pytest.raises(UnsupportedConfig, match="TLS version"):
        OpenSslTransportSocketFactory(server_tls(pki, min_version="SSLv3"))
    with pytest.raises(ConfigError, match="cipher_suites"):
        OpenSslTransportSocketFactory(server_tls(pki, cipher_suites=("NOT-A-CIPHER",)))
    # BoringSSL equal-preference groups are accepted.
    OpenSslTransportSocketFactory(
        server_tls(pki, cipher_suites=("[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]",),
                   ecdh_curves=("P-256",))
    )


async def test_client_side_resumes_sessions(pki: Pki) -> None:
    async with TlsServer(OpenSslTransportSocketFactory(server_tls(pki))) as srv:
        client = OpenSslTransportSocketFactory(
            client_tls(pki, with_cert=False, sans=(SanMatcher(SanType.DNS, exact("localhost")),))
        )
        resumed = []
        for _ in range(2):
            loop = asyncio.get_running_loop()
            raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", srv.port)
            proto = await client.connect(raw, Collect, timeout=5)
            assert isinstance(proto, Collect) and proto.transport is not None
            proto.transport.write(b"ping")  # reading the echo also takes in the session tickets
            await asyncio.wait_for(proto.got.wait(), 5)
            resumed.append(proto.security.resumed)
            assert proto.security.peer_dns_sans == ("localhost", "server.mesh.local")
            proto.transport.close()
            await srv.wait_for(lambda: all(
                isinstance(a, Echo) and a.closed.done() for a in srv.apps
            ))
            await asyncio.sleep(0.05)
        assert resumed == [False, True]


async def test_write_eof_sends_close_notify_and_keeps_reading(pki: Pki) -> None:
    """TLS half-close: after write_eof the peer gets close_notify (its reads
    end) while what it still sends reaches the app; its own close ends it."""
    factory = make_factory(
        TransportSocketConfig("envoy.transport_sockets.tls", server_tls(pki)), default_engine="openssl"
    )

    class HalfCloser(Echo):
        def __init__(self, security: SecurityInfo) -> None:
            super().__init__(security)
            self.after_eof: list[bytes] = []

        def data_received(self, data: bytes) -> None:
            assert self.transport is not None
            if data == b"bye":
                assert self.transport.can_write_eof()
                self.transport.write(b"last words")
                self.transport.write_eof()
            else:
                self.after_eof.append(data)

    def client() -> bytes:
        ctx = ssl.create_default_context(cadata=pki.ca_pem.decode())
        with (
            socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"bye")
            received = b""
            while chunk := tls.recv(4096):  # b"" once close_notify arrives
                received += chunk
            tls.sendall(b"still here")  # our write side is still open
            return received

    async with TlsServer(factory, HalfCloser) as srv:
        received = await asyncio.wait_for(asyncio.to_thread(client), 10)
        assert received == b"last words"
        app = srv.apps[0]
        assert isinstance(app, HalfCloser)
        await srv.wait_for(lambda: app.after_eof == [b"still here"] or app.closed.done())
        assert app.after_eof == [b"still here"]


async def test_peer_close_notify_reaches_the_app_as_eof(pki: Pki) -> None:
    """The peer's close_notify is an end of stream for the app (the SSLObject
    signals it with an empty read, not an exception)."""
    factory = make_factory(
        TransportSocketConfig("envoy.transport_sockets.tls", server_tls(pki)), default_engine="openssl"
    )

    class EofRecorder(Echo):
        def __init__(self, security: SecurityInfo) -> None:
            super().__init__(security)
            self.eof = asyncio.get_running_loop().create_future()

        def eof_received(self) -> bool:
            if not self.eof.done():
                self.eof.set_result(True)
            return False

    def client() -> bytes:
        ctx = ssl.create_default_context(cadata=pki.ca_pem.decode())
        with (
            socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"ping")
            echoed = tls.recv(4)
            tls.unwrap()  # close_notify, the TCP connection stays open
            return echoed

    async with TlsServer(factory, EofRecorder) as srv:
        assert await asyncio.wait_for(asyncio.to_thread(client), 10) == b"ping"
        app = srv.apps[0]
        assert isinstance(app, EofRecorder)
        assert await asyncio.wait_for(app.eof, 5)
