"""TLS 1.3 key schedule (RFC 8446 section 7.1): HKDF (RFC 5869) on HMAC.

HMAC and hashes are the standard library's one-shot ``hmac.digest`` and
``hashlib`` (both OpenSSL underneath): a handshake derives some twenty
secrets, and a one-shot call costs a fraction of building HKDF/HMAC objects.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import Any

from cryptography.hazmat.primitives import hashes

from meshlet.tls.codec import HandshakeType
from meshlet.tls.crypto import IV_LENGTH, CipherSuite


def hkdf_extract(hash_alg: hashes.HashAlgorithm, salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt or b"\x00" * hash_alg.digest_size, ikm, hash_alg.name)


def hkdf_expand(hash_alg: hashes.HashAlgorithm, prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand: T(1) | T(2) | ... cut to ``length`` (at most 255 blocks)."""
    name = hash_alg.name
    size = hash_alg.digest_size
    if not 0 < length <= 255 * size:
        raise ValueError(f"HKDF-Expand cannot produce {length} bytes with {name}")
    block = b""
    blocks = []
    for counter in range(1, -(-length // size) + 1):
        block = hmac.digest(prk, block + info + bytes((counter,)), name)
        blocks.append(block)
    return b"".join(blocks)[:length]


@functools.lru_cache(maxsize=256)
def _label_prefix(label: bytes, length: int) -> bytes:
    """HkdfLabel up to its context (RFC 8446 section 7.1): the same few labels
    and lengths recur in every handshake."""
    full_label = b"tls13 " + label
    return length.to_bytes(2, "big") + bytes((len(full_label),)) + full_label


def hkdf_expand_label(
    hash_alg: hashes.HashAlgorithm, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    info = _label_prefix(label, length) + bytes((len(context),)) + context
    if length <= hash_alg.digest_size:
        # Every TLS 1.3 secret, key and IV fits in one HKDF block: T(1) only.
        return hmac.digest(secret, info + b"\x01", hash_alg.name)[:length]
    return hkdf_expand(hash_alg, secret, info, length)


def transcript_digest(hash_alg: hashes.HashAlgorithm, data: bytes) -> bytes:
    return hashlib.new(hash_alg.name, data).digest()


@functools.lru_cache(maxsize=8)
def _empty_hash(name: str) -> bytes:
    return hashlib.new(name).digest()


def derive_secret(
    hash_alg: hashes.HashAlgorithm, secret: bytes, label: bytes, transcript_hash: bytes
) -> bytes:
    return hkdf_expand_label(hash_alg, secret, label, transcript_hash, hash_alg.digest_size)


def traffic_key_and_iv(suite: CipherSuite, secret: bytes) -> tuple[bytes, bytes]:
    hash_alg = suite.hash
    key = hkdf_expand_label(hash_alg, secret, b"key", b"", suite.key_length)
    iv = hkdf_expand_label(hash_alg, secret, b"iv", b"", IV_LENGTH)
    return key, iv


def next_traffic_secret(suite: CipherSuite, secret: bytes) -> bytes:
    """application_traffic_secret_N+1 (KeyUpdate, RFC 8446 section 7.2)."""
    return hkdf_expand_label(suite.hash, secret, b"traffic upd", b"", suite.hash_length)


def finished_verify_data(hash_alg: hashes.HashAlgorithm, base_key: bytes, transcript_hash: bytes) -> bytes:
    finished_key = hkdf_expand_label(hash_alg, base_key, b"finished", b"", hash_alg.digest_size)
    return hmac.digest(finished_key, transcript_hash, hash_alg.name)


def resumption_psk(suite: CipherSuite, resumption_master_secret: bytes, nonce: bytes) -> bytes:
    return hkdf_expand_label(suite.hash, resumption_master_secret, b"resumption", nonce, suite.hash_length)


def message_hash(hash_alg: hashes.HashAlgorithm, client_hello1: bytes) -> bytes:
    """The synthetic message replacing ClientHello1 after a HelloRetryRequest."""
    digest = transcript_digest(hash_alg, client_hello1)
    return bytes((HandshakeType.message_hash, 0, 0, len(digest))) + digest


class KeySchedule:
    """The secret chain early -> handshake -> master for one connection."""

    __slots__ = ("_hash", "_zeros", "secret", "suite")

    def __init__(self, suite: CipherSuite, psk: bytes | None = None) -> None:
        self.suite = suite
        self._hash = suite.hash
        self._zeros = b"\x00" * suite.hash_length
        self.secret = hkdf_extract(self._hash, b"", psk if psk is not None else self._zeros)

    @property
    def early_secret(self) -> bytes:
        return self.secret

    def binder_key(self) -> bytes:
        """Resumption binder key (tickets are resumption PSKs)."""
        return derive_secret(self._hash, self.secret, b"res binder", _empty_hash(self._hash.name))

    def advance(self, ikm: bytes | None = None) -> None:
        """early -> handshake (ikm = ECDHE shared secret) -> master (no ikm)."""
        derived = derive_secret(self._hash, self.secret, b"derived", _empty_hash(self._hash.name))
        self.secret = hkdf_extract(self._hash, derived, ikm if ikm is not None else self._zeros)

    def derive(self, label: bytes, transcript_hash: bytes) -> bytes:
        return derive_secret(self._hash, self.secret, label, transcript_hash)


class Transcript:
    """The handshake messages so far, and one running hash over them.

    The hash object is created on the first digest (the suite, hence the
    hash, is known by then) and fed each later message once; a digest with
    ``extra`` (a PSK binder over a partial ClientHello) hashes a copy. The
    messages themselves are kept too, a few kilobytes, so that HRR's
    message_hash substitution or a digest under another hash (a PSK offer
    whose suite the server did not pick) can start over from them."""

    __slots__ = ("_messages", "_running", "_running_name")

    def __init__(self) -> None:
        self._messages: list[bytes] = []
        self._running: Any = None
        self._running_name = ""

    @property
    def empty(self) -> bool:
        return not self._messages

    def add(self, raw: bytes) -> None:
        self._messages.append(raw)
        if self._running is not None:
            self._running.update(raw)

    def digest(self, hash_alg: hashes.HashAlgorithm, extra: bytes = b"") -> bytes:
        running = self._running
        if running is None or self._running_name != hash_alg.name:
            running = self._restart(hash_alg.name)
        if not extra:
            return bytes(running.digest())
        snapshot = running.copy()
        snapshot.update(extra)
        return bytes(snapshot.digest())

    def _restart(self, name: str) -> Any:
        running = hashlib.new(name)
        for message in self._messages:
            running.update(message)
        self._running = running
        self._running_name = name
        return running

    def restart_after_retry(self, hash_alg: hashes.HashAlgorithm) -> None:
        """Replace ClientHello1 by its message_hash (RFC 8446 section 4.4.1)."""
        first = self._messages[0]
        self._messages[0] = message_hash(hash_alg, first)
        self._running = None
