"""``meshlet.batch``: batching, flushing, fallback, settings, and real TLS 1.3
handshakes signed by batches, checked by OpenSSL (stdlib ``ssl`` and
``openssl s_client``). Every signature the provider returns is verified."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

sys.path.insert(0, str(Path(__file__).parents[1] / "tls"))

from tls_helpers import Echo, MiniPki, meshlet_serve

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError
from meshlet.keys import crypto_mb
from meshlet.keys.base import KeyProviderUnavailable, ProviderUnavailable
from meshlet.keys.batch import BatchKeyProvider, build_batch, measure, parse_duration
from meshlet.keys.crypto_mb import Lane, LaneResult, Probe
from meshlet.keys.local import SigningKey
from meshlet.tls.aio import MeshletTlsSocketFactory
from meshlet.tls.config import TlsConfig
from meshlet.tls.crypto import SignatureScheme, verify

needs_crypto_mb = pytest.mark.skipif(not crypto_mb.probe().usable, reason=crypto_mb.probe().reason)

RSA_SCHEMES = (
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
)


@cache
def key_of(kind: str) -> SigningKey:
    if kind.startswith("RSA-"):
        return rsa.generate_private_key(65537, int(kind[4:]))
    if kind == "P-384":
        return ec.generate_private_key(ec.SECP384R1())
    return ec.generate_private_key(ec.SECP256R1())


def schemes_of(kind: str) -> Sequence[int]:
    if kind.startswith("RSA-"):
        return RSA_SCHEMES
    if kind == "P-384":
        return (SignatureScheme.ecdsa_secp384r1_sha384,)
    return (SignatureScheme.ecdsa_secp256r1_sha256,)


async def sign_all(
    provider: BatchKeyProvider, count: int, payload: bytes = b""
) -> list[tuple[int, bytes, bytes]]:
    """``count`` concurrent signs cycling through the key's schemes."""
    schemes = list(provider.schemes)
    jobs = [(schemes[i % len(schemes)], payload or f"message {i}".encode()) for i in range(count)]
    signatures = await asyncio.gather(*(provider.sign(s, d) for s, d in jobs))
    return [(s, d, sig) for (s, d), sig in zip(jobs, signatures, strict=True)]


def check(provider: BatchKeyProvider, signed: list[tuple[int, bytes, bytes]]) -> None:
    for scheme, data, signature in signed:
        verify(provider.public_key, scheme, signature, data)


# --------------------------------------------------------------------------- #
# Batched signing
# --------------------------------------------------------------------------- #


@needs_crypto_mb
@pytest.mark.parametrize("kind", ["RSA-2048", "RSA-3072", "RSA-4096", "P-256", "P-384"])
async def test_every_batched_signature_verifies(kind: str) -> None:
    provider = BatchKeyProvider(key_of(kind), min_batch=1, poll_delay=0.001, backend="crypto_mb_always")
    assert provider.batched and provider.fallback_reason is None
    signed = await sign_all(provider, 8 + 3)  # one full batch and a partial one
    check(provider, signed)
    stats = provider.stats()
    assert stats["path"] == "crypto_mb" and stats["key_type"] == kind
    assert stats["ops"] == 11 and stats["software_ops"] == 0 and stats["lane_errors"] == 0
    assert stats["queue"]["batched_ops"] == 11 and stats["queue"]["full_flushes"] >= 1


@needs_crypto_mb
async def test_a_full_batch_leaves_without_waiting_for_the_timer() -> None:
    provider = BatchKeyProvider(key_of("P-256"), min_batch=1, poll_delay=1.0, max_batch=4)
    signed = await asyncio.wait_for(sign_all(provider, 4), 0.9)
    check(provider, signed)
    assert provider.stats()["queue"] == {
        "batches": 1,
        "batched_ops": 4,
        "mean_batch": 4.0,
        "full_flushes": 1,
        "idle_flushes": 0,
        "timer_flushes": 0,
        "unbatched_ops": 0,
    }


