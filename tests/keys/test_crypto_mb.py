"""The crypto_mb binding: discovery, CPU probe, number conversion, the mb8
calls with full and partial batches and per-lane statuses, and EMSA-PSS.
Every signature is checked with ``cryptography``."""

from __future__ import annotations

import ctypes
import hashlib
import secrets
from functools import cache
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meshlet.keys import crypto_mb
from meshlet.keys.crypto_mb import EcdsaLane, Probe, RsaCrtKey, RsaLane
from meshlet.keys.pss import emsa_pss_encode, mgf1

needs_crypto_mb = pytest.mark.skipif(not crypto_mb.probe().usable, reason=crypto_mb.probe().reason)

HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


@cache
def rsa_keys(bits: int) -> tuple[rsa.RSAPrivateKey, ...]:
    return tuple(rsa.generate_private_key(65537, bits) for _ in range(2))


def crt(key: rsa.RSAPrivateKey) -> RsaCrtKey:
    n = key.private_numbers()
    return RsaCrtKey.from_numbers(key.key_size, n.p, n.q, n.dmp1, n.dmq1, n.iqmp)


def verify_pss(key: rsa.RSAPrivateKey, signature: bytes, message: bytes, hash_name: str) -> None:
    algorithm = HASHES[hash_name]
    pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
    key.public_key().verify(signature, message, pss, algorithm)


# --------------------------------------------------------------------------- #
# Probe and discovery
# --------------------------------------------------------------------------- #


def test_probe_agrees_with_the_kernel_about_ifma() -> None:
    report = crypto_mb.probe()
    flags = Path("/proc/cpuinfo").read_text()
    if report.error is None:
        assert report.library is not None and Path(report.library).exists()
        assert report.has_ifma == (" avx512ifma" in flags)
        assert report.usable == (report.has_ifma and report.applicable)
        assert set(report.algorithms) == set(crypto_mb.ALGORITHMS)
    else:
        assert not report.usable
    summary = report.as_dict()
    assert summary["usable"] == report.usable and summary["reason"] == report.reason


def test_probe_reasons_name_what_is_missing() -> None:
    assert Probe(error="libcrypto_mb not found (pip install ipp-crypto)").reason.startswith("libcrypto_mb")
    assert "IFMA" in Probe(cpu_features=crypto_mb.CPU_AVX512F).reason
    no_os = Probe(cpu_features=crypto_mb.CPU_AVX512IFMA)
    assert "OS" in no_os.reason and not no_os.usable
    ok = Probe(
        cpu_features=crypto_mb.CPU_AVX512IFMA | crypto_mb.CPU_AVX512_ENABLED_BY_OS,
        applicable=True,
        algorithms={"P-256": True},
    )
    assert ok.usable and ok.supports("P-256") and not ok.supports("RSA-2048")


def test_find_library_looks_in_the_wheel_then_the_search_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert crypto_mb.find_library(("libmeshlet-absent.so",), "no-such-distribution") is None
    (tmp_path / "libmeshlet-test.so").write_bytes(b"")
    monkeypatch.setenv(crypto_mb.LIBRARY_DIR_ENV, str(tmp_path))
    found = crypto_mb.find_library(("libmeshlet-test.so",), "no-such-distribution")
    assert found == (tmp_path / "libmeshlet-test.so").resolve()


# --------------------------------------------------------------------------- #
# Numbers and statuses
# --------------------------------------------------------------------------- #


def test_limbs_are_little_endian_64_bit_words() -> None:
    value = (1 << 64) * 3 + 5
    words = crypto_mb.to_limbs(value, 4)
    assert list(words) == [5, 3, 0, 0]
    assert crypto_mb.from_limbs(words) == value
    big = secrets.randbits(2048)
    assert crypto_mb.from_limbs(crypto_mb.to_limbs(big, 32)) == big
    with pytest.raises(ValueError, match="does not fit"):
        crypto_mb.to_limbs(1 << 256, 4)


