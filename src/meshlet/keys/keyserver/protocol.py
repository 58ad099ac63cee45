"""The key server's wire protocol: a sans-IO codec.

Every message is one frame: a 4-byte big-endian body length, then the body.
A request body is ``op (u8) | request id (u32) | fields``; a response body is
``status (u8) | request id (u32) | payload`` (an error's payload is its UTF-8
message). Fields are ``u16``-length-prefixed strings and ``u32``-length-
prefixed byte strings. Requests on one connection may be pipelined; responses
carry the request id and may come in any order.

No message carries private key material out of the server: ``sign`` returns a
signature, ``public_key`` and ``generate`` the SubjectPublicKeyInfo DER,
``list`` the names. ``import`` carries a PEM key *in*, from an admin peer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

MAX_FRAME = 16 * 1024  # an RSA-4096 PKCS#8 PEM is ~3.3 KiB
MAX_SIGN_INPUT = 4096  # TLS 1.3 CertificateVerify content is under 200 bytes
MAX_NAME = 64

_LEN = struct.Struct(">I")
_HEAD = struct.Struct(">BI")
_U16 = struct.Struct(">H")


class ProtocolError(ValueError):
    """Undecodable or oversized input: the connection is closed."""


class Op(IntEnum):
    SIGN = 1
    PUBLIC_KEY = 2
    GENERATE = 3
    IMPORT = 4
    LIST = 5


class Status(IntEnum):
    OK = 0
    BAD_REQUEST = 1
    NOT_FOUND = 2
    FORBIDDEN = 3
    RATE_LIMITED = 4
    BUSY = 5
    EXISTS = 6
    INTERNAL = 7


@dataclass(frozen=True, slots=True)
class SignRequest:
    request_id: int
    handle: str
    scheme: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PublicKeyRequest:
    request_id: int
    handle: str


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: int
    key_type: str
    name: str


@dataclass(frozen=True, slots=True)
class ImportRequest:
    request_id: int
    name: str
    pem: bytes

    def __repr__(self) -> str:  # never print key material
        return f"ImportRequest(request_id={self.request_id}, name={self.name!r}, pem=<{len(self.pem)} bytes>)"


@dataclass(frozen=True, slots=True)
class ListRequest:
    request_id: int


Request = SignRequest | PublicKeyRequest | GenerateRequest | ImportRequest | ListRequest


@dataclass(frozen=True, slots=True)
class Response:
    request_id: int
    status: Status
    payload: bytes = b""

    @property
    def message(self) -> str:
        return self.payload.decode("utf-8", "replace")


# --------------------------------------------------------------------------- #
# Framing
# --------------------------------------------------------------------------- #


def frame(body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies; refuses a frame over ``max_frame``."""

    __slots__ = ("_buffer", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def partial(self) -> bool:
        """A frame has begun but is not complete."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        bodies: list[bytes] = []
        while len(self._buffer) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buffer)
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
            end = _LEN.size + length
            if len(self._buffer) < end:
                break
            bodies.append(bytes(self._buffer[_LEN.size : end]))
            del self._buffer[:end]
        return bodies


# --------------------------------------------------------------------------- #
# Fields
# --------------------------------------------------------------------------- #


def _str(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise ProtocolError("string field too long")
    return _U16.pack(len(raw)) + raw


def _blob(value: bytes) -> bytes:
    return _LEN.pack(len(value)) + value


class _Reader:
    __slots__ = ("_body", "_pos")

    def __init__(self, body: bytes, pos: int) -> None:
        self._body = body
        self._pos = pos

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._body):
            raise ProtocolError("truncated message")
        chunk = self._body[self._pos : end]
        self._pos = end
        return chunk

    def string(self, limit: int = MAX_NAME) -> str:
        (n,) = _U16.unpack(self._take(_U16.size))
        if n > limit:
            raise ProtocolError(f"string field of {n} bytes exceeds {limit}")
        try:
            return self._take(n).decode()
        except UnicodeDecodeError:
            raise ProtocolError("string field is not UTF-8") from None

    def blob(self, limit: int) -> bytes:
        (n,) = _LEN.unpack(self._take(_LEN.size))
        if n > limit:
            raise ProtocolError(f"byte field of {n} bytes exceeds {limit}")
        return self._take(n)

    def u16(self) -> int:
        value: int = _U16.unpack(self._take(_U16.size))[0]
        return value

    def end(self) -> None:
        if self._pos != len(self._body):
            raise ProtocolError("trailing bytes after the message")


# --------------------------------------------------------------------------- #
# Requests and responses
# --------------------------------------------------------------------------- #


def encode_request(request: Request) -> bytes:
    if isinstance(request, SignRequest):
        fields = _str(request.handle) + _U16.pack(request.scheme) + _blob(request.data)
        op = Op.SIGN
    elif isinstance(request, PublicKeyRequest):
        fields, op = _str(request.handle), Op.PUBLIC_KEY
    elif isinstance(request, GenerateRequest):
        fields, op = _str(request.key_type) + _str(request.name), Op.GENERATE
    elif isinstance(request, ImportRequest):
        fields, op = _str(request.name) + _blob(request.pem), Op.IMPORT
    else:
        fields, op = b"", Op.LIST
    return frame(_HEAD.pack(op, request.request_id) + fields)


def decode_request(body: bytes) -> Request:
    if len(body) < _HEAD.size:
        raise ProtocolError("message shorter than its header")
    op, request_id = _HEAD.unpack_from(body)
    reader = _Reader(body, _HEAD.size)
    request: Request
    if op == Op.SIGN:
        handle = reader.string()
        request = SignRequest(request_id, handle, reader.u16(), reader.blob(MAX_SIGN_INPUT))
    elif op == Op.PUBLIC_KEY:
        request = PublicKeyRequest(request_id, reader.string())
    elif op == Op.GENERATE:
        key_type = reader.string()
        request = GenerateRequest(request_id, key_type, reader.string())
    elif op == Op.IMPORT:
        name = reader.string()
        request = ImportRequest(request_id, name, reader.blob(MAX_FRAME))
    elif op == Op.LIST:
        request = ListRequest(request_id)
    else:
        raise ProtocolError(f"unknown operation {op}")
    reader.end()
    return request


def encode_response(response: Response) -> bytes:
    return frame(_HEAD.pack(response.status, response.request_id) + response.payload)


def decode_response(body: bytes) -> Response:
    if len(body) < _HEAD.size:
        raise ProtocolError("message shorter than its header")
    status, request_id = _HEAD.unpack_from(body)
    try:
        return Response(request_id, Status(status), body[_HEAD.size :])
    except ValueError:
        raise ProtocolError(f"unknown status {status}") from None