@needs_crypto_mb
async def test_a_partial_batch_leaves_once_the_loop_is_idle_not_after_poll_delay() -> None:
    provider = BatchKeyProvider(key_of("RSA-2048"), min_batch=1, poll_delay=1.0)
    started = time.monotonic()
    signed = await sign_all(provider, 3)
    assert time.monotonic() - started < 0.9  # poll_delay is only the upper bound
    check(provider, signed)
    queue = provider.stats()["queue"]
    assert queue["batches"] == 1 and queue["idle_flushes"] == 1
    assert queue["timer_flushes"] == 0 and queue["full_flushes"] == 0


@needs_crypto_mb
async def test_keys_of_one_type_share_batches_and_each_gets_its_own_signature() -> None:
    rsa_providers = [
        BatchKeyProvider(rsa.generate_private_key(65537, 2048), min_batch=1, poll_delay=0.002)
        for _ in range(3)
    ]
    ec_providers = [
        BatchKeyProvider(ec.generate_private_key(ec.SECP256R1()), min_batch=1, poll_delay=0.002)
        for _ in range(2)
    ]
    providers = rsa_providers + ec_providers
    results = await asyncio.gather(*(sign_all(p, 7) for p in providers))
    for provider, signed in zip(providers, results, strict=True):
        check(provider, signed)
    rsa_queue = rsa_providers[0].stats()["queue"]
    assert rsa_queue["batched_ops"] == 21 and rsa_queue["batches"] < 21  # lanes mixed keys
    assert ec_providers[0].stats()["queue"]["batched_ops"] == 14


@needs_crypto_mb
@pytest.mark.parametrize("kind", ["P-256", "P-384"])
async def test_ecdsa_nonces_are_never_reused(kind: str) -> None:
    provider = BatchKeyProvider(key_of(kind), min_batch=1, poll_delay=0.001)
    signed = await sign_all(provider, 400, payload=b"the same message every time")
    check(provider, signed)
    r_values = {decode_dss_signature(signature)[0] for _, _, signature in signed}
    assert len(r_values) == 400


@needs_crypto_mb
async def test_rsa_pss_salts_are_fresh() -> None:
    provider = BatchKeyProvider(key_of("RSA-2048"), min_batch=1, poll_delay=0.001)
    signed = await sign_all(provider, 16, payload=b"same")
    check(provider, signed)
    assert len({signature for _, _, signature in signed}) == 16


@needs_crypto_mb
async def test_a_lane_the_library_refuses_is_signed_in_software() -> None:
    provider = BatchKeyProvider(key_of("P-256"), min_batch=1, poll_delay=0.001)
    signer = provider._signer
    assert signer is not None
    real = signer.run

    def second_lane_fails(lanes: Sequence[Lane]) -> list[LaneResult]:
        results = real(lanes)
        results[1] = 8  # signature error
        return results

    signer.run = second_lane_fails
    signed = await sign_all(provider, 4)
    check(provider, signed)
    stats = provider.stats()
    assert stats["lane_errors"] == 1 and stats["software_ops"] == 1


@needs_crypto_mb
async def test_a_failing_batch_call_falls_back_for_all_its_lanes(caplog: pytest.LogCaptureFixture) -> None:
    provider = BatchKeyProvider(key_of("RSA-2048"), min_batch=1, poll_delay=0.001)
    assert provider._signer is not None

    def broken(lanes: Sequence[Lane]) -> list[LaneResult]:
        raise OSError("simulated library failure")

    provider._signer.run = broken
    with caplog.at_level(logging.WARNING, logger="meshlet.keys.batch"):
        signed = await sign_all(provider, 3)
    check(provider, signed)
    assert provider.stats()["lane_errors"] == 3
    assert "simulated library failure" in caplog.text


@needs_crypto_mb
async def test_while_a_batch_is_computed_the_next_one_gathers() -> None:
    provider = BatchKeyProvider(key_of("RSA-2048"), min_batch=1, poll_delay=0.001, execution="thread")
    signer = provider._signer
    assert signer is not None
    real = signer.run

    def slow(lanes: Sequence[Lane]) -> list[LaneResult]:
        time.sleep(0.2)
        return real(lanes)

    signer.run = slow
    first = asyncio.ensure_future(provider.sign(RSA_SCHEMES[0], b"first"))
    await asyncio.sleep(0.05)  # the first batch (one lane) is in the worker now
    rest = await sign_all(provider, 5)
    check(provider, [*rest, (RSA_SCHEMES[0], b"first", await first)])
    queue = provider.stats()["queue"]
    assert queue["batches"] == 2 and queue["batched_ops"] == 6  # not five batches of one


