"""Interop with the stdlib ``ssl`` module (OpenSSL underneath) through the
asyncio adapter, both directions, including 64 MiB each way."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tls_helpers import (
    SPIFFE_CLIENT,
    SPIFFE_SERVER,
    Echo,
    Leaf,
    MiniPki,
    echo_digests,
    meshlet_connect,
    meshlet_serve,
)

from meshlet.tls.aio import MeshletTlsSocketFactory
from meshlet.tls.config import TlsConfig
from meshlet.tls.crypto import Group
from meshlet.tls.tickets import TicketKeys
from meshlet.tls.verify import PeerRole

pytestmark = pytest.mark.interop

LARGE = 64 << 20
SUITES = (0x1301, 0x1302, 0x1303)
GROUPS = (Group.x25519, Group.secp256r1, Group.secp384r1)


@pytest.fixture
def pki(tmp_path: Path) -> MiniPki:
    return MiniPki.create(tmp_path)


def _stdlib_server_context(leaf: Leaf, pki: MiniPki, *, verify_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(leaf.cert_file, leaf.key_file)
    if verify_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca_file)
    return ctx


def _stdlib_client_context(pki: MiniPki, client: Leaf | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki.ca_file)
    if client is not None:
        ctx.load_cert_chain(client.cert_file, client.key_file)
    return ctx


async def _stdlib_echo_server(ctx: ssl.SSLContext) -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


def _client_factory(pki: MiniPki, **kwargs: object) -> MeshletTlsSocketFactory:
    config = TlsConfig(verifier=pki.policy(PeerRole.SERVER).verify, **kwargs)  # type: ignore[arg-type]
    return MeshletTlsSocketFactory(config, server_side=False)


def _server_factory(leaf: Leaf, **kwargs: object) -> MeshletTlsSocketFactory:
    config = TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key, **kwargs)  # type: ignore[arg-type]
    return MeshletTlsSocketFactory(config, server_side=True)


# --------------------------------------------------------------------------- #
# meshlet client -> stdlib server
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("group", GROUPS)
async def test_client_suite_and_group(pki: MiniPki, suite: int, group: int) -> None:
    server, port = await _stdlib_echo_server(_stdlib_server_context(pki.issue("server"), pki))
    try:
        app = await meshlet_connect(_client_factory(pki, cipher_suites=(suite,), groups=(group,)), port)
        assert app.transport is not None
        app.transport.write(b"ping")
        await app.wait_for(b"ping")
        assert app.info is not None and app.info.peer_spiffe_id == SPIFFE_SERVER
        app.transport.close()
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
async def test_client_mutual_tls_and_resumption(pki: MiniPki, kind: str) -> None:
    client_leaf = pki.issue("client", kind, dns=(), uris=(SPIFFE_CLIENT,))
    ctx = _stdlib_server_context(pki.issue("server", kind), pki, verify_client=True)
    server, port = await _stdlib_echo_server(ctx)
    factory = _client_factory(pki, certificate_chain=client_leaf.chain, key=client_leaf.local_key)
    try:
        infos = []
        for _ in range(2):
            app = await meshlet_connect(factory, port)
            assert app.transport is not None
            app.transport.write(b"ping")
            await app.wait_for(b"ping")  # the server's tickets arrive before the echo
            infos.append(app.info)
            app.transport.close()
            await asyncio.wait_for(app.lost, 5)
    finally:
        server.close()
    assert [i.resumed for i in infos if i] == [False, True]


async def test_client_large_transfer_both_ways(pki: MiniPki) -> None:
    server, port = await _stdlib_echo_server(_stdlib_server_context(pki.issue("server"), pki))
    try:
        app = await meshlet_connect(_client_factory(pki), port, keep=False)
        sent_digest = await asyncio.wait_for(app.send_stream(LARGE), 60)
        await app.wait_count(LARGE, timeout=60)
        assert app.count == LARGE
        assert app.digest.hexdigest() == sent_digest
        assert app.transport is not None
        app.transport.close()
    finally:
        server.close()


# --------------------------------------------------------------------------- #
# stdlib client -> meshlet server
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "p384", "ed25519"])
@pytest.mark.parametrize("group", GROUPS)
async def test_server_certificate_kind_and_group(pki: MiniPki, kind: str, group: int) -> None:
    """Python's client shares X25519 first, so P-256/P-384 servers retry."""
    served = await meshlet_serve(_server_factory(pki.issue("server", kind), groups=(group,)), Echo)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", served.port, ssl=_stdlib_client_context(pki), server_hostname="localhost"
        )
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.close()
    finally:
        served.server.close()
    conn = served.apps[0].transport.get_extra_info("tls_connection")  # type: ignore[union-attr]
    assert conn.machine.group == group
    assert conn.machine.retried is (group != Group.x25519)


def _blocking_client(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(b"ping")
        assert tls.recv(4) == b"ping"
        reused, new_session = tls.session_reused, tls.session
        assert new_session is not None
        return reused, new_session


async def test_server_mutual_tls_and_resumption(pki: MiniPki) -> None:
    client_leaf = pki.issue("client", "ecdsa", dns=(), uris=(SPIFFE_CLIENT,))
    factory = _server_factory(
        pki.issue("server"),
        verifier=pki.policy(PeerRole.CLIENT).verify,
        require_client_certificate=True,
        ticket_keys=TicketKeys(),
    )
    served = await meshlet_serve(factory, Echo)
    ctx = _stdlib_client_context(pki, client_leaf)
    try:
        first_reused, session = await asyncio.to_thread(_blocking_client, served.port, ctx, None)
        second_reused, _ = await asyncio.to_thread(_blocking_client, served.port, ctx, session)
    finally:
        served.server.close()
    assert (first_reused, second_reused) == (False, True)
    infos = [a.info for a in served.apps]
    assert [i.resumed for i in infos if i] == [False, True]
    # A resumed mesh connection still knows its peer (from the ticket), with no signature.
    assert all(i is not None and i.peer_spiffe_id == SPIFFE_CLIENT for i in infos)


async def test_server_large_transfer_both_ways(pki: MiniPki) -> None:
    served = await meshlet_serve(_server_factory(pki.issue("server")), Echo)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", served.port, ssl=_stdlib_client_context(pki), server_hostname="localhost"
        )
        block = random.Random(3).randbytes(1 << 16)
        sent, received = await echo_digests(reader, writer, block, LARGE)
        assert sent == received
        writer.close()
    finally:
        served.server.close()
