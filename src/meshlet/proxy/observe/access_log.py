"""Access logs: Envoy's command-operator formats, written without blocking.

A format string (``%START_TIME% "%REQ(:METHOD)%" %RESPONSE_CODE%``) or a JSON
format (key -> format string) is compiled once into a list of small getters
over a ``StreamInfo``; an unknown operator is a ``ConfigError`` at compile
time, as in Envoy. Lines go to a ``LogWriter`` per file path that buffers
them (bounded) and writes in a worker thread, so a slow disk or a blocked
stdout pipe never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntFlag

from meshlet.config.model import AccessLogConfig
from meshlet.errors import ConfigError
from meshlet.proxy.http.stream import RequestHead, ResponseHead
from meshlet.proxy.transport import ConnectionInfo

DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)


class ResponseFlag(IntFlag):
    """Envoy's response flags; ``short_names`` renders them in Envoy's order."""

    NONE = 0
    LH = 1 << 0  # failed local health check
    UH = 1 << 1  # no healthy upstream host
    UT = 1 << 2  # upstream request timeout
    LR = 1 << 3  # local reset
    UR = 1 << 4  # upstream remote reset
    UF = 1 << 5  # upstream connection failure
    UC = 1 << 6  # upstream connection termination
    UO = 1 << 7  # upstream overflow (circuit breaker)
    NR = 1 << 8  # no route
    DI = 1 << 9  # delay injected
    FI = 1 << 10  # fault injected
    RL = 1 << 11  # rate limited
    UAEX = 1 << 12  # unauthorized by external service
    DC = 1 << 13  # downstream connection termination
    URX = 1 << 14  # upstream retry limit / max connect attempts exceeded
    SI = 1 << 15  # stream idle timeout
    DPE = 1 << 16  # downstream protocol error
    UPE = 1 << 17  # upstream protocol error
    NC = 1 << 18  # no cluster
    DT = 1 << 19  # request or connection exceeded its duration


_FLAG_ORDER: tuple[ResponseFlag, ...] = tuple(f for f in ResponseFlag if f is not ResponseFlag.NONE)


def flags_text(flags: ResponseFlag) -> str:
    if not flags:
        return "-"
    return ",".join(f.name or "" for f in _FLAG_ORDER if f & flags)


@dataclass(slots=True)
class StreamInfo:
    """What happened to one request (or one TCP connection), for logs and stats."""

    connection: ConnectionInfo
    start_time: float = field(default_factory=time.time)  # wall clock, for START_TIME
    start_monotonic: float = field(default_factory=time.monotonic)
    request: RequestHead | None = None
    response: ResponseHead | None = None
    response_code: int = 0
    response_code_details: str = ""
    flags: ResponseFlag = ResponseFlag.NONE
    bytes_received: int = 0
    bytes_sent: int = 0
    duration: float | None = None  # seconds, set when the stream finishes
    upstream_host: str = ""
    upstream_cluster: str = ""
    upstream_failure_reason: str = ""
    route_name: str = ""
    protocol: str = ""  # "HTTP/1.1", "HTTP/2"; empty for TCP

    def finish(self) -> None:
        if self.duration is None:
            self.duration = time.monotonic() - self.start_monotonic


Value = str | int | None
Getter = Callable[[StreamInfo], Value]

# %NAME(arg):N%  — START_TIME's argument may itself contain '%', never ')'.
_OPERATOR = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::(\d+))?%")
_PSEUDO = {":method", ":path", ":authority", ":scheme", ":protocol", ":status"}


# --------------------------------------------------------------------------- #
# Operators
# --------------------------------------------------------------------------- #


def _request_header(name: str) -> Callable[[RequestHead], str | None]:
    if name == ":method":
        return lambda h: h.method
    if name == ":path":
        return lambda h: h.path
    if name == ":authority":
        return lambda h: h.authority
    if name == ":scheme":
        return lambda h: h.scheme
    if name == ":protocol":
        return lambda h: h.protocol or None
    return lambda h: h.get(name)


def _req_getter(arg: str, path: str) -> Getter:
    first, _, alt = arg.lower().partition("?")
    for name in (first, alt):
        if name.startswith(":") and name not in _PSEUDO:
            raise ConfigError(path, f"unknown pseudo-header {name!r} in access log format")
    primary = _request_header(first)
    fallback = _request_header(alt) if alt else None

    def get(info: StreamInfo) -> Value:
        head = info.request
        if head is None:
            return None
        value = primary(head)
        if value is None and fallback is not None:
            value = fallback(head)
        return value

    return get


def _resp_getter(arg: str, path: str) -> Getter:
    first, _, alt = arg.lower().partition("?")
    names = [n for n in (first, alt) if n]

    def one(head: ResponseHead, name: str) -> str | None:
        if name == ":status":
            return str(head.status)
        return head.get(name)

    for name in names:
        if name.startswith(":") and name != ":status":
            raise ConfigError(path, f"unknown response pseudo-header {name!r} in access log format")

    def get(info: StreamInfo) -> Value:
        head = info.response
        if head is None:
            return None
        for name in names:
            value = one(head, name)
            if value is not None:
                return value
        return None

    return get


_FRACTION = re.compile(r"%([1-9])?f")


def _start_time_getter(arg: str) -> Getter:
    if not arg:
        return lambda info: _iso_millis(info.start_time)

    def get(info: StreamInfo) -> Value:
        ts = info.start_time
        moment = datetime.fromtimestamp(ts, UTC)

        def fraction(m: re.Match[str]) -> str:
            digits = int(m.group(1) or 9)
            nanos = int((ts % 1) * 1_000_000_000)
            return f"{nanos:09d}"[:digits]

        fmt = _FRACTION.sub(fraction, arg).replace("%s", str(int(ts)))
        return moment.strftime(fmt)

    return get


def _iso_millis(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _duration_ms(info: StreamInfo) -> Value:
    if info.duration is None:
        info.finish()
    return int((info.duration or 0.0) * 1000)


def _address(addr: tuple[str, int] | None, with_port: bool = True) -> str | None:
    if not addr:
        return None
    host, port = addr[0], addr[1]
    if not with_port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _first_or_none(values: tuple[str, ...]) -> str | None:
    return values[0] if values else None


_HOSTNAME = socket.gethostname()

_SIMPLE: dict[str, Getter] = {
    "RESPONSE_CODE": lambda i: i.response_code,
    "RESPONSE_CODE_DETAILS": lambda i: i.response_code_details or None,
    "RESPONSE_FLAGS": lambda i: flags_text(i.flags),
    "BYTES_RECEIVED": lambda i: i.bytes_received,
    "BYTES_SENT": lambda i: i.bytes_sent,
    "DURATION": _duration_ms,
    "UPSTREAM_HOST": lambda i: i.upstream_host or None,
    "UPSTREAM_CLUSTER": lambda i: i.upstream_cluster or None,
    "UPSTREAM_TRANSPORT_FAILURE_REASON": lambda i: i.upstream_failure_reason or None,
    "DOWNSTREAM_REMOTE_ADDRESS": lambda i: _address(i.connection.peer),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda i: _address(i.connection.peer, False),
    "DOWNSTREAM_LOCAL_ADDRESS": lambda i: _address(i.connection.original_dst or i.connection.local),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda i: _address(
        i.connection.original_dst or i.connection.local, False
    ),
    "DOWNSTREAM_PEER_URI_SAN": lambda i: _first_or_none(i.connection.security.peer_uri_sans),
    "DOWNSTREAM_LOCAL_URI_SAN": lambda i: _first_or_none(i.connection.security.local_uri_sans),
    "DOWNSTREAM_PEER_SUBJECT": lambda i: i.connection.security.peer_subject or None,
    "DOWNSTREAM_TLS_VERSION": lambda i: i.connection.security.version or None,
    "DOWNSTREAM_TLS_CIPHER": lambda i: i.connection.security.cipher or None,
    "REQUESTED_SERVER_NAME": lambda i: i.connection.security.sni or None,
    "CONNECTION_ID": lambda i: i.connection.connection_id,
    "ROUTE_NAME": lambda i: i.route_name or None,
    "PROTOCOL": lambda i: i.protocol or None,
    "HOSTNAME": lambda i: _HOSTNAME,
}

# Operators whose JSON rendering is a number, as Envoy's typed JSON output.
_NUMERIC = {"RESPONSE_CODE", "BYTES_RECEIVED", "BYTES_SENT", "DURATION", "CONNECTION_ID"}


def _operator(name: str, arg: str | None, max_len: int | None, path: str) -> Getter:
    getter: Getter
    if name == "REQ":
        getter = _req_getter(_require_arg(name, arg, path), path)
    elif name == "RESP":
        getter = _resp_getter(_require_arg(name, arg, path), path)
    elif name == "START_TIME":
        getter = _start_time_getter(arg or "")
    elif name in _SIMPLE:
        if arg is not None:
            raise ConfigError(path, f"access log operator %{name}% takes no argument")
        getter = _SIMPLE[name]
    else:
        raise ConfigError(path, f"access log command operator %{name}% is not supported")
    if max_len is None:
        return getter
    return _truncated(getter, max_len)


def _require_arg(name: str, arg: str | None, path: str) -> str:
    if not arg:
        raise ConfigError(path, f"access log operator %{name}% needs a header name: %{name}(X-NAME)%")
    return arg


def _truncated(getter: Getter, max_len: int) -> Getter:
    def get(info: StreamInfo) -> Value:
        value = getter(info)
        return value[:max_len] if isinstance(value, str) else value

    return get


# --------------------------------------------------------------------------- #
# Formatters
# --------------------------------------------------------------------------- #

Piece = str | Getter


def _parse(fmt: str, path: str) -> list[tuple[Piece, str]]:
    """Split ``fmt`` into literals and operator getters (with the operator name)."""
    pieces: list[tuple[Piece, str]] = []
    pos = 0
    while pos < len(fmt):
        pct = fmt.find("%", pos)
        if pct < 0:
            pieces.append((fmt[pos:], ""))
            break
        if pct > pos:
            pieces.append((fmt[pos:pct], ""))
        m = _OPERATOR.match(fmt, pct)
        if m is None:
            raise ConfigError(path, f"invalid access log format: no valid command operator at position {pct}")
        name, arg, max_len = m.group(1), m.group(2), m.group(3)
        pieces.append((_operator(name, arg, int(max_len) if max_len else None, path), name))
        pos = m.end()
    return pieces


class TextFormatter:
    """A compiled text format: ``format(info)`` renders one line."""

    __slots__ = ("_pieces",)

    def __init__(self, pieces: list[Piece]) -> None:
        self._pieces = pieces

    def format(self, info: StreamInfo) -> str:
        out: list[str] = []
        for piece in self._pieces:
            if isinstance(piece, str):
                out.append(piece)
            else:
                value = piece(info)
                out.append("-" if value is None or value == "" else str(value))
        return "".join(out)


class JsonFormatter:
    """A compiled JSON format: one JSON object per line. A value that is a
    single operator keeps its type (numbers stay numbers, missing is null)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[str, Getter | TextFormatter]]) -> None:
        self._fields = fields

    def format(self, info: StreamInfo) -> str:
        obj: dict[str, object] = {}
        for key, render in self._fields:
            obj[key] = render.format(info) if isinstance(render, TextFormatter) else render(info)
        return json.dumps(obj, separators=(",", ":")) + "\n"


