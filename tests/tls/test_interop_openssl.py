"""Interop with Debian's OpenSSL 3 over loopback: meshlet's client against
``openssl s_server`` and ``openssl s_client`` against meshlet's server."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tls_helpers import (
    SPIFFE_CLIENT,
    Echo,
    Leaf,
    MiniPki,
    SocketDriver,
    echo_digests,
    meshlet_serve,
    openssl_server,
)

from meshlet.tls.aio import MeshletTlsSocketFactory
from meshlet.tls.config import TlsConfig
from meshlet.tls.connection import TlsConnection
from meshlet.tls.crypto import Group
from meshlet.tls.events import KeyUpdated, SessionTicketReceived
from meshlet.tls.tickets import TicketKeys
from meshlet.tls.verify import PeerRole

pytestmark = pytest.mark.interop

SUITES = {
    "TLS_AES_128_GCM_SHA256": 0x1301,
    "TLS_AES_256_GCM_SHA384": 0x1302,
    "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
}
GROUPS = {"X25519": Group.x25519, "P-256": Group.secp256r1, "P-384": Group.secp384r1}
GET = b"GET / HTTP/1.0\r\n\r\n"


@pytest.fixture
def pki(tmp_path: Path) -> MiniPki:
    return MiniPki.create(tmp_path)


def _client(pki: MiniPki, **kwargs: object) -> TlsConfig:
    return TlsConfig(verifier=pki.policy(PeerRole.SERVER).verify, **kwargs)  # type: ignore[arg-type]


def _connect(port: int, config: TlsConfig, **kwargs: object) -> SocketDriver:
    conn = TlsConnection(config, client=True, server_name="localhost", **kwargs)  # type: ignore[arg-type]
    key = config.key
    driver = SocketDriver(conn, socket.create_connection(("127.0.0.1", port), timeout=5), key)  # type: ignore[arg-type]
    driver.handshake()
    assert conn.handshake_complete, conn.failure
    return driver


# --------------------------------------------------------------------------- #
# meshlet client -> openssl s_server
# --------------------------------------------------------------------------- #


def _www_server(leaf: Leaf, *args: str) -> AbstractContextManager[tuple[int, subprocess.Popen[bytes]]]:
    """``openssl s_server -www`` (answers a GET with a status page) presenting ``leaf``."""
    return openssl_server("-cert", str(leaf.cert_file), "-key", str(leaf.key_file), "-www", *args)


def _fetch_page(port: int, config: TlsConfig, **kwargs: object) -> tuple[SocketDriver, bytes]:
    """Connect, GET, and read s_server's status page."""
    driver = _connect(port, config, **kwargs)
    driver.send(GET)
    return driver, driver.read_until(b"</HTML>")


@pytest.mark.parametrize("suite", SUITES)
def test_client_each_suite(pki: MiniPki, suite: str) -> None:
    with _www_server(pki.issue("server"), "-ciphersuites", suite) as (port, _):
        driver, page = _fetch_page(port, _client(pki))
    assert driver.conn.cipher_suite == suite
    assert f"New, TLSv1.3, Cipher is {suite}".encode() in page


@pytest.mark.parametrize("group", GROUPS)
def test_client_each_group_with_retry(pki: MiniPki, group: str) -> None:
    """We send an X25519 share only: P-256 and P-384 cost a HelloRetryRequest."""
    with _www_server(pki.issue("server"), "-groups", group) as (port, _):
        driver, _page = _fetch_page(port, _client(pki))
    machine = driver.conn.machine
    assert machine.group == GROUPS[group]
    assert machine.retried is (group != "X25519")  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "p384", "ed25519"])
def test_client_verifies_each_certificate_kind(pki: MiniPki, kind: str) -> None:
    leaf = pki.issue(f"server-{kind}", kind)
    with _www_server(leaf) as (port, _):
        driver, _page = _fetch_page(port, _client(pki))
    assert driver.conn.peer_chain == leaf.chain


