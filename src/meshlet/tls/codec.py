"""TLS 1.3 handshake wire codec (RFC 8446 section 4): strict, bounded parsing.

Messages keep their extensions as an ordered tuple of ``(type, body)`` pairs,
so a parsed message serializes back to the exact bytes it came from (the
transcript hash depends on it). Extension bodies are decoded on demand by the
``decode_*`` helpers. Any malformed input raises ``TlsAlertError`` with
``decode_error`` (or ``illegal_parameter`` for well-formed but forbidden
values); nothing else escapes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from meshlet.tls.alerts import (
    AlertDescription,
    TlsAlertError,
    decode_error,
    illegal_parameter,
    unexpected_message,
)

Extension = tuple[int, bytes]

TLS13 = 0x0304
LEGACY_VERSION = 0x0303
# SHA-256("HelloRetryRequest"), RFC 8446 section 4.1.3.
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
DOWNGRADE_TLS12 = b"DOWNGRD\x01"
DOWNGRADE_TLS11 = b"DOWNGRD\x00"


class HandshakeType(IntEnum):
    client_hello = 1
    server_hello = 2
    new_session_ticket = 4
    end_of_early_data = 5
    encrypted_extensions = 8
    certificate = 11
    certificate_request = 13
    certificate_verify = 15
    finished = 20
    key_update = 24
    message_hash = 254


class ExtensionType(IntEnum):
    server_name = 0
    max_fragment_length = 1
    status_request = 5
    supported_groups = 10
    signature_algorithms = 13
    use_srtp = 14
    heartbeat = 15
    application_layer_protocol_negotiation = 16
    signed_certificate_timestamp = 18
    client_certificate_type = 19
    server_certificate_type = 20
    padding = 21
    record_size_limit = 28
    pre_shared_key = 41
    early_data = 42
    supported_versions = 43
    cookie = 44
    psk_key_exchange_modes = 45
    certificate_authorities = 47
    oid_filters = 48
    post_handshake_auth = 49
    signature_algorithms_cert = 50
    key_share = 51


PSK_DHE_KE = 1
KEY_UPDATE_NOT_REQUESTED = 0
KEY_UPDATE_REQUESTED = 1


# --------------------------------------------------------------------------- #
# Reading and writing primitives
# --------------------------------------------------------------------------- #


class Reader:
    """A cursor over bytes; every pull checks bounds and raises decode_error."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self._end = len(data)

    def eof(self) -> bool:
        return self._pos >= self._end

    def expect_end(self, what: str) -> None:
        if self._pos != self._end:
            raise decode_error(f"{self._end - self._pos} trailing bytes after {what}")

    def uint8(self) -> int:
        if self._pos + 1 > self._end:
            raise decode_error("truncated uint8")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def uint16(self) -> int:
        if self._pos + 2 > self._end:
            raise decode_error("truncated uint16")
        (value,) = struct.unpack_from("!H", self._data, self._pos)
        self._pos += 2
        return int(value)

    def uint24(self) -> int:
        hi = self.uint8()
        return (hi << 16) | self.uint16()

    def uint32(self) -> int:
        if self._pos + 4 > self._end:
            raise decode_error("truncated uint32")
        (value,) = struct.unpack_from("!I", self._data, self._pos)
        self._pos += 4
        return int(value)

    def fixed(self, length: int) -> bytes:
        if self._pos + length > self._end:
            raise decode_error(f"truncated field of {length} bytes")
        value = self._data[self._pos : self._pos + length]
        self._pos += length
        return value

    def vector(self, length_bytes: int, *, minimum: int = 0, maximum: int | None = None) -> bytes:
        length = self._length(length_bytes)
        if length < minimum or (maximum is not None and length > maximum):
            raise decode_error(f"vector length {length} outside [{minimum}, {maximum}]")
        return self.fixed(length)

    def _length(self, length_bytes: int) -> int:
        if length_bytes == 1:
            return self.uint8()
        if length_bytes == 2:
            return self.uint16()
        return self.uint24()


def vec8(data: bytes) -> bytes:
    return bytes((len(data),)) + data