def test_lane_statuses_are_nibbles() -> None:
    assert crypto_mb.lane_statuses(0x80000021) == [1, 2, 0, 0, 0, 0, 0, 8]
    assert crypto_mb.lane_status_names(0) == "ok"
    assert crypto_mb.lane_status_names(9) == "mismatched parameter, signature error"


def test_rsa_keys_of_other_sizes_are_refused() -> None:
    key = rsa.generate_private_key(65537, 1024)
    n = key.private_numbers()
    with pytest.raises(ValueError, match="not 1024-bit"):
        RsaCrtKey.from_numbers(1024, n.p, n.q, n.dmp1, n.dmq1, n.iqmp)


# --------------------------------------------------------------------------- #
# EMSA-PSS, checked with a textbook RSA private operation (no crypto_mb)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bits", [2048, 2049, 3072])
@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_pss_encoding_verifies_with_cryptography(bits: int, hash_name: str) -> None:
    key = rsa.generate_private_key(65537, bits) if bits != 2048 else rsa_keys(2048)[0]
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    message = b"TLS 1.3, server CertificateVerify" + secrets.token_bytes(40)
    encoded = emsa_pss_encode(message, key.key_size, hash_name)
    assert len(encoded) == (key.key_size + 7) // 8
    assert int.from_bytes(encoded, "big") < n
    signature = pow(int.from_bytes(encoded, "big"), numbers.d, n).to_bytes(len(encoded), "big")
    verify_pss(key, signature, message, hash_name)
    with pytest.raises(InvalidSignature):
        verify_pss(key, signature, message + b"!", hash_name)


def test_pss_salt_is_fresh_and_mgf1_matches_its_definition() -> None:
    assert emsa_pss_encode(b"m", 2048, "sha256") != emsa_pss_encode(b"m", 2048, "sha256")
    fixed = emsa_pss_encode(b"m", 2048, "sha256", random=lambda n: b"\x07" * n)
    assert fixed == emsa_pss_encode(b"m", 2048, "sha256", random=lambda n: b"\x07" * n)
    seed = b"seed"
    expected = hashlib.sha256(seed + b"\0\0\0\0").digest() + hashlib.sha256(seed + b"\0\0\0\1").digest()
    assert mgf1(seed, 40, "sha256") == expected[:40]
    with pytest.raises(ValueError, match="too small"):
        emsa_pss_encode(b"m", 512, "sha512")


# --------------------------------------------------------------------------- #
# The mb8 calls
# --------------------------------------------------------------------------- #


@needs_crypto_mb
@pytest.mark.parametrize("bits", [2048, 3072, 4096])
@pytest.mark.parametrize("lanes", [1, 5, 8])
def test_rsa_crt_mb8_signs_every_lane(bits: int, lanes: int) -> None:
    mb = crypto_mb.load()
    keys = rsa_keys(bits)
    crts = [crt(k) for k in keys]
    hash_names = ["sha256", "sha384", "sha512"]
    messages = [secrets.token_bytes(64) for _ in range(lanes)]
    batch = [
        RsaLane(crts[i % 2], emsa_pss_encode(m, bits, hash_names[i % 3])) for i, m in enumerate(messages)
    ]
    results = mb.rsa_private_crt(batch)
    assert len(results) == lanes
    for i, (message, signature) in enumerate(zip(messages, results, strict=True)):
        assert isinstance(signature, bytes) and len(signature) == bits // 8
        verify_pss(keys[i % 2], signature, message, hash_names[i % 3])


@needs_crypto_mb
@pytest.mark.parametrize(("curve", "hash_name"), [(ec.SECP256R1(), "sha256"), (ec.SECP384R1(), "sha384")])
@pytest.mark.parametrize("lanes", [1, 3, 8])
def test_ecdsa_mb8_signs_every_lane(curve: ec.EllipticCurve, hash_name: str, lanes: int) -> None:
    mb = crypto_mb.load()
    spec = crypto_mb.ECDSA_CURVES["P-256" if curve.key_size == 256 else "P-384"]
    keys = [ec.generate_private_key(curve) for _ in range(2)]
    privates = [EcdsaLane.private_limbs(spec, k.private_numbers().private_value) for k in keys]
    messages = [secrets.token_bytes(50) for _ in range(lanes)]
    batch = []
    for i, message in enumerate(messages):
        e = int.from_bytes(hashlib.new(hash_name, message).digest(), "big") % spec.order
        batch.append(EcdsaLane(spec, privates[i % 2], secrets.randbelow(spec.order - 1) + 1, e))
    results = mb.ecdsa_sign(batch)
    for i, (message, result) in enumerate(zip(messages, results, strict=True)):
        assert isinstance(result, tuple)
        keys[i % 2].public_key().verify(encode_dss_signature(*result), message, ec.ECDSA(HASHES[hash_name]))


