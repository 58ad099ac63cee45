"""The key server in this process's loop, with the meshlet.keyserver provider:
operations, SO_PEERCRED, admin-only key creation, rate and in-flight limits,
hostile input, and a handshake against openssl s_client."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from keys_helpers import Echo, MiniPki, issue_for, meshlet_serve, server_context, verify_tls_signature
from tls_helpers import openssl_client

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError
from meshlet.keys.base import ProviderUnavailable
from meshlet.keys.keyserver.client import KeyServerProvider, build_keyserver, call, load_public_key
from meshlet.keys.keyserver.protocol import (
    FrameDecoder,
    GenerateRequest,
    ImportRequest,
    ListRequest,
    PublicKeyRequest,
    SignRequest,
    Status,
    decode_response,
    encode_request,
)
from meshlet.keys.keyserver.server import KeyServer, ServerPolicy
from meshlet.keys.keyserver.store import KeyStore
from meshlet.tls.aio import MeshletTlsSocketFactory
from meshlet.tls.crypto import schemes_for_key

DATA = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + bytes(32)
OTHER_UID = 54321


async def start_server(tmp_path: Path, **policy: object) -> tuple[KeyServer, Path]:
    server = KeyServer(KeyStore(tmp_path / "keys"), ServerPolicy(**policy))  # type: ignore[arg-type]
    path = tmp_path / "ks.sock"
    await server.start(path)
    return server, path


@pytest.fixture
async def keyserver(tmp_path: Path) -> AsyncIterator[tuple[KeyServer, Path]]:
    server, path = await start_server(tmp_path)
    try:
        yield server, path
    finally:
        await server.close()


async def ask(path: Path, request: object) -> tuple[Status, bytes]:
    response = await asyncio.to_thread(call, str(path), request)  # type: ignore[arg-type]
    return response.status, response.payload


def provider_config(path: Path, handle: str, **extra: object) -> PrivateKeyProviderConfig:
    return PrivateKeyProviderConfig("meshlet.keyserver", {"socket": str(path), "handle": handle, **extra})


async def build(path: Path, handle: str, **extra: object) -> KeyServerProvider:
    return await asyncio.to_thread(build_keyserver, provider_config(path, handle, **extra))


@pytest.mark.parametrize("key_type", ["rsa2048", "p256", "p384", "ed25519"])
async def test_generated_keys_sign_verifiably_by_handle(
    keyserver: tuple[KeyServer, Path], key_type: str
) -> None:
    server, path = keyserver
    status, spki = await ask(path, GenerateRequest(1, key_type, f"k-{key_type}"))
    assert status is Status.OK
    provider = await build(path, f"k-{key_type}")
    try:
        assert (
            provider.public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            == spki
        )
        for scheme in schemes_for_key(provider.public_key):
            verify_tls_signature(provider.public_key, scheme, await provider.sign(scheme, DATA), DATA)
        # Pipelined over the pool: many at once.
        signatures = await asyncio.gather(*(provider.sign(provider.schemes[0], DATA) for _ in range(20)))
        for signature in signatures:
            verify_tls_signature(provider.public_key, provider.schemes[0], signature, DATA)
    finally:
        provider.close()
    assert server.stats()["signs"] >= 21


async def test_keys_are_stored_private_and_reloaded(tmp_path: Path) -> None:
    server, path = await start_server(tmp_path)
    try:
        imported = rsa.generate_private_key(65537, 2048)
        pem = imported.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        status, spki = await ask(path, ImportRequest(1, "imported", pem))
        assert status is Status.OK
        assert load_public_key(spki).public_numbers() == imported.public_key().public_numbers()  # type: ignore[union-attr]
        assert (await ask(path, GenerateRequest(2, "p256", "made")))[0] is Status.OK
        assert (await ask(path, GenerateRequest(3, "p256", "made")))[0] is Status.EXISTS
        assert (await ask(path, GenerateRequest(4, "dsa1024", "x")))[0] is Status.BAD_REQUEST
        assert (await ask(path, GenerateRequest(5, "p256", "../escape")))[0] is Status.BAD_REQUEST
        assert (await ask(path, ImportRequest(6, "junk", b"not a key")))[0] is Status.BAD_REQUEST
    finally:
        await server.close()
    key_dir = tmp_path / "keys"
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    for file in key_dir.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    again, path = await start_server(tmp_path)
    try:
        status, names = await ask(path, ListRequest(1))
        assert (status, names) == (Status.OK, b"imported\nmade")
        status, spki = await ask(path, PublicKeyRequest(2, "imported"))
        assert load_public_key(spki).public_numbers() == imported.public_key().public_numbers()  # type: ignore[union-attr]
    finally:
        await again.close()


async def test_only_admin_uids_may_add_keys(tmp_path: Path) -> None:
    server, path = await start_server(
        tmp_path, allowed_uids=frozenset({os.geteuid()}), admin_uids=frozenset({OTHER_UID})
    )
    try:
        status, message = await ask(path, GenerateRequest(1, "p256", "k"))
        assert status is Status.FORBIDDEN
        assert b"may not add keys" in message
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        assert (await ask(path, ImportRequest(2, "k", pem)))[0] is Status.FORBIDDEN
        assert (await ask(path, ListRequest(3)))[0] is Status.OK
    finally:
        await server.close()


async def test_peers_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    server, path = await start_server(tmp_path, allowed_uids=frozenset({OTHER_UID}))
    try:
        with pytest.raises(ProviderUnavailable, match=r"typed_config.socket: cannot reach the key server"):
            await build(path, "any")
        assert server.stats()["refused_peers"] == 1
        # The socket is open to other uids only because the allow-list names one.
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
    finally:
        await server.close()


async def test_unknown_handle_is_a_config_error_on_the_handle(keyserver: tuple[KeyServer, Path]) -> None:
    _, path = keyserver
    with pytest.raises(ConfigError, match=r"typed_config.handle: the key server has no key 'missing'"):
        await build(path, "missing")
    with pytest.raises(ConfigError, match=r"typed_config.socket: is required"):
        await asyncio.to_thread(
            build_keyserver, PrivateKeyProviderConfig("meshlet.keyserver", {"handle": "x"})
        )


def _raw_exchange(path: Path, wire: bytes, expect: int) -> list[tuple[int, Status]]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(wire)
        decoder = FrameDecoder()
        got: list[tuple[int, Status]] = []
        while len(got) < expect:
            data = sock.recv(65536)
            assert data, "server closed the connection"
            got += [(r.request_id, r.status) for r in map(decode_response, decoder.feed(data))]
        return got


async def test_rate_limit_answers_at_once(tmp_path: Path) -> None:
    server, path = await start_server(tmp_path, connection_rate=0.001, connection_burst=3.0)
    try:
        wire = b"".join(encode_request(ListRequest(i)) for i in range(10))
        replies = await asyncio.to_thread(_raw_exchange, path, wire, 10)
        statuses = [status for _, status in sorted(replies)]
        assert statuses == [Status.OK] * 3 + [Status.RATE_LIMITED] * 7
        assert server.stats()["rate_limited"] == 7
    finally:
        await server.close()


async def test_global_in_flight_limit_answers_busy(tmp_path: Path) -> None:
    server, path = await start_server(tmp_path, max_in_flight=1)
    try:
        assert (await ask(path, GenerateRequest(1, "rsa4096", "big")))[0] is Status.OK
        wire = b"".join(encode_request(SignRequest(i, "big", 0x0804, DATA)) for i in range(4))
        replies = dict(await asyncio.to_thread(_raw_exchange, path, wire, 4))
        assert replies[0] is Status.OK
        assert [replies[i] for i in (1, 2, 3)] == [Status.BUSY] * 3
    finally:
        await server.close()


async def test_hostile_input_closes_only_that_connection(keyserver: tuple[KeyServer, Path]) -> None:
    server, path = keyserver
    await ask(path, GenerateRequest(1, "p256", "k"))
    provider = await build(path, "k")
    try:
        await provider.sign(provider.schemes[0], DATA)  # a pooled connection is open
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"\xff\xff\xff\xff")  # a 4 GiB frame header
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # Unknown operation inside a well-formed frame: also closed.
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"\x00\x00\x00\x05\x63\x00\x00\x00\x01")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert server.stats()["protocol_errors"] == 2
        verify_tls_signature(
            provider.public_key, provider.schemes[0], await provider.sign(provider.schemes[0], DATA), DATA
        )
    finally:
        provider.close()


async def test_a_stalled_frame_times_out(tmp_path: Path) -> None:
    server, path = await start_server(tmp_path, frame_timeout=0.2)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"\x00\x00\x00\x10\x05")  # 16 bytes announced, 1 sent
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert server.stats()["timeouts"] == 1
    finally:
        await server.close()


async def test_sign_errors_are_reported_not_fatal(keyserver: tuple[KeyServer, Path]) -> None:
    _, path = keyserver
    await ask(path, GenerateRequest(1, "ed25519", "ed"))
    status, message = await ask(path, SignRequest(2, "ed", 0x0804, DATA))
    assert status is Status.BAD_REQUEST
    assert b"cannot sign with scheme 0x0804" in message
    assert (await ask(path, SignRequest(3, "nope", 0x0807, DATA)))[0] is Status.NOT_FOUND


@pytest.mark.parametrize("key_type", ["rsa2048", "p256"])
async def test_mtls_handshake_with_openssl_s_client(
    keyserver: tuple[KeyServer, Path], tmp_path: Path, key_type: str
) -> None:
    _, path = keyserver
    status, spki = await ask(path, GenerateRequest(1, key_type, "server"))
    assert status is Status.OK
    pki = MiniPki.create(tmp_path)
    cert_file = issue_for(pki, "server", load_public_key(spki))
    client = pki.issue("client", "ecdsa")
    context = server_context(pki, cert_file, provider_config(path, "server"))
    # Building the provider asks the key server (in this loop) for the public key.
    factory = await asyncio.to_thread(MeshletTlsSocketFactory.from_context, context)
    served = await meshlet_serve(factory, lambda info: Echo(info, upper=True))
    try:
        output = await asyncio.to_thread(
            openssl_client,
            served.port,
            "-CAfile",
            str(pki.ca_file),
            "-cert",
            str(client.cert_file),
            "-key",
            str(client.key_file),
            "-verify_return_error",
            "-servername",
            "localhost",
            "-ign_eof",
            stdin=b"hello\n",
        )
        assert "Verify return code: 0 (ok)" in output
        assert "TLSv1.3" in output
        assert "HELLO" in output  # the server's echo, through the handshake it signed
        assert factory.config.key.stats()["ops"] == 1  # type: ignore[union-attr]
    finally:
        served.server.close()
        factory.config.key.close()  # type: ignore[union-attr]


async def test_a_second_server_does_not_steal_a_live_socket(
    keyserver: tuple[KeyServer, Path], tmp_path: Path
) -> None:
    _, path = keyserver
    second = KeyServer(KeyStore(tmp_path / "other-keys"))
    with pytest.raises(OSError, match="another key server is serving on"):
        await second.start(path)
    await second.close()
    assert (await ask(path, ListRequest(1)))[0] is Status.OK
