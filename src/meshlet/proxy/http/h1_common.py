"""The sans-IO half of the HTTP/1.1 codecs: hop-by-hop header rules,
``Connection`` token parsing, translating llhttp's view of a head into the
shared ``RequestHead`` / ``ResponseHead``, head serialization and chunked
framing.

Everything here is pure (no I/O) and cheap: it runs once per message.
"""

from __future__ import annotations

from http import HTTPStatus

import httptools

from meshlet.proxy.http.stream import Headers, RequestHead, ResponseHead, header_value

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
# Most header (or trailer) fields in one message, Envoy's max_headers_count
# default: the byte limit alone would let 15,000 tiny fields cost ~15 ms each.
MAX_HEADERS_COUNT = 100


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


def decode_fields(raw: list[tuple[bytes, bytes]] | None) -> Headers | None:
    """Trailer fields as llhttp reported them, in the shared ``Headers`` form."""
    if not raw:
        return None
    return [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in raw]


# -- request heads (server side) ---------------------------------------------- #

# Request headers that build_request_head interprets instead of copying.
_SPECIAL_REQUEST_HEADERS = frozenset(
    {"host", "connection", "upgrade", "te", "expect", "keep-alive", "proxy-connection", "transfer-encoding"}
)


class ParsedRequest:
    """The head of one request as the connection manager sees it, plus what
    the codec itself needs to know about the exchange."""

    __slots__ = ("expect_continue", "head", "keep_alive", "raw_body", "tunnel")

    def __init__(
        self, head: RequestHead, keep_alive: bool, expect_continue: bool, tunnel: bool, raw_body: int = 0
    ) -> None:
        self.head = head
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        # After an upgrade / CONNECT head, the connection carries raw bytes.
        self.tunnel = tunnel
        # Body bytes llhttp will not frame: an ignored h2c upgrade offer makes
        # it stop after the head, so the codec counts the content-length itself.
        self.raw_body = raw_body


def build_request_head(
    method: str,
    target: bytes,
    raw_headers: list[tuple[bytes, bytes]],
    version: str,
    scheme: str,
    upgrade: bool,
) -> ParsedRequest:
    """Turn llhttp's view of a request head into a ``RequestHead``.

    Header names are lower-cased, ``Host`` becomes ``authority``, hop-by-hop
    headers are dropped (except ``te: trailers`` and, on upgrade requests,
    ``upgrade``/``connection: upgrade``), an absolute-form target becomes
    origin-form. Raises ``BadMessage`` for requests HTTP/1.1 forbids.
    """
    if version != "1.1" and version != "1.0":
        raise BadMessage(f"HTTP/{version} is not supported")
    headers: Headers = []
    host: str | None = None
    connection = ""
    upgrade_value = ""
    te = ""
    chunked = False
    expect_continue = False
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name not in _SPECIAL_REQUEST_HEADERS:
            headers.append((name, value))
        elif name == "host":
            if host is not None:
                raise BadMessage("multiple host headers")
            host = value
        elif name == "connection":
            connection = f"{connection},{value}" if connection else value
        elif name == "upgrade":
            upgrade_value = value
        elif name == "te":
            te = f"{te},{value}" if te else value
        elif name == "transfer-encoding":
            chunked = True
        elif name == "expect":
            if value.lower() == "100-continue":
                expect_continue = True
            else:
                headers.append((name, value))
    tokens = connection_tokens(connection) if connection else set()
    nominated = tokens - {"close", "keep-alive", "upgrade"}
    if nominated:
        headers = [h for h in headers if h[0] not in nominated]
    if te and "trailers" in connection_tokens(te):
        headers.append(("te", "trailers"))
    tunnel = upgrade
    raw_body = 0
    if upgrade and upgrade_value.strip().lower() == "h2c":
        # HTTP/2 is offered over ALPN or prior knowledge; like Envoy, an h2c
        # upgrade offer is declined by serving the request over HTTP/1.1.
        if chunked:
            raise BadMessage("h2c upgrade offer with a chunked body is not supported")
        tunnel = False
        headers = [h for h in headers if h[0] != "http2-settings"]
        length = header_value(headers, "content-length")
        raw_body = int(length) if length else 0
    elif upgrade and method != "CONNECT":
        headers.append(("connection", "upgrade"))
        headers.append(("upgrade", upgrade_value))
    keep_alive = "close" not in tokens if version == "1.1" else "keep-alive" in tokens
    authority, path = _split_target(method, target, host)
    if not authority and version == "1.1":
        raise BadMessage("missing host header")
    head = RequestHead(method, scheme, authority, path, headers, version)
    return ParsedRequest(head, keep_alive, expect_continue, tunnel, raw_body)


def _split_target(method: str, target: bytes, host: str | None) -> tuple[str, str]:
    """(authority, origin-form path) from the request target and Host."""
    if target[:1] == b"/":
        return host or "", target.decode("latin-1")
    if method == "CONNECT":
        return target.decode("latin-1"), ""
    if target == b"*":
        if method != "OPTIONS":
            raise BadMessage("'*' target is only valid for OPTIONS")
        return host or "", "*"
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise BadMessage("invalid request target") from None
    if not url.host:
        raise BadMessage("invalid request target")
    # RFC 9112 3.2.2: the absolute-form target's authority wins over Host.
    authority = url.host.decode("latin-1")
    if url.port:
        authority = f"{authority}:{url.port}"
    path = (url.path or b"/").decode("latin-1")
    if url.query:
        path = f"{path}?{url.query.decode('latin-1')}"
    return authority, path


# -- response heads (client side) --------------------------------------------- #


def build_response_head(
    status: int, reason: bytes, raw_headers: list[tuple[bytes, bytes]], version: str
) -> tuple[ResponseHead, bool, bool]:
    """(head without hop-by-hop headers, keep-alive, body framed by length or chunks)."""
    headers: Headers = []
    connection = ""
    upgrade = ""
    framed = False
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name in HOP_BY_HOP:
            if name == "connection":
                connection = f"{connection},{value}" if connection else value
            elif name == "transfer-encoding":
                framed = True
            elif name == "upgrade":
                upgrade = value
            continue
        if name == "content-length":
            framed = True
        headers.append((name, value))
    tokens = connection_tokens(connection) if connection else set()
    nominated = tokens - {"close", "keep-alive", "upgrade"}
    if nominated:
        headers = [h for h in headers if h[0] not in nominated]
    if status == 101:
        headers.append(("connection", "upgrade"))
        if upgrade:
            headers.append(("upgrade", upgrade))
    keep_alive = "close" not in tokens if version == "1.1" else "keep-alive" in tokens
    return ResponseHead(status, headers, reason.decode("latin-1")), keep_alive, framed