def compile_format(fmt: str, path: str) -> TextFormatter:
    """Compile a text format; ``ConfigError`` naming ``path`` if it is invalid."""
    return TextFormatter([piece for piece, _ in _parse(fmt, path)])


def compile_json_format(fmt: dict[str, str], path: str) -> JsonFormatter:
    fields: list[tuple[str, Getter | TextFormatter]] = []
    for key, value in fmt.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}.{key}", "only string values are supported in json_format")
        pieces = _parse(value, f"{path}.{key}")
        if len(pieces) == 1 and not isinstance(pieces[0][0], str):
            getter, name = pieces[0]
            assert not isinstance(getter, str)
            fields.append((key, getter if name in _NUMERIC else _as_text(getter)))
        else:
            fields.append((key, TextFormatter([p for p, _ in pieces])))
    return JsonFormatter(fields)


def _as_text(getter: Getter) -> Getter:
    def get(info: StreamInfo) -> Value:
        value = getter(info)
        return None if value is None or value == "" else str(value)

    return get


# --------------------------------------------------------------------------- #
# Writers
# --------------------------------------------------------------------------- #


class LogWriter:
    """Appends lines to one file (or stdout/stderr) off the event loop.

    Lines are buffered; a flush starts when the buffer passes ``flush_bytes``
    or ``flush_interval`` after the first buffered line, and runs in the
    default executor, one at a time. Past ``max_buffer`` bytes, lines are
    dropped and counted (``dropped``) rather than letting memory grow.
    """

    def __init__(
        self,
        path: str,
        *,
        flush_bytes: int = 64 * 1024,
        flush_interval: float = 1.0,
        max_buffer: int = 4 * 1024 * 1024,
    ) -> None:
        self.path = path
        self.flush_bytes = flush_bytes
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.dropped = 0
        self.write_errors = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._fd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Future[None] | None = None

    def write(self, line: str) -> None:
        data = line.encode("utf-8", "replace")
        if self._pending_size + len(data) > self.max_buffer:
            self.dropped += 1
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= self.flush_bytes:
            self._start_flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush_sync()
                return
            self._timer = loop.call_later(self.flush_interval, self._start_flush)

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None or not self._pending:
            return
        data = self._take()
        loop = asyncio.get_running_loop()
        self._flushing = loop.run_in_executor(None, self._write_out, data)
        self._flushing.add_done_callback(self._flushed)

    def _flushed(self, fut: asyncio.Future[None]) -> None:
        self._flushing = None
        if not fut.cancelled() and fut.exception() is not None:
            self.write_errors += 1
        if self._pending_size >= self.flush_bytes:
            self._start_flush()
        elif self._pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._start_flush)

    def _take(self) -> bytes:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return data

    def _write_out(self, data: bytes) -> None:
        fd = self._open()
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def _open(self) -> int:
        if self._fd is None:
            if self.path == "/dev/stdout":
                self._fd = 1
            elif self.path == "/dev/stderr":
                self._fd = 2
            else:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    async def flush(self) -> None:
        """Write out everything buffered (waits for a flush in progress)."""
        while self._flushing is not None or self._pending:
            if self._flushing is not None:
                await asyncio.shield(self._flushing)
            else:
                self._start_flush()

    def flush_sync(self) -> None:
        """Write out what is buffered now, blocking (shutdown, or no event loop)."""
        if self._pending:
            try:
                self._write_out(self._take())
            except OSError:
                self.write_errors += 1

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush_sync()
        if self._fd is not None and self._fd > 2:
            os.close(self._fd)
        self._fd = None


