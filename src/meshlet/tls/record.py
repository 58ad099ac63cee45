"""TLS 1.3 record layer (RFC 8446 section 5): framing, AEAD protection with
per-record nonces, inner content type and padding, size limits, sequence
numbers. Sans-IO: bytes in, records out; records in, bytes out.

Bulk-path notes: one AEAD object per traffic secret (key setup happens once),
the nonce is the static IV xor the sequence number computed on ints, and
records are decrypted in place from the chunk the network delivered (only a
record cut by a chunk boundary is copied).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
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
_CONTENT_TYPE_BYTE = tuple(bytes((t,)) for t in range(256))
_ZEROS = bytes(MAX_PLAINTEXT + 1)


def sealed_length(payload_length: int, padding: int) -> int:
    """Bytes on the wire of one protected record."""
    return HEADER_LENGTH + payload_length + 1 + padding + TAG_LENGTH


def _record_overflow(message: str) -> TlsAlertError:
    return TlsAlertError(AlertDescription.record_overflow, message)


class RecordCipher:
    """AEAD protection in one direction under one traffic secret."""

    __slots__ = ("_aead", "_encrypt_into", "_iv", "secret", "sequence", "suite")

    def __init__(self, suite: CipherSuite, secret: bytes) -> None:
        key, iv = traffic_key_and_iv(suite, secret)
        self.suite = suite
        self.secret = secret
        self._aead = suite.aead_factory(key)
        # cryptography >= 44 seals straight into a caller's buffer.
        self._encrypt_into: Callable[[bytes, bytes, bytes, memoryview], int] | None = getattr(
            self._aead, "encrypt_into", None
        )
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

    def seal_into(self, out: memoryview, content_type: int, payload: bytes | memoryview, padding: int) -> int:
        """Write one protected record at the start of ``out`` (which must hold
        ``sealed_length``); returns its length. Same bytes as ``seal``."""
        inner = b"".join((payload, _CONTENT_TYPE_BYTE[content_type], _ZEROS[:padding]))
        length = len(inner) + TAG_LENGTH
        header = _pack_header(ContentType.application_data, 0x0303, length)
        end = HEADER_LENGTH + length
        out[:HEADER_LENGTH] = header
        if self._encrypt_into is not None:
            self._encrypt_into(self._nonce(), inner, header, out[HEADER_LENGTH:end])
        else:
            out[HEADER_LENGTH:end] = self._aead.encrypt(self._nonce(), inner, header)
        return end

    def open(self, header: bytes, ciphertext: bytes | memoryview) -> tuple[int, bytes]:
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
        "_carry",
        "_view",
        "_view_pos",
        "early_data_budget",
        "max_fragment",
        "padding_block",
        "read_cipher",
        "write_cipher",
    )

    def __init__(self, padding_block: int = 0) -> None:
        # Input is read in place from the last chunk fed (``_view``); only a
        # record cut by the end of a chunk is copied (into ``_carry``), so a
        # bulk stream costs no copy of its ciphertext before decryption.
        # Invariant: the bytes in ``_carry`` come before those in ``_view``.
        self._carry = bytearray()
        self._view: memoryview | None = None
        self._view_pos = 0
        self.read_cipher: RecordCipher | None = None
        self.write_cipher: RecordCipher | None = None
        self.max_fragment = MAX_PLAINTEXT
        self.padding_block = padding_block
        # Bytes of rejected 0-RTT data we may still skip (RFC 8446 section 4.2.10).
        self.early_data_budget = 0

    # -- reading ---------------------------------------------------------- #

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._view is not None:
            # The previous chunk was not read to its end (a paused handshake):
            # keep its rest, in order, ahead of the new bytes.
            self._carry += self._view[self._view_pos :]
        # Only an immutable chunk may be kept by reference.
        self._view = memoryview(data if type(data) is bytes else bytes(data))
        self._view_pos = 0

    @property
    def buffered(self) -> int:
        view = self._view
        return len(self._carry) + (len(view) - self._view_pos if view is not None else 0)

    def take_buffered(self) -> bytes:
        view = self._view
        data = bytes(self._carry) + (bytes(view[self._view_pos :]) if view is not None else b"")
        self._carry.clear()
        self._view = None
        self._view_pos = 0
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

    def _next_raw(self) -> tuple[bytes, bytes | memoryview] | None:
        if self._carry:
            return self._next_raw_from_carry()
        view = self._view
        if view is None:
            return None
        pos = self._view_pos
        size = len(view)
        if size - pos < HEADER_LENGTH:
            self._carry_rest()
            return None
        end = pos + HEADER_LENGTH + self._fragment_length(view, pos)
        if end > size:
            self._carry_rest()
            return None
        header = bytes(view[pos : pos + HEADER_LENGTH])
        fragment = view[pos + HEADER_LENGTH : end]
        if end == size:
            self._view = None
            self._view_pos = 0
        else:
            self._view_pos = end
        return header, fragment

    def _next_raw_from_carry(self) -> tuple[bytes, bytes] | None:
        """A record that starts in ``_carry``, completed from the current chunk."""
        carry = self._carry
        if len(carry) < HEADER_LENGTH and not self._pull(HEADER_LENGTH - len(carry)):
            return None
        end = HEADER_LENGTH + self._fragment_length(carry, 0)
        if len(carry) < end and not self._pull(end - len(carry)):
            return None
        header = bytes(carry[:HEADER_LENGTH])
        fragment = bytes(carry[HEADER_LENGTH:end])
        del carry[:end]
        return header, fragment

    def _pull(self, wanted: int) -> bool:
        """Move up to ``wanted`` bytes from the chunk to ``_carry``; True if all came."""
        view = self._view
        if view is None:
            return False
        pos = self._view_pos
        piece = view[pos : pos + wanted]
        self._carry += piece
        if pos + len(piece) == len(view):
            self._view = None
            self._view_pos = 0
        else:
            self._view_pos = pos + len(piece)
        return len(piece) == wanted

    def _carry_rest(self) -> None:
        view = self._view
        if view is not None:
            self._carry += view[self._view_pos :]
            self._view = None
            self._view_pos = 0

    def _fragment_length(self, buf: bytearray | memoryview, pos: int) -> int:
        """Checks the record header at ``pos`` and returns its fragment length."""
        content_type = buf[pos]
        if content_type not in _KNOWN_TYPES:
            raise unexpected_message(f"unknown record content type {content_type}")
        length = (buf[pos + 3] << 8) | buf[pos + 4]
        limit = MAX_CIPHERTEXT if self.read_cipher is not None else MAX_PLAINTEXT
        if length > limit:
            raise _record_overflow(f"record of {length} bytes exceeds {limit}")
        return length

    def _unprotect(self, header: bytes, fragment: bytes | memoryview) -> tuple[int, bytes] | None:
        content_type = header[0]
        if content_type == ContentType.change_cipher_spec:
            # Only the middlebox-compatibility record is tolerated; the
            # connection decides whether one is acceptable right now.
            if fragment != b"\x01":
                raise unexpected_message("malformed change_cipher_spec record")
            return content_type, b"\x01"
        cipher = self.read_cipher
        if cipher is None:
            if content_type == ContentType.application_data and self._skip_early_data(fragment):
                return None
            return content_type, bytes(fragment)
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

    def _skip_early_data(self, fragment: bytes | memoryview) -> bool:
        if len(fragment) > self.early_data_budget:
            return False
        self.early_data_budget -= len(fragment)
        return True

    # -- writing ---------------------------------------------------------- #

    def protect(self, content_type: int, data: bytes) -> bytes | bytearray:
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
        if not data:
            return cipher.seal(content_type, data, self._padding(0))
        # All records are sealed into one buffer: no per-record ciphertext
        # object and no join (the bulk send path).
        paddings = [self._padding(min(step, len(data) - i)) for i in range(0, len(data), step)]
        total = sum(sealed_length(min(step, len(data) - i), pad)
                    for i, pad in zip(range(0, len(data), step), paddings, strict=True))
        out = bytearray(total)
        view = memoryview(out)
        source = memoryview(data)
        pos = 0
        for i, pad in zip(range(0, len(data), step), paddings, strict=True):
            pos += cipher.seal_into(view[pos:], content_type, source[i : i + step], pad)
        return out

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