def test_client_mutual_tls(pki: MiniPki) -> None:
    leaf = pki.issue("server")
    client_leaf = pki.issue("client", "rsa", dns=(), uris=(SPIFFE_CLIENT,))
    args = ("-Verify", "1", "-CAfile", str(pki.ca_file), "-verify_return_error")
    with _www_server(leaf, *args) as (port, _):
        config = _client(pki, certificate_chain=client_leaf.chain, key=client_leaf.local_key)
        _driver, page = _fetch_page(port, config)
    assert b"no client certificate available" not in page
    assert b"Client certificate" in page


def test_client_alpn(pki: MiniPki) -> None:
    with _www_server(pki.issue("server"), "-alpn", "h2,http/1.1") as (port, _):
        driver, _page = _fetch_page(port, _client(pki, alpn_protocols=("http/1.1",)))
    assert driver.conn.alpn == "http/1.1"


def test_client_resumes_with_openssl_ticket(pki: MiniPki) -> None:
    leaf = pki.issue("server")
    config = _client(pki)
    with _www_server(leaf) as (port, _):
        first, _page = _fetch_page(port, config)
        tickets = [e.session for e in first.events if isinstance(e, SessionTicketReceived)]
        assert tickets
        first.close()
        second, page = _fetch_page(port, config, session=tickets[0])
    assert second.conn.resumed
    assert b"Reused, TLSv1.3" in page
    assert second.conn.peer_chain == leaf.chain


def test_client_key_update_both_ways(pki: MiniPki) -> None:
    with _www_server(pki.issue("server")) as (port, _):
        driver = _connect(port, _client(pki))
        driver.conn.update_key(request_peer=True)
        driver.send(GET)
        driver.read_until(b"</HTML>")
    # OpenSSL answered our request with its own KeyUpdate before the page.
    assert any(isinstance(e, KeyUpdated) for e in driver.events)


# --------------------------------------------------------------------------- #
# openssl s_client -> meshlet server
# --------------------------------------------------------------------------- #


async def _s_client(port: int, *args: str, stdin: bytes = b"hello\n") -> str:
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-tls1_3",
        "-servername",
        "localhost",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), 8)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace")


def _server_factory(pki: MiniPki, kind: str = "ecdsa", **kwargs: object) -> MeshletTlsSocketFactory:
    leaf = pki.issue(f"server-{kind}", kind)
    config = TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key, **kwargs)  # type: ignore[arg-type]
    return MeshletTlsSocketFactory(config, server_side=True)


async def _serve_one(factory: MeshletTlsSocketFactory, *args: str) -> tuple[str, list[Echo]]:
    served = await meshlet_serve(factory, lambda info: Echo(info, upper=True))
    try:
        out = await _s_client(served.port, "-ign_eof", *args)
    finally:
        served.server.close()
    return out, served.apps  # type: ignore[return-value]


@pytest.mark.parametrize("suite", SUITES)
async def test_server_each_suite(pki: MiniPki, suite: str) -> None:
    out, apps = await _serve_one(_server_factory(pki), "-ciphersuites", suite, "-CAfile", str(pki.ca_file))
    assert f"Cipher is {suite}" in out
    assert "HELLO" in out
    assert apps[0].info is not None and apps[0].info.cipher == suite


@pytest.mark.parametrize("group", GROUPS)
async def test_server_each_group_with_retry(pki: MiniPki, group: str) -> None:
    """OpenSSL sends an X25519 share first; a server limited to P-256/P-384 retries."""
    factory = _server_factory(pki, groups=(GROUPS[group],))
    out, _ = await _serve_one(factory, "-groups", f"X25519:{group}" if group != "X25519" else "X25519")
    assert "HELLO" in out
    expected = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}[group]
    assert f"Server Temp Key: {'X25519' if group == 'X25519' else 'ECDH, ' + expected}" in out


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "p384", "ed25519"])
async def test_server_each_certificate_kind(pki: MiniPki, kind: str) -> None:
    factory = _server_factory(pki, kind)
    out, _ = await _serve_one(factory, "-CAfile", str(pki.ca_file), "-verify_return_error")
    assert "Verify return code: 0 (ok)" in out
    assert "HELLO" in out