class WriterPool:
    """One ``LogWriter`` per path, shared by every access log writing there."""

    def __init__(self) -> None:
        self._writers: dict[str, LogWriter] = {}

    def get(self, path: str) -> LogWriter:
        writer = self._writers.get(path)
        if writer is None:
            writer = self._writers[path] = LogWriter(path)
        return writer

    async def flush(self) -> None:
        for writer in list(self._writers.values()):
            await writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


WRITERS = WriterPool()
"""The process's writers (a proxy has one set of log files)."""


class AccessLog:
    """One configured access log: a compiled format and the writer it uses."""

    __slots__ = ("_formatter", "_writer")

    def __init__(self, formatter: TextFormatter | JsonFormatter, writer: LogWriter) -> None:
        self._formatter = formatter
        self._writer = writer

    @classmethod
    def from_config(cls, cfg: AccessLogConfig, path: str, writers: WriterPool = WRITERS) -> AccessLog:
        formatter: TextFormatter | JsonFormatter
        if cfg.json_format is not None:
            formatter = compile_json_format(cfg.json_format, f"{path}.json_format")
        else:
            formatter = compile_format(cfg.text_format or DEFAULT_FORMAT, f"{path}.text_format")
        return cls(formatter, writers.get(cfg.path))

    def log(self, info: StreamInfo) -> None:
        self._writer.write(self._formatter.format(info))


def build_access_logs(
    configs: tuple[AccessLogConfig, ...], path: str, writers: WriterPool = WRITERS
) -> tuple[AccessLog, ...]:
    return tuple(AccessLog.from_config(c, f"{path}[{i}]", writers) for i, c in enumerate(configs))
