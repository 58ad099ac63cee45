"""HKDF on the standard library's one-shot HMAC gives what ``cryptography``'s
HKDF gives (RFC 5869 test case 1 included), for every length TLS asks of it."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from meshlet.tls.keyschedule import hkdf_expand, hkdf_extract


def test_rfc5869_case_1() -> None:
    prk = hkdf_extract(hashes.SHA256(), bytes.fromhex("000102030405060708090a0b0c"), b"\x0b" * 22)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    okm = hkdf_expand(hashes.SHA256(), prk, bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384()], ids=lambda a: a.name)
@pytest.mark.parametrize("length", [1, 12, 16, 32, 48, 64, 100])
def test_expand_matches_cryptography(algorithm: hashes.HashAlgorithm, length: int) -> None:
    prk, info = bytes(range(algorithm.digest_size)), b"tls13 info"
    assert hkdf_expand(algorithm, prk, info, length) == HKDFExpand(algorithm, length, info).derive(prk)


@pytest.mark.parametrize("length", [0, 255 * 32 + 1])
def test_expand_refuses_impossible_lengths(length: int) -> None:
    with pytest.raises(ValueError, match="HKDF-Expand"):
        hkdf_expand(hashes.SHA256(), bytes(32), b"", length)
