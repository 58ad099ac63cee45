"""EMSA-PSS encoding (RFC 8017 section 9.1.1) for a raw RSA private operation.

A multi-buffer RSA call computes m^d mod n and nothing else, so the padding
is built here: the TLS 1.3 ``rsa_pss_rsae_*`` schemes use MGF1 with the
message hash and a salt as long as the hash (RFC 8446 section 4.2.3). The
salt comes from the OS CSPRNG for every signature.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

__all__ = ["HASHES", "emsa_pss_encode", "mgf1"]

# hash name -> output length; names are ``hashlib`` names.
HASHES = {"sha256": 32, "sha384": 48, "sha512": 64}

_ZEROS8 = bytes(8)


def mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    """MGF1 (RFC 8017 B.2.1) with the named hash."""
    digest_size = HASHES[hash_name]
    blocks = []
    for counter in range((length + digest_size - 1) // digest_size):
        blocks.append(hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest())
    return b"".join(blocks)[:length]


def emsa_pss_encode(
    message: bytes,
    modulus_bits: int,
    hash_name: str,
    random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """EM for ``message`` and a modulus of ``modulus_bits`` bits, left-padded
    with zero bytes to the modulus length (the raw operation's input size)."""
    hash_len = HASHES[hash_name]
    em_bits = modulus_bits - 1
    em_len = (em_bits + 7) // 8
    salt_len = hash_len
    if em_len < hash_len + salt_len + 2:
        raise ValueError(f"a {modulus_bits}-bit modulus is too small for PSS with {hash_name}")
    m_hash = hashlib.new(hash_name, message).digest()
    salt = random(salt_len)
    h = hashlib.new(hash_name, _ZEROS8 + m_hash + salt).digest()
    db_len = em_len - hash_len - 1
    # DB = PS || 0x01 || salt, masked by MGF1(H); the XOR is done on integers.
    db = int.from_bytes(b"\x01" + salt, "big")
    masked = db ^ int.from_bytes(mgf1(h, db_len, hash_name), "big")
    # Clear the leftmost 8*emLen - emBits bits so that EM < 2^emBits <= n.
    masked &= (1 << (8 * db_len - (8 * em_len - em_bits))) - 1
    encoded = masked.to_bytes(db_len, "big") + h + b"\xbc"
    modulus_len = (modulus_bits + 7) // 8
    return encoded.rjust(modulus_len, b"\x00")
