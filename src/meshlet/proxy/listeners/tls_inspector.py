"""TLS inspector: a sans-IO ClientHello parser (``envoy.filters.listener.tls_inspector``).

The listener feeds it the first bytes of a connection; it answers, as soon as
it can, whether the connection speaks TLS and, if so, which server name (SNI)
and application protocols (ALPN) the client asked for. The bytes it saw are
not consumed: the listener hands them on to the transport socket.

Behaviour follows Envoy's inspector:
- a first byte that is not a TLS handshake record, or a record that does not
  hold a well-formed ClientHello, means "not TLS" (``raw_buffer``);
- a ClientHello larger than ``MAX_CLIENT_HELLO`` (64 KiB) cannot be inspected
  and the connection is closed (``client_hello_too_large``).

The parser never raises on input; every outcome is an ``Inspection``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MAX_CLIENT_HELLO = 64 * 1024

_RECORD_HANDSHAKE = 0x16
_RECORD_HEADER = 5
_MAX_RECORD_PAYLOAD = 16384 + 2048  # TLSCiphertext bound; plaintext hellos are smaller
_HANDSHAKE_CLIENT_HELLO = 0x01
_HANDSHAKE_HEADER = 4
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_SNI_HOST_NAME = 0x00


class Verdict(StrEnum):
    TLS = "tls"
    NOT_TLS = "raw_buffer"
    # The connection cannot be classified and must be closed.
    CLOSE = "close"


@dataclass(frozen=True, slots=True)
class Inspection:
    verdict: Verdict
    server_name: str = ""
    alpn: tuple[str, ...] = ()
    # Why the verdict is not TLS / close (for stats and debug logs).
    reason: str = ""

    @property
    def transport_protocol(self) -> str:
        return "tls" if self.verdict is Verdict.TLS else "raw_buffer"


class _Malformed(Exception):
    """Internal: the ClientHello body does not parse."""


class ClientHelloInspector:
    """Feed bytes with ``feed``; it returns ``None`` while it needs more, then
    the ``Inspection`` (also kept in ``result``). ``data`` is everything fed."""

    __slots__ = ("_buf", "_handshake", "_records_end", "result")

    def __init__(self) -> None:
        self._buf = bytearray()
        # Handshake-layer bytes reassembled from the records parsed so far.
        self._handshake = bytearray()
        self._records_end = 0
        self.result: Inspection | None = None

    @property
    def data(self) -> bytes:
        return bytes(self._buf)

    def feed(self, data: bytes) -> Inspection | None:
        if self.result is not None:
            return self.result
        self._buf += data
        self.result = self._advance()
        return self.result

    def end_of_data(self) -> Inspection:
        """The peer closed (or the timeout hit) before a verdict: not TLS."""
        if self.result is None:
            self.result = Inspection(Verdict.NOT_TLS, reason="incomplete client hello")
        return self.result

    # -- parsing --------------------------------------------------------- #

    def _advance(self) -> Inspection | None:
        buf = self._buf
        if buf and buf[0] != _RECORD_HANDSHAKE:
            return Inspection(Verdict.NOT_TLS, reason="not a TLS handshake record")
        if len(buf) >= 2 and buf[1] != 3:
            return Inspection(Verdict.NOT_TLS, reason="not a TLS record version")
        while len(buf) - self._records_end >= _RECORD_HEADER:
            start = self._records_end
            if buf[start] != _RECORD_HANDSHAKE or buf[start + 1] != 3:
                return Inspection(Verdict.NOT_TLS, reason="client hello interleaved with other records")
            length = int.from_bytes(buf[start + 3 : start + 5], "big")
            if length == 0 or length > _MAX_RECORD_PAYLOAD:
                return Inspection(Verdict.NOT_TLS, reason="bad TLS record length")
            end = start + _RECORD_HEADER + length
            if end > MAX_CLIENT_HELLO:
                return Inspection(Verdict.CLOSE, reason="client hello too large")
            if end > len(buf):
                break
            self._handshake += buf[start + _RECORD_HEADER : end]
            self._records_end = end
            verdict = self._try_client_hello()
            if verdict is not None:
                return verdict
        if len(buf) >= MAX_CLIENT_HELLO:
            return Inspection(Verdict.CLOSE, reason="client hello too large")
        return None

    def _try_client_hello(self) -> Inspection | None:
        hs = self._handshake
        if len(hs) < _HANDSHAKE_HEADER:
            return None
        if hs[0] != _HANDSHAKE_CLIENT_HELLO:
            return Inspection(Verdict.NOT_TLS, reason="first handshake message is not a client hello")
        length = int.from_bytes(hs[1:4], "big")
        if length > MAX_CLIENT_HELLO:
            return Inspection(Verdict.CLOSE, reason="client hello too large")
        if len(hs) < _HANDSHAKE_HEADER + length:
            return None
        body = bytes(hs[_HANDSHAKE_HEADER : _HANDSHAKE_HEADER + length])
        try:
            server_name, alpn = parse_client_hello(body)
        except _Malformed as exc:
            return Inspection(Verdict.NOT_TLS, reason=f"malformed client hello: {exc}")
        return Inspection(Verdict.TLS, server_name=server_name, alpn=alpn)


class _Reader:
    """Bounds-checked cursor over a byte string; overruns raise ``_Malformed``."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise _Malformed(f"truncated {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def take_all(self) -> bytes:
        return self.take(self.remaining, "field")

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, len_bytes: int, what: str) -> _Reader:
        n = self.uint(len_bytes, f"{what} length")
        if n > self.remaining:
            raise _Malformed(f"truncated {what}")
        sub = _Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return sub


def parse_client_hello(body: bytes) -> tuple[str, tuple[str, ...]]:
    """SNI host name and ALPN protocols from a ClientHello body (RFC 8446 4.1.2)."""
    r = _Reader(body)
    r.take(2, "legacy_version")
    r.take(32, "random")
    if r.vector(1, "session id").remaining > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites = r.vector(2, "cipher suites")
    if suites.remaining == 0 or suites.remaining % 2:
        raise _Malformed("bad cipher suites length")
    if r.vector(1, "compression methods").remaining == 0:
        raise _Malformed("no compression methods")
    server_name = ""
    alpn: tuple[str, ...] = ()
    if r.remaining == 0:
        return server_name, alpn  # pre-extension hello (SSLv3 style)
    exts = r.vector(2, "extensions")
    if r.remaining:
        raise _Malformed("trailing bytes after extensions")
    seen: set[int] = set()
    while exts.remaining:
        ext_type = exts.uint(2, "extension type")
        ext = exts.vector(2, "extension")
        if ext_type in seen:
            raise _Malformed(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext)
    return server_name, alpn


def _parse_server_name(ext: _Reader) -> str:
    names = ext.vector(2, "server name list")
    host = ""
    while names.remaining:
        name_type = names.uint(1, "server name type")
        name = names.vector(2, "server name").take_all()
        if name_type == _SNI_HOST_NAME and not host:
            try:
                host = name.decode("ascii").lower()
            except UnicodeDecodeError:
                raise _Malformed("server name is not ASCII") from None
    return host


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    protos = ext.vector(2, "ALPN list")
    out: list[str] = []
    while protos.remaining:
        proto = protos.vector(1, "ALPN protocol").take_all()
        if not proto:
            raise _Malformed("empty ALPN protocol")
        out.append(proto.decode("latin-1"))
    return tuple(out)