async def test_server_mutual_tls(pki: MiniPki) -> None:
    client_leaf = pki.issue("client", "ed25519", dns=(), uris=(SPIFFE_CLIENT,))
    factory = _server_factory(
        pki, verifier=pki.policy(PeerRole.CLIENT).verify, require_client_certificate=True
    )
    out, apps = await _serve_one(
        factory,
        "-CAfile",
        str(pki.ca_file),
        "-cert",
        str(client_leaf.cert_file),
        "-key",
        str(client_leaf.key_file),
    )
    assert "HELLO" in out
    assert apps[0].info is not None and apps[0].info.peer_spiffe_id == SPIFFE_CLIENT


async def test_server_refuses_missing_client_certificate(pki: MiniPki) -> None:
    factory = _server_factory(
        pki, verifier=pki.policy(PeerRole.CLIENT).verify, require_client_certificate=True
    )
    served = await meshlet_serve(factory, lambda info: Echo(info, upper=True))
    try:
        out = await _s_client(served.port, "-ign_eof", "-CAfile", str(pki.ca_file))
    finally:
        served.server.close()
    assert "certificate required" in out
    assert served.failures and served.failures[0].alert == "certificate_required"


async def test_server_alpn(pki: MiniPki) -> None:
    factory = _server_factory(pki, alpn_protocols=("h2", "http/1.1"))
    out, apps = await _serve_one(factory, "-alpn", "http/1.1,h2")
    assert "ALPN protocol: h2" in out
    assert apps[0].info is not None and apps[0].info.alpn == "h2"


async def test_server_resumption(pki: MiniPki, tmp_path: Path) -> None:
    factory = _server_factory(pki, ticket_keys=TicketKeys())
    session = tmp_path / "session.pem"
    served = await meshlet_serve(factory, lambda info: Echo(info, upper=True))
    try:
        first = await _s_client(served.port, "-ign_eof", "-sess_out", str(session))
        second = await _s_client(served.port, "-ign_eof", "-sess_in", str(session))
    finally:
        served.server.close()
    assert "New, TLSv1.3" in first
    assert "Reused, TLSv1.3" in second
    assert [a.info.resumed for a in served.apps if a.info] == [False, True]


async def test_server_key_update_requested_by_openssl(pki: MiniPki) -> None:
    """s_client's interactive ``K`` sends KeyUpdate(update_requested)."""
    served = await meshlet_serve(_server_factory(pki), lambda info: Echo(info, upper=True))
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{served.port}",
        "-tls1_3",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readuntil(b"---\n"), 5)
        proc.stdin.write(b"K\n")
        await proc.stdin.drain()
        await asyncio.sleep(0.2)
        proc.stdin.write(b"hello\n")
        await proc.stdin.drain()
        rest = await asyncio.wait_for(proc.stdout.read(), 5)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        served.server.close()
    assert b"KEYUPDATE" in rest
    assert b"HELLO" in rest
    conn = served.apps[0].transport.get_extra_info("tls_connection")  # type: ignore[union-attr]
    assert conn.key_updates_received == 1


async def test_server_large_transfer_with_s_client(pki: MiniPki) -> None:
    """64 MiB from s_client to meshlet's echo server and back, integrity checked."""
    total = 64 << 20
    block = random.Random(5).randbytes(1 << 16)
    served = await meshlet_serve(_server_factory(pki), Echo)
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{served.port}",
        "-tls1_3",
        "-quiet",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        sent, received = await echo_digests(proc.stdout, proc.stdin, block, total)
    finally:
        proc.kill()
        await proc.wait()
        served.server.close()
    assert sent == received