def vec16(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def vec24(data: bytes) -> bytes:
    return len(data).to_bytes(3, "big") + data


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def u16_list(values: Iterable[int]) -> bytes:
    return b"".join(struct.pack("!H", v) for v in values)


def _parse_u16_list(data: bytes, what: str, *, length_bytes: int = 2, minimum: int = 2) -> tuple[int, ...]:
    reader = Reader(data)
    body = reader.vector(length_bytes, minimum=minimum)
    reader.expect_end(what)
    if len(body) % 2:
        raise decode_error(f"odd length list in {what}")
    return struct.unpack(f"!{len(body) // 2}H", body)


# --------------------------------------------------------------------------- #
# Extensions
# --------------------------------------------------------------------------- #


_EXTENSION_HEADER = struct.Struct("!HH")


def parse_extensions(reader: Reader, *, allow_empty_block: bool = False) -> tuple[Extension, ...]:
    """An extensions block; duplicates are refused (RFC 8446 section 4.2).

    Walked with one struct unpack per extension rather than ``Reader``
    calls: a ClientHello carries a dozen of them."""
    if allow_empty_block and reader.eof():
        return ()
    block = reader.vector(2)
    unpack_header = _EXTENSION_HEADER.unpack_from
    seen: set[int] = set()
    extensions: list[Extension] = []
    pos = 0
    end = len(block)
    while pos < end:
        if pos + 4 > end:
            raise decode_error("truncated extension header")
        ext_type, length = unpack_header(block, pos)
        pos += 4
        if pos + length > end:
            raise decode_error(f"truncated field of {length} bytes")
        if ext_type in seen:
            raise illegal_parameter(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        extensions.append((ext_type, block[pos : pos + length]))
        pos += length
    return tuple(extensions)


def serialize_extensions(extensions: Sequence[Extension]) -> bytes:
    return vec16(b"".join(u16(t) + vec16(body) for t, body in extensions))


def find_extension(extensions: Sequence[Extension], ext_type: int) -> bytes | None:
    for t, body in extensions:
        if t == ext_type:
            return body
    return None


def decode_supported_versions_client(data: bytes) -> tuple[int, ...]:
    return _parse_u16_list(data, "supported_versions", length_bytes=1)


def decode_supported_version_server(data: bytes) -> int:
    reader = Reader(data)
    version = reader.uint16()
    reader.expect_end("supported_versions")
    return version


def encode_supported_versions_client(versions: Sequence[int]) -> bytes:
    return vec8(u16_list(versions))


def decode_u16_list(data: bytes, what: str) -> tuple[int, ...]:
    """supported_groups, signature_algorithms, signature_algorithms_cert."""
    return _parse_u16_list(data, what)


def encode_u16_list(values: Sequence[int]) -> bytes:
    return vec16(u16_list(values))


@dataclass(frozen=True, slots=True)
class KeyShareEntry:
    group: int
    key_exchange: bytes


def _read_key_share(reader: Reader) -> KeyShareEntry:
    group = reader.uint16()
    return KeyShareEntry(group, reader.vector(2, minimum=1))


def decode_key_share_client(data: bytes) -> tuple[KeyShareEntry, ...]:
    reader = Reader(data)
    shares = Reader(reader.vector(2))
    reader.expect_end("key_share")
    entries: list[KeyShareEntry] = []
    while not shares.eof():
        entries.append(_read_key_share(shares))
    return tuple(entries)


def encode_key_share_client(entries: Sequence[KeyShareEntry]) -> bytes:
    return vec16(b"".join(u16(e.group) + vec16(e.key_exchange) for e in entries))


def decode_key_share_server(data: bytes) -> KeyShareEntry:
    reader = Reader(data)
    entry = _read_key_share(reader)
    reader.expect_end("key_share")
    return entry


def encode_key_share_server(entry: KeyShareEntry) -> bytes:
    return u16(entry.group) + vec16(entry.key_exchange)


def decode_key_share_hrr(data: bytes) -> int:
    reader = Reader(data)
    group = reader.uint16()
    reader.expect_end("key_share")
    return group


def decode_server_name(data: bytes) -> str:
    """The host_name entry of a server_name extension (RFC 6066 section 3)."""
    reader = Reader(data)
    names = Reader(reader.vector(2, minimum=1))
    reader.expect_end("server_name")
    host = ""
    while not names.eof():
        name_type = names.uint8()
        name = names.vector(2, minimum=1)
        if name_type == 0:
            if host:
                raise illegal_parameter("more than one host_name in server_name")
            try:
                host = name.decode("ascii")
            except UnicodeDecodeError:
                raise decode_error("server_name is not ASCII") from None
            if host.endswith(".") or "\x00" in host:
                raise decode_error("malformed server_name")
    return host


def encode_server_name(host: str) -> bytes:
    name = host.encode("ascii")
    return vec16(b"\x00" + vec16(name))


def decode_alpn(data: bytes) -> tuple[bytes, ...]:
    reader = Reader(data)
    names = Reader(reader.vector(2, minimum=2))
    reader.expect_end("application_layer_protocol_negotiation")
    protocols: list[bytes] = []
    while not names.eof():
        protocols.append(names.vector(1, minimum=1))
    return tuple(protocols)


def encode_alpn(protocols: Sequence[bytes]) -> bytes:
    return vec16(b"".join(vec8(p) for p in protocols))


def decode_psk_modes(data: bytes) -> bytes:
    reader = Reader(data)
    modes = reader.vector(1, minimum=1)
    reader.expect_end("psk_key_exchange_modes")
    return modes


def decode_record_size_limit(data: bytes) -> int:
    reader = Reader(data)
    limit = reader.uint16()
    reader.expect_end("record_size_limit")
    if limit < 64:
        raise illegal_parameter(f"record_size_limit {limit} below 64")
    return limit


def decode_cookie(data: bytes) -> bytes:
    reader = Reader(data)
    cookie = reader.vector(2, minimum=1)
    reader.expect_end("cookie")
    return cookie


@dataclass(frozen=True, slots=True)
class PskIdentity:
    identity: bytes
    obfuscated_ticket_age: int


@dataclass(frozen=True, slots=True)
class OfferedPsks:
    identities: tuple[PskIdentity, ...]
    binders: tuple[bytes, ...]
    # Length of the binders block including its 2-byte length: the ClientHello
    # is hashed without it for the binder (RFC 8446 section 4.2.11.2).
    binders_length: int


def decode_offered_psks(data: bytes) -> OfferedPsks:
    reader = Reader(data)
    identities_block = reader.vector(2, minimum=7)
    ids = Reader(identities_block)
    binders_block = Reader(reader.vector(2, minimum=33))
    reader.expect_end("pre_shared_key")
    identities: list[PskIdentity] = []
    while not ids.eof():
        identity = ids.vector(2, minimum=1)
        identities.append(PskIdentity(identity, ids.uint32()))
    binders: list[bytes] = []
    while not binders_block.eof():
        binders.append(binders_block.vector(1, minimum=32))
    if len(binders) != len(identities):
        raise illegal_parameter("pre_shared_key has different numbers of identities and binders")
    return OfferedPsks(tuple(identities), tuple(binders), len(data) - 2 - len(identities_block))


def encode_offered_psks(identities: Sequence[PskIdentity], binders: Sequence[bytes]) -> bytes:
    ids = b"".join(vec16(i.identity) + struct.pack("!I", i.obfuscated_ticket_age) for i in identities)
    return vec16(ids) + vec16(b"".join(vec8(b) for b in binders))


def decode_selected_psk(data: bytes) -> int:
    reader = Reader(data)
    index = reader.uint16()
    reader.expect_end("pre_shared_key")
    return index


# --------------------------------------------------------------------------- #
# Handshake messages
# --------------------------------------------------------------------------- #


def handshake_message(msg_type: int, body: bytes) -> bytes:
    return bytes((msg_type,)) + vec24(body)


@dataclass(frozen=True, slots=True)
class ClientHello:
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    compression_methods: bytes
    extensions: tuple[Extension, ...]
    legacy_version: int = LEGACY_VERSION
    # A pre-TLS-1.3 hello may end without an extensions block at all.
    without_extensions_block: bool = False

    def serialize(self) -> bytes:
        body = b"".join(
            (
                u16(self.legacy_version),
                self.random,
                vec8(self.session_id),
                vec16(u16_list(self.cipher_suites)),
                vec8(self.compression_methods),
                b"" if self.without_extensions_block else serialize_extensions(self.extensions),
            )
        )
        return handshake_message(HandshakeType.client_hello, body)


def parse_client_hello(body: bytes) -> ClientHello:
    reader = Reader(body)
    legacy_version = reader.uint16()
    random = reader.fixed(32)
    session_id = reader.vector(1, maximum=32)
    suites = reader.vector(2, minimum=2)
    if len(suites) % 2:
        raise decode_error("odd cipher_suites length")
    compression = reader.vector(1, minimum=1)
    # A ClientHello without extensions is valid TLS 1.0-1.2; it offers no TLS 1.3.
    no_block = reader.eof()
    extensions = parse_extensions(reader, allow_empty_block=True)
    reader.expect_end("ClientHello")
    return ClientHello(
        random,
        session_id,
        struct.unpack(f"!{len(suites) // 2}H", suites),
        compression,
        extensions,
        legacy_version,
        no_block,
    )


@dataclass(frozen=True, slots=True)
class ServerHello:
    random: bytes
    session_id: bytes
    cipher_suite: int
    extensions: tuple[Extension, ...]
    compression_method: int = 0
    legacy_version: int = LEGACY_VERSION
    without_extensions_block: bool = False

    @property
    def is_retry_request(self) -> bool:
        return self.random == HRR_RANDOM

    def serialize(self) -> bytes:
        body = b"".join(
            (
                u16(self.legacy_version),
                self.random,
                vec8(self.session_id),
                u16(self.cipher_suite),
                bytes((self.compression_method,)),
                b"" if self.without_extensions_block else serialize_extensions(self.extensions),
            )
        )
        return handshake_message(HandshakeType.server_hello, body)


def parse_server_hello(body: bytes) -> ServerHello:
    reader = Reader(body)
    legacy_version = reader.uint16()
    random = reader.fixed(32)
    session_id = reader.vector(1, maximum=32)
    suite = reader.uint16()
    compression = reader.uint8()
    no_block = reader.eof()
    extensions = parse_extensions(reader, allow_empty_block=True)
    reader.expect_end("ServerHello")
    return ServerHello(random, session_id, suite, extensions, compression, legacy_version, no_block)


@dataclass(frozen=True, slots=True)
class EncryptedExtensions:
    extensions: tuple[Extension, ...]

    def serialize(self) -> bytes:
        return handshake_message(HandshakeType.encrypted_extensions, serialize_extensions(self.extensions))


def parse_encrypted_extensions(body: bytes) -> EncryptedExtensions:
    reader = Reader(body)
    extensions = parse_extensions(reader)
    reader.expect_end("EncryptedExtensions")
    return EncryptedExtensions(extensions)


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    context: bytes
    extensions: tuple[Extension, ...]

    def serialize(self) -> bytes:
        body = vec8(self.context) + serialize_extensions(self.extensions)
        return handshake_message(HandshakeType.certificate_request, body)


def parse_certificate_request(body: bytes) -> CertificateRequest:
    reader = Reader(body)
    context = reader.vector(1)
    extensions = parse_extensions(reader)
    reader.expect_end("CertificateRequest")
    return CertificateRequest(context, extensions)


@dataclass(frozen=True, slots=True)
class CertificateEntry:
    cert_data: bytes
    extensions: tuple[Extension, ...] = ()


@dataclass(frozen=True, slots=True)
class Certificate:
    context: bytes
    entries: tuple[CertificateEntry, ...]

    @property
    def chain(self) -> tuple[bytes, ...]:
        return tuple(e.cert_data for e in self.entries)

    def serialize(self) -> bytes:
        entries = b"".join(vec24(e.cert_data) + serialize_extensions(e.extensions) for e in self.entries)
        return handshake_message(HandshakeType.certificate, vec8(self.context) + vec24(entries))


def parse_certificate(body: bytes) -> Certificate:
    reader = Reader(body)
    context = reader.vector(1)
    entries_reader = Reader(reader.vector(3))
    reader.expect_end("Certificate")
    entries: list[CertificateEntry] = []
    while not entries_reader.eof():
        cert_data = entries_reader.vector(3, minimum=1)
        entries.append(CertificateEntry(cert_data, parse_extensions(entries_reader)))
    return Certificate(context, tuple(entries))


@dataclass(frozen=True, slots=True)
class CertificateVerify:
    scheme: int
    signature: bytes

    def serialize(self) -> bytes:
        return handshake_message(HandshakeType.certificate_verify, u16(self.scheme) + vec16(self.signature))


def parse_certificate_verify(body: bytes) -> CertificateVerify:
    reader = Reader(body)
    scheme = reader.uint16()
    signature = reader.vector(2, minimum=1)
    reader.expect_end("CertificateVerify")
    return CertificateVerify(scheme, signature)


@dataclass(frozen=True, slots=True)
class Finished:
    verify_data: bytes

    def serialize(self) -> bytes:
        return handshake_message(HandshakeType.finished, self.verify_data)


def parse_finished(body: bytes) -> Finished:
    return Finished(body)


@dataclass(frozen=True, slots=True)
class NewSessionTicket:
    lifetime: int
    age_add: int
    nonce: bytes
    ticket: bytes
    extensions: tuple[Extension, ...] = ()

    def serialize(self) -> bytes:
        body = b"".join(
            (
                struct.pack("!II", self.lifetime, self.age_add),
                vec8(self.nonce),
                vec16(self.ticket),
                serialize_extensions(self.extensions),
            )
        )
        return handshake_message(HandshakeType.new_session_ticket, body)


def parse_new_session_ticket(body: bytes) -> NewSessionTicket:
    reader = Reader(body)
    lifetime = reader.uint32()
    age_add = reader.uint32()
    nonce = reader.vector(1)
    ticket = reader.vector(2, minimum=1)
    extensions = parse_extensions(reader)
    reader.expect_end("NewSessionTicket")
    return NewSessionTicket(lifetime, age_add, nonce, ticket, extensions)


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    request_update: int

    def serialize(self) -> bytes:
        return handshake_message(HandshakeType.key_update, bytes((self.request_update,)))


def parse_key_update(body: bytes) -> KeyUpdate:
    reader = Reader(body)
    request = reader.uint8()
    reader.expect_end("KeyUpdate")
    if request not in (KEY_UPDATE_NOT_REQUESTED, KEY_UPDATE_REQUESTED):
        raise illegal_parameter(f"KeyUpdate request_update {request}")
    return KeyUpdate(request)


def parse_end_of_early_data(body: bytes) -> bytes:
    if body:
        raise decode_error("EndOfEarlyData has a body")
    return body


Message = (
    ClientHello
    | ServerHello
    | EncryptedExtensions
    | CertificateRequest
    | Certificate
    | CertificateVerify
    | Finished
    | NewSessionTicket
    | KeyUpdate
    | bytes
)

PARSERS: dict[int, Callable[[bytes], Message]] = {
    HandshakeType.client_hello: parse_client_hello,
    HandshakeType.server_hello: parse_server_hello,
    HandshakeType.encrypted_extensions: parse_encrypted_extensions,
    HandshakeType.certificate_request: parse_certificate_request,
    HandshakeType.certificate: parse_certificate,
    HandshakeType.certificate_verify: parse_certificate_verify,
    HandshakeType.finished: parse_finished,
    HandshakeType.new_session_ticket: parse_new_session_ticket,
    HandshakeType.key_update: parse_key_update,
    HandshakeType.end_of_early_data: parse_end_of_early_data,
}


def parse_message(msg_type: int, body: bytes) -> Message:
    parser = PARSERS.get(msg_type)
    if parser is None:
        raise unexpected_message(f"unknown handshake message type {msg_type}")
    result: Message = parser(body)
    return result


# --------------------------------------------------------------------------- #
# Handshake message framing over records
# --------------------------------------------------------------------------- #


class HandshakeBuffer:
    """Reassembles handshake messages from handshake-record payloads.

    Bounded: a message longer than ``max_message_size`` is refused before its
    body is buffered.
    """

    __slots__ = ("_buffer", "max_message_size")

    def __init__(self, max_message_size: int = 1 << 17) -> None:
        self._buffer = bytearray()
        self.max_message_size = max_message_size

    @property
    def empty(self) -> bool:
        return not self._buffer

    def feed(self, fragment: bytes) -> None:
        self._buffer += fragment
        if len(self._buffer) >= 4:
            length = int.from_bytes(self._buffer[1:4], "big")
            if length > self.max_message_size:
                raise _too_big(length, self.max_message_size)

    def next_message(self) -> tuple[int, bytes, bytes] | None:
        """(type, body, raw message) of the next complete message, or None."""
        buf = self._buffer
        if len(buf) < 4:
            return None
        length = int.from_bytes(buf[1:4], "big")
        if length > self.max_message_size:
            raise _too_big(length, self.max_message_size)
        end = 4 + length
        if len(buf) < end:
            return None
        raw = bytes(buf[:end])
        del buf[:end]
        return raw[0], raw[4:], raw


def _too_big(length: int, limit: int) -> TlsAlertError:
    return TlsAlertError(
        AlertDescription.decode_error, f"handshake message of {length} bytes exceeds {limit}"
    )