@needs_crypto_mb
def test_a_bad_lane_reports_its_status_and_spares_the_others() -> None:
    mb = crypto_mb.load()
    spec = crypto_mb.ECDSA_CURVES["P-256"]
    key = ec.generate_private_key(ec.SECP256R1())
    good = EcdsaLane.private_limbs(spec, key.private_numbers().private_value)
    zero_key = crypto_mb.to_limbs(0, spec.limbs)  # the library refuses a zero private key
    digest = int.from_bytes(hashlib.sha256(b"m").digest(), "big") % spec.order
    batch = [
        EcdsaLane(spec, good if i != 1 else zero_key, secrets.randbelow(spec.order - 1) + 1, digest)
        for i in range(3)
    ]
    results = mb.ecdsa_sign(batch)
    assert isinstance(results[1], int) and results[1] & 1  # mismatched parameter
    for i in (0, 2):
        result = results[i]
        assert isinstance(result, tuple)
        key.public_key().verify(encode_dss_signature(*result), b"m", ec.ECDSA(hashes.SHA256()))


@needs_crypto_mb
@pytest.mark.parametrize("exponent", [65537, 3])
def test_a_faulty_crt_result_never_leaves(exponent: int) -> None:
    # A wrong dp makes the CRT half-result wrong, as a hardware fault would:
    # that lane must come back as a signature error, the others as signatures.
    mb = crypto_mb.load()
    key = rsa_keys(2048)[0] if exponent == 65537 else rsa.generate_private_key(3, 2048)
    n = key.private_numbers()
    good = RsaCrtKey.from_numbers(2048, n.p, n.q, n.dmp1, n.dmq1, n.iqmp, e=exponent)
    faulty = RsaCrtKey.from_numbers(2048, n.p, n.q, n.dmp1 ^ 2, n.dmq1, n.iqmp, e=exponent)
    messages = [secrets.token_bytes(32) for _ in range(3)]
    lanes = [
        RsaLane(faulty if i == 1 else good, emsa_pss_encode(m, 2048, "sha256"))
        for i, m in enumerate(messages)
    ]
    results = mb.rsa_private_crt(lanes)
    assert results[1] == crypto_mb.SIGNATURE_ERROR
    for i in (0, 2):
        signature = results[i]
        assert isinstance(signature, bytes)
        verify_pss(key, signature, messages[i], "sha256")


@needs_crypto_mb
def test_batches_must_be_uniform_and_well_sized() -> None:
    mb = crypto_mb.load()
    k2048 = crt(rsa_keys(2048)[0])
    k3072 = crt(rsa_keys(3072)[0])
    with pytest.raises(ValueError, match="RSA-2048"):
        mb.rsa_private_crt([RsaLane(k2048, bytes(256)), RsaLane(k3072, bytes(384))])
    with pytest.raises(ValueError, match="1 to 8 lanes"):
        mb.rsa_private_crt([RsaLane(k2048, bytes(256))] * 9)
    with pytest.raises(ValueError, match="1 to 8 lanes"):
        mb.ecdsa_sign([])
    spec = crypto_mb.ECDSA_CURVES["P-256"]
    with pytest.raises(ValueError, match="out of range"):
        mb.ecdsa_sign([EcdsaLane(spec, crypto_mb.to_limbs(1, 4), 0, 1)])
    assert isinstance(mb.run([RsaLane(k2048, bytes(255) + b"\x02")])[0], bytes)
    assert ctypes.sizeof(k2048.p) == 128