@needs_crypto_mb
async def test_a_stuck_batch_times_out_and_the_queue_moves_on() -> None:
    provider = BatchKeyProvider(
        key_of("P-256"), min_batch=1, poll_delay=0.001, sign_timeout=0.1, execution="thread"
    )
    signer = provider._signer
    assert signer is not None
    real = signer.run
    calls = 0

    def stuck_once(lanes: Sequence[Lane]) -> list[LaneResult]:
        nonlocal calls
        calls += 1
        if calls == 1:
            time.sleep(0.3)
        return real(lanes)

    signer.run = stuck_once
    with pytest.raises(KeyProviderUnavailable, match=r"no signature within 0\.1 s"):
        await provider.sign(SignatureScheme.ecdsa_secp256r1_sha256, b"stuck")
    await asyncio.sleep(0.3)  # the worker thread is free again
    check(provider, await sign_all(provider, 3))
    assert provider.stats()["errors"] == 1 and provider.stats()["in_flight"] == 0


def wait_child(pid: int, timeout: float) -> int:
    """The child's exit code; killed (and a failure) if it outlives ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child did not finish signing")


@needs_crypto_mb
def test_a_forked_worker_process_gets_its_own_batch_thread() -> None:
    provider = BatchKeyProvider(key_of("RSA-2048"), min_batch=1, poll_delay=0.001, execution="thread")

    async def sign_and_check(count: int) -> None:
        check(provider, await asyncio.wait_for(sign_all(provider, count), 5))

    asyncio.run(sign_and_check(2))  # the parent's worker thread now exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            asyncio.run(sign_and_check(3))
            code = 0
        finally:
            os._exit(code)
    assert wait_child(pid, 10) == 0


def test_execution_defaults_to_inline_for_ecdsa_and_thread_for_rsa() -> None:
    assert BatchKeyProvider(key_of("P-256")).stats()["execution"] == "inline"
    assert BatchKeyProvider(key_of("RSA-2048")).stats()["execution"] == "thread"
    assert BatchKeyProvider(key_of("P-384"), execution="thread").stats()["execution"] == "thread"
    with pytest.raises(ValueError, match="execution"):
        BatchKeyProvider(key_of("P-256"), execution="gpu")


# --------------------------------------------------------------------------- #
# Software fallback
# --------------------------------------------------------------------------- #


async def test_software_backend_setting_forces_the_fallback(caplog: pytest.LogCaptureFixture) -> None:
    pem = key_of("RSA-2048").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    config = PrivateKeyProviderConfig(
        "meshlet.batch", {"private_key": {"inline_string": pem.decode()}, "backend": "software"}
    )
    with caplog.at_level(logging.WARNING, logger="meshlet.keys.batch"):
        provider = build_batch(config)
    assert [r.getMessage() for r in caplog.records] == [
        "meshlet.batch: RSA-2048 key signs in software: software backend chosen by the 'backend' setting"
    ]
    signed = await sign_all(provider, 5)
    check(provider, signed)
    stats = provider.stats()
    assert stats["path"] == "software" and stats["software_ops"] == 5
    assert stats["fallback_reason"] == "software backend chosen by the 'backend' setting"
    assert "queue" not in stats


async def test_without_the_library_it_signs_in_software_or_refuses() -> None:
    absent = Probe(error="libcrypto_mb not found (pip install ipp-crypto)")
    provider = BatchKeyProvider(key_of("P-256"), report=absent)
    assert not provider.batched and provider.fallback_reason == absent.reason
    check(provider, await sign_all(provider, 3))
    with pytest.raises(ProviderUnavailable, match="libcrypto_mb not found"):
        BatchKeyProvider(key_of("P-256"), report=absent, software_fallback=False)
    no_ifma = Probe(library="libcrypto_mb.so", cpu_features=crypto_mb.CPU_AVX512F, applicable=False)
    assert BatchKeyProvider(key_of("P-256"), report=no_ifma).fallback_reason == "the CPU has no AVX-512 IFMA"


async def test_keys_crypto_mb_does_not_batch_go_to_software() -> None:
    ed = BatchKeyProvider(ed25519.Ed25519PrivateKey.generate())
    assert not ed.batched and "Ed25519" in (ed.fallback_reason or "")
    check(ed, await sign_all(ed, 2))
    small = BatchKeyProvider(rsa.generate_private_key(65537, 1024))
    assert not small.batched and "RSA-1024" in (small.fallback_reason or "")
    check(small, await sign_all(small, 2))


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #


def test_settings_from_a_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        key_of("P-384").private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    provider = build_batch(
        PrivateKeyProviderConfig(
            "meshlet.batch",
            {"key": str(key_file), "poll_delay": "0.5ms", "max_batch": 4.0, "software_fallback": True},
        )
    )
    stats = provider.stats()
    assert stats["max_batch"] == 4 and stats["poll_delay_ms"] == pytest.approx(0.5)
    assert stats["key_type"] == "P-384"


@pytest.mark.parametrize(
    ("settings", "field", "message"),
    [
        ({"key": "/nonexistent/key.pem"}, "key", "cannot read"),
        ({}, "typed_config", "exactly one of key"),
        ({"key": "k", "private_key": {"filename": "k"}}, "typed_config", "exactly one of key"),
        ({"key": "k", "max_batch": 9}, "max_batch", "must be in [1, 8]"),
        ({"key": "k", "poll_delay": "soon"}, "poll_delay", "must be a duration"),
        ({"key": "k", "poll_delay": "2s"}, "poll_delay", "between 0 and 1 s"),
        ({"key": "k", "software_fallback": "no"}, "software_fallback", "true or false"),
        ({"key": "k", "backend": "qat"}, "backend", "must be one of crypto_mb, crypto_mb_always, software"),
        ({"key": "k", "flush": 1}, "flush", "unknown meshlet.batch setting"),
        ({"key": "k", "execution": "gpu"}, "execution", "must be one of auto, thread, inline"),
    ],
)
def test_bad_settings_name_their_field(
    tmp_path: Path, settings: dict[str, object], field: str, message: str
) -> None:
    if settings.get("key") == "k":
        key_file = tmp_path / "k.pem"
        key_file.write_bytes(
            key_of("P-256").private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        settings = {**settings, "key": str(key_file)}
    with pytest.raises(ConfigError) as info:
        build_batch(PrivateKeyProviderConfig("meshlet.batch", settings))
    assert info.value.path.endswith(field)
    assert message in info.value.message


def test_durations() -> None:
    assert parse_duration("0.2ms", "p") == pytest.approx(0.0002)
    assert parse_duration("200us", "p") == pytest.approx(0.0002)
    assert parse_duration("0.0002s", "p") == pytest.approx(0.0002)
    assert parse_duration(0.001, "p") == pytest.approx(0.001)
    assert parse_duration(0, "p") == 0.0
    with pytest.raises(ConfigError):
        parse_duration(True, "p")


# --------------------------------------------------------------------------- #
# Real TLS 1.3 handshakes signed in batches
# --------------------------------------------------------------------------- #


def client_context(pki: MiniPki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki.ca_file)
    return ctx


async def stdlib_round_trip(port: int, ctx: ssl.SSLContext, line: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 5
    )
    try:
        writer.write(line)
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


@needs_crypto_mb
@pytest.mark.interop
@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "p384"])
async def test_concurrent_tls13_handshakes_signed_by_batches(tmp_path: Path, kind: str) -> None:
    pki = MiniPki.create(tmp_path)
    leaf = pki.issue("server", kind)
    assert isinstance(leaf.key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    provider = BatchKeyProvider(leaf.key, min_batch=1, poll_delay=0.005)
    factory = MeshletTlsSocketFactory(TlsConfig(certificate_chain=leaf.chain, key=provider), server_side=True)
    served = await meshlet_serve(factory, lambda info: Echo(info))
    try:
        ctx = client_context(pki)
        lines = [f"hello {i}\n".encode() for i in range(12)]
        replies = await asyncio.gather(*(stdlib_round_trip(served.port, ctx, line) for line in lines))
        assert replies == lines
    finally:
        served.server.close()
    stats = provider.stats()
    assert stats["ops"] == 12 and stats["software_ops"] == 0 and not served.failures
    assert stats["queue"]["batched_ops"] == 12 and stats["queue"]["batches"] < 12


@needs_crypto_mb
@pytest.mark.interop
async def test_openssl_s_client_verifies_a_batched_rsa_pss_signature(tmp_path: Path) -> None:
    pki = MiniPki.create(tmp_path)
    leaf = pki.issue("server", "rsa")
    assert isinstance(leaf.key, rsa.RSAPrivateKey)
    provider = BatchKeyProvider(leaf.key, min_batch=1, poll_delay=0.0002)
    factory = MeshletTlsSocketFactory(TlsConfig(certificate_chain=leaf.chain, key=provider), server_side=True)
    served = await meshlet_serve(factory, lambda info: Echo(info))
    command = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{served.port}", "-tls1_3", "-CAfile", str(pki.ca_file),
        "-verify_return_error", "-servername", "localhost", "-sigalgs", "rsa_pss_rsae_sha384", "-quiet",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"batched\n")
        await proc.stdin.drain()
        reply = await asyncio.wait_for(proc.stdout.readline(), 8)
        assert reply == b"batched\n"
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 5)
        served.server.close()
    assert provider.stats()["ops"] == 1 and provider.stats()["path"] == "crypto_mb"


def ensure_registered() -> None:
    """``meshlet.keys`` registers ``meshlet.batch`` (lazily) on import."""
    import meshlet.keys  # noqa: F401
    from meshlet.registry import registry

    assert "meshlet.batch" in registry.names("key_provider")


@needs_crypto_mb
@pytest.mark.interop
async def test_batch_provider_from_envoy_config(tmp_path: Path) -> None:
    from meshlet.config.loader import parse_resource
    from meshlet.config.tls import compile_transport_socket
    from meshlet.proxy.listeners.transport_sockets import make_factory

    ensure_registered()
    pki = MiniPki.create(tmp_path)
    leaf = pki.issue("server", "p384")
    settings = {
        "key": str(leaf.key_file),
        "poll_delay": "0.2ms",
        "max_batch": 8,
        "min_batch": 1,
        "software_fallback": False,
    }
    data = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(leaf.cert_file)},
                        "private_key_provider": {
                            "provider_name": "meshlet.batch",
                            "typed_config": {
                                "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                                "value": settings,
                            },
                        },
                    }
                ]
            },
        },
    }
    compiled = compile_transport_socket(
        parse_resource("type.googleapis.com/envoy.config.core.v3.TransportSocket", data),
        "transport_socket",
        server_side=True,
    )
    factory = make_factory(compiled, default_engine="meshlet")
    assert isinstance(factory, MeshletTlsSocketFactory)
    provider = factory.config.key
    assert isinstance(provider, BatchKeyProvider)
    served = await meshlet_serve(factory, lambda info: Echo(info))
    try:
        ctx = client_context(pki)
        replies = await asyncio.gather(*(stdlib_round_trip(served.port, ctx, b"envoy\n") for _ in range(4)))
        assert replies == [b"envoy\n"] * 4
    finally:
        served.server.close()
    stats = provider.stats()
    assert stats["path"] == "crypto_mb" and stats["key_type"] == "P-384" and stats["ops"] == 4


# --------------------------------------------------------------------------- #
# The micro-benchmark
# --------------------------------------------------------------------------- #


def test_measure_reports_both_rates() -> None:
    report = measure("P-256", 0.6, concurrency=16)
    assert report["key_type"] == "P-256"
    assert report["path"] == ("crypto_mb" if crypto_mb.probe().supports("P-256") else "software")
    for run in ("batch_thread", "batch_inline", "cryptography"):
        assert report[run]["signs_per_s"] > 0 and report[run]["signs_per_cpu_s"] > 0
    assert report["lane_errors"] == 0 and report["speedup_per_cpu"] > 0
    with pytest.raises(ValueError, match="unknown key type"):
        measure("DSA-1024", 0.1)


def test_the_provider_verifies_with_cryptography_too() -> None:
    # The checker used above is meshlet's own; make sure it rejects a bad signature.
    key = key_of("P-256")
    good = key.sign(b"x", ec.ECDSA(hashes.SHA256()))
    verify(key.public_key(), SignatureScheme.ecdsa_secp256r1_sha256, good, b"x")
    with pytest.raises(Exception, match="invalid"):
        verify(key.public_key(), SignatureScheme.ecdsa_secp256r1_sha256, good, b"y")
