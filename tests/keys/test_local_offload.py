"""meshlet.local and meshlet.offload: verified signatures for every key type,
the offload queue bound, the loop staying responsive, and real handshakes
with the stdlib (OpenSSL) client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from keys_helpers import (
    Echo,
    MiniPki,
    client_ssl_context,
    meshlet_serve,
    server_context,
    stdlib_exchange,
    verify_tls_signature,
)

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError
from meshlet.keys.local import LocalKeyProvider, SigningKey
from meshlet.keys.offload import OffloadKeyProvider
from meshlet.registry import registry
from meshlet.tls.aio import MeshletTlsSocketFactory
from meshlet.tls.crypto import schemes_for_key

KEYS: dict[str, SigningKey] = {
    "rsa2048": rsa.generate_private_key(65537, 2048),
    "p256": ec.generate_private_key(ec.SECP256R1()),
    "p384": ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
}
DATA = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + bytes(range(32))


@pytest.mark.parametrize("kind", list(KEYS))
async def test_local_signatures_verify(kind: str) -> None:
    provider = LocalKeyProvider(KEYS[kind])
    for scheme in schemes_for_key(KEYS[kind].public_key()):
        verify_tls_signature(provider.public_key, scheme, await provider.sign(scheme, DATA), DATA)


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("kind", ["rsa2048", "p256", "ed25519"])
async def test_offload_signatures_verify(mode: str, kind: str) -> None:
    provider = OffloadKeyProvider(KEYS[kind], mode=mode, workers=2)
    try:
        schemes = schemes_for_key(KEYS[kind].public_key())
        signatures = await asyncio.gather(*(provider.sign(s, DATA) for s in schemes))
        for scheme, signature in zip(schemes, signatures):
            verify_tls_signature(provider.public_key, scheme, signature, DATA)
        assert provider.stats()["ops"] == len(schemes)
        assert provider.stats()["mode"] == mode
    finally:
        provider.close()


async def test_offload_keeps_the_loop_serving_while_signs_are_in_flight() -> None:
    provider = OffloadKeyProvider(rsa.generate_private_key(65537, 4096), workers=2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    tick_task = asyncio.ensure_future(ticker())
    try:
        signs = [provider.sign(0x0804, DATA) for _ in range(16)]
        signatures = await asyncio.wait_for(asyncio.gather(*signs), 30)
    finally:
        tick_task.cancel()
        provider.close()
    assert len(signatures) == 16
    # 16 RSA-4096 signatures take tens of ms; the loop ran all along.
    assert ticks > 16


async def test_offload_in_flight_bound_holds_back_extra_signs() -> None:
    provider = OffloadKeyProvider(
        rsa.generate_private_key(65537, 3072), workers=2, max_in_flight=2, queue_timeout=20
    )
    peak = 0
    waiting_seen = False

    async def sample() -> None:
        nonlocal peak, waiting_seen
        while True:
            stats = provider.stats()
            peak = max(peak, stats["submitted"])
            waiting_seen = waiting_seen or stats["in_flight"] > stats["submitted"]
            await asyncio.sleep(0)

    sampler = asyncio.ensure_future(sample())
    try:
        signatures = await asyncio.wait_for(
            asyncio.gather(*(provider.sign(0x0804, DATA) for _ in range(12))), 30
        )
    finally:
        sampler.cancel()
        provider.close()
    for signature in signatures:
        verify_tls_signature(provider.public_key, 0x0804, signature, DATA)
    assert peak == 2
    assert waiting_seen  # some signs waited for a slot instead of queueing in the pool


def test_offload_settings() -> None:
    factory = registry.lookup("key_provider", name="meshlet.offload").factory
    with pytest.raises(ConfigError, match=r"typed_config.mode: must be one of thread, process"):
        factory(
            PrivateKeyProviderConfig(
                "meshlet.offload", {"private_key": {"inline_string": "x"}, "mode": "gpu"}
            )
        )


def _provider_config(name: str, leaf_key: Path, **extra: object) -> PrivateKeyProviderConfig:
    return PrivateKeyProviderConfig(name, {"private_key": {"filename": str(leaf_key)}, **extra})


@pytest.mark.parametrize(
    ("name", "kind", "extra"),
    [
        ("meshlet.local", "rsa", {}),
        ("meshlet.local", "ed25519", {}),
        ("meshlet.offload", "rsa", {"mode": "thread", "workers": 2.0}),
        ("meshlet.offload", "ecdsa", {"mode": "process", "workers": 1.0}),
    ],
)
async def test_mtls_handshake_with_stdlib_client(
    tmp_path: Path, name: str, kind: str, extra: dict[str, object]
) -> None:
    pki = MiniPki.create(tmp_path)
    leaf = pki.issue("server", kind)
    client = pki.issue("client", "ecdsa")
    context = server_context(pki, leaf.cert_file, _provider_config(name, leaf.key_file, **extra))
    factory = MeshletTlsSocketFactory.from_context(context)
    server = await meshlet_serve(factory, Echo)
    try:
        echoed = await asyncio.to_thread(stdlib_exchange, server.port, client_ssl_context(pki, client))
        assert echoed == b"ping\n"
        assert factory.config.key.stats()["ops"] == 1  # type: ignore[union-attr]
    finally:
        server.server.close()
        factory.config.key.close()  # type: ignore[union-attr]
