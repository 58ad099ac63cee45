"""What the HTTP/1.1 server and client codecs share: hop-by-hop header rules,
``Connection`` token parsing, head serialization and chunked framing.

Everything here is pure (no I/O) and cheap: it runs once per message.
"""

from __future__ import annotations

from http import HTTPStatus

from meshlet.proxy.http.stream import Headers

# Headers that describe one hop's connection, never forwarded (RFC 9110 7.6.1).
# ``te`` is kept when it is exactly "trailers" (gRPC needs it end to end) and
# ``upgrade`` is kept on upgrade requests; the codecs handle those two.
HOP_BY_HOP: frozenset[str] = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade"}
)

REASONS: dict[int, str] = {s.value: s.phrase for s in HTTPStatus}

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"

# Largest response head the client codec accepts (the server's limit is configurable).
DEFAULT_MAX_HEAD_BYTES = 60 * 1024


class HeadTooLarge(Exception):
    """The message head grew past its limit before it was complete."""


class BadMessage(Exception):
    """A well-formed-looking message that HTTP/1.1 semantics still forbid."""


def connection_tokens(value: str) -> set[str]:
    """The lower-case tokens of a ``Connection`` header value."""
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def reason_phrase(status: int, reason: str = "") -> str:
    return reason or REASONS.get(status, "Unknown")


def response_has_no_body(status: int, request_method: str) -> bool:
    """RFC 9112 6.3: responses to HEAD, 1xx, 204 and 304 never carry a body."""
    return request_method == "HEAD" or status < 200 or status == 204 or status == 304


def serialize_head(start_line: str, lines: list[str]) -> bytes:
    """Join a start line and ``"name: value\\r\\n"`` lines into one head.

    A CR or LF inside a name or value would let the sender inject headers or a
    whole second message (response splitting); counting line breaks over the
    joined text catches that without a per-header scan.
    """
    text = start_line + "".join(lines) + "\r\n"
    expected = len(lines) + 2
    if text.count("\n") != expected or text.count("\r") != expected:
        raise ValueError("header name or value contains CR or LF")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("header name or value is not latin-1") from None


def header_lines(headers: Headers) -> list[str]:
    return [f"{k}: {v}\r\n" for k, v in headers]


def chunk_prefix(size: int) -> bytes:
    return b"%x\r\n" % size


def last_chunk(trailers: Headers | None) -> bytes:
    """The zero-size chunk that ends a chunked body, with its trailer section."""
    if not trailers:
        return LAST_CHUNK
    return serialize_head("0\r\n", header_lines(trailers))


def decode_header(name: bytes, value: bytes) -> tuple[str, str]:
    return name.decode("latin-1").lower(), value.decode("latin-1")


def decode_fields(raw: list[tuple[bytes, bytes]] | None) -> Headers | None:
    """Trailer fields as llhttp reported them, in the shared ``Headers`` form."""
    if not raw:
        return None
    return [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in raw]
