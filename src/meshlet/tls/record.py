"""TLS 1.3 record layer (RFC 8446 section 5): framing, AEAD protection with
per-record nonces, inner content type and padding, size limits, sequence
numbers. Sans-IO: bytes in, records out; records in, bytes out.

Bulk-path notes: one AEAD object per traffic secret (key setup happens once),
the nonce is the static IV xor the sequence number computed on ints, and the
input buffer is compacted once per batch rather than once per record.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from cryptography.exceptions import InvalidTag

from meshlet.tls.alerts import AlertDescription, TlsAlertError, unexpected_message
from meshlet.tls.crypto import TAG_LENGTH, CipherSuite
from meshlet.tls.keyschedule import traffic_key_and_iv


class ContentType(IntEnum):
    change_cipher_spec = 20
    alert = 21
    handshake = 22
    application_data = 23


MAX_PLAINTEXT = 1 << 14
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256
HEADER_LENGTH = 5
# Renew the write key well before AES-GCM's per-key record limit (RFC 8446 5.5).
KEY_UPDATE_AFTER_RECORDS = 1 << 24
_MAX_SEQUENCE = (1 << 64) - 1
_KNOWN_TYPES = frozenset(int(t) for t in ContentType)
_pack_header = struct.Struct("!BHH").pack


def _record_overflow(message: str) -> TlsAlertError:
    return TlsAlertError(AlertDescription.record_overflow, message)


class RecordCipher:
    """AEAD protection in one direction under one traffic secret."""

    __slots__ = ("_aead", "_iv", "secret", "sequence", "suite")

    def __init__(self, suite: CipherSuite, secret: bytes) -> None:
        key, iv = traffic_key_and_iv(suite, secret)
        self.suite = suite
        self.secret = secret
        self._aead = suite.aead_factory(key)
        self._iv = int.from_bytes(iv, "big")
        self.sequence = 0

    def _nonce(self) -> bytes:
        seq = self.sequence
        if seq >= _MAX_SEQUENCE:
            raise TlsAlertError(AlertDescription.internal_error, "record sequence number exhausted")
        self.sequence = seq + 1
        return (self._iv ^ seq).to_bytes(12, "big")

    def seal(self, content_type: int, payload: bytes, padding: int = 0) -> bytes:
        inner = payload + bytes((content_type,)) + (b"\x00" * padding if padding else b"")
        header = _pack_header(ContentType.application_data, 0x0303, len(inner) + TAG_LENGTH)
        return header + self._aead.encrypt(self._nonce(), inner, header)

    def open(self, header: bytes, ciphertext: bytes) -> tuple[int, bytes]:
        """(inner content type, plaintext); bad_record_mac if authentication fails."""
        try:
            inner = self._aead.decrypt(self._nonce(), ciphertext, header)
        except InvalidTag:
            raise TlsAlertError(AlertDescription.bad_record_mac, "record authentication failed") from None
        if len(inner) > MAX_PLAINTEXT + 1:
            raise _record_overflow(f"decrypted record of {len(inner)} bytes")
        if inner and inner[-1]:
            return inner[-1], inner[:-1]
        stripped = inner.rstrip(b"\x00")
        if not stripped:
            raise unexpected_message("record with no content type (all padding)")
        return stripped[-1], stripped[:-1]


class RecordLayer:
    """Both directions of one connection's record stream."""

    __slots__ = (
        "_in",
        "_pos",
        "early_data_budget",
        "max_fragment",
        "padding_block",
        "read_cipher",
        "write_cipher",
    )

    def __init__(self, padding_block: int = 0) -> None:
        self._in = bytearray()
        self._pos = 0
        self.read_cipher: RecordCipher | None = None
        self.write_cipher: RecordCipher | None = None
        self.max_fragment = MAX_PLAINTEXT
        self.padding_block = padding_block
        # Bytes of rejected 0-RTT data we may still skip (RFC 8446 section 4.2.10).
        self.early_data_budget = 0

    # -- reading ---------------------------------------------------------- #

    def feed(self, data: bytes) -> None:
        self._in += data

    @property
    def buffered(self) -> int:
        return len(self._in) - self._pos

    def take_buffered(self) -> bytes:
        data = bytes(self._in[self._pos :])
        self._in.clear()
        self._pos = 0
        return data

    def set_read_secret(self, suite: CipherSuite, secret: bytes) -> None:
        self.read_cipher = RecordCipher(suite, secret)

    def set_write_secret(self, suite: CipherSuite, secret: bytes) -> None:
        self.write_cipher = RecordCipher(suite, secret)

    def next_record(self) -> tuple[int, bytes] | None:
        """The next complete record as (content type, plaintext), or None."""
        while True:
            raw = self._next_raw()
            if raw is None:
                return None
            header, fragment = raw
            record = self._unprotect(header, fragment)
            if record is not None:
                return record

    def _next_raw(self) -> tuple[bytes, bytes] | None:
        buf, pos = self._in, self._pos
        if len(buf) - pos < HEADER_LENGTH:
            self._compact()
            return None
        content_type = buf[pos]
        if content_type not in _KNOWN_TYPES:
            raise unexpected_message(f"unknown record content type {content_type}")
        length = (buf[pos + 3] << 8) | buf[pos + 4]
        limit = MAX_CIPHERTEXT if self.read_cipher is not None else MAX_PLAINTEXT
        if length > limit:
            raise _record_overflow(f"record of {length} bytes exceeds {limit}")
        end = pos + HEADER_LENGTH + length
        if len(buf) < end:
            self._compact()
            return None
        header = bytes(buf[pos : pos + HEADER_LENGTH])
        fragment = bytes(buf[pos + HEADER_LENGTH : end])
        self._pos = end
        return header, fragment

    def _compact(self) -> None:
        if self._pos:
            del self._in[: self._pos]
            self._pos = 0

    def _unprotect(self, header: bytes, fragment: bytes) -> tuple[int, bytes] | None:
        content_type = header[0]
        if content_type == ContentType.change_cipher_spec:
            # Only the middlebox-compatibility record is tolerated; the
            # connection decides whether one is acceptable right now.
            if fragment != b"\x01":
                raise unexpected_message("malformed change_cipher_spec record")
            return content_type, fragment
        cipher = self.read_cipher
        if cipher is None:
            if content_type == ContentType.application_data and self._skip_early_data(fragment):
                return None
            return content_type, fragment
        if content_type != ContentType.application_data:
            raise unexpected_message(f"plaintext record of type {content_type} after keys were set")
        if self.early_data_budget:
            try:
                record = cipher.open(header, fragment)
            except TlsAlertError:
                cipher.sequence -= 1
                if self._skip_early_data(fragment):
                    return None
                raise
            self.early_data_budget = 0
        else:
            record = cipher.open(header, fragment)
        if record[0] == ContentType.change_cipher_spec:
            raise unexpected_message("encrypted change_cipher_spec record")
        return record

    def _skip_early_data(self, fragment: bytes) -> bool:
        if len(fragment) > self.early_data_budget:
            return False
        self.early_data_budget -= len(fragment)
        return True

    # -- writing ---------------------------------------------------------- #

    def protect(self, content_type: int, data: bytes) -> bytes:
        """``data`` as one or more records, encrypted once keys are set."""
        step = self.max_fragment
        cipher = self.write_cipher
        if cipher is None:
            if len(data) <= step:
                return _pack_header(content_type, 0x0303, len(data)) + data
            return b"".join(
                _pack_header(content_type, 0x0303, len(data[i : i + step])) + data[i : i + step]
                for i in range(0, len(data), step)
            )
        if len(data) <= step:
            return cipher.seal(content_type, data, self._padding(len(data)))
        out = []
        for i in range(0, len(data), step):
            chunk = data[i : i + step]
            out.append(cipher.seal(content_type, chunk, self._padding(len(chunk))))
        return b"".join(out)

    def _padding(self, length: int) -> int:
        block = self.padding_block
        if not block:
            return 0
        padded = min(-(-(length + 1) // block) * block, self.max_fragment + 1)
        return max(0, padded - length - 1)

    @property
    def write_key_exhausted(self) -> bool:
        cipher = self.write_cipher
        return cipher is not None and cipher.sequence >= KEY_UPDATE_AFTER_RECORDS
