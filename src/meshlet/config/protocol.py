"""HTTP protocol options shared by http_connection_manager and clusters."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import protocol_pb2

from meshlet.config.fields import allow_fields, check_fields, duration_field, join, wrapped
from meshlet.config.model import Http2Settings
from meshlet.errors import ConfigError

allow_fields(
    protocol_pb2.Http2ProtocolOptions,
    "max_concurrent_streams",
    "initial_stream_window_size",
    "initial_connection_window_size",
    "allow_connect",
)
allow_fields(protocol_pb2.Http1ProtocolOptions)
allow_fields(
    protocol_pb2.HttpProtocolOptions, "idle_timeout", "max_connection_duration", "max_requests_per_connection"
)

# RFC 9113 6.5.2 / 6.9.1 bounds.
_MIN_WINDOW = 65535
_MAX_WINDOW = 2**31 - 1
DEFAULTS = Http2Settings()


def compile_http2_settings(msg: Any, path: str) -> Http2Settings:
    check_fields(msg, path)
    streams = wrapped(msg, "max_concurrent_streams", DEFAULTS.max_concurrent_streams)
    if streams < 1:
        raise ConfigError(join(path, "max_concurrent_streams"), "must be at least 1")
    windows = {}
    for name in ("initial_stream_window_size", "initial_connection_window_size"):
        size = wrapped(msg, name, getattr(DEFAULTS, name))
        if not _MIN_WINDOW <= size <= _MAX_WINDOW:
            raise ConfigError(join(path, name), f"{size} is out of range [{_MIN_WINDOW}, {_MAX_WINDOW}]")
        windows[name] = size
    return Http2Settings(
        max_concurrent_streams=streams,
        initial_stream_window_size=windows["initial_stream_window_size"],
        initial_connection_window_size=windows["initial_connection_window_size"],
        allow_connect=msg.allow_connect,
    )


def check_http1_options(msg: Any, path: str) -> None:
    """Http1ProtocolOptions: meshlet implements none of its knobs, so any set field is refused."""
    check_fields(msg, path)


def common_options(msg: Any, path: str, *, allow_max_requests: bool) -> dict[str, Any]:
    """core.v3.HttpProtocolOptions: idle_timeout, max_connection_duration, max_requests_per_connection."""
    check_fields(msg, path)
    if msg.HasField("max_requests_per_connection") and not allow_max_requests:
        raise ConfigError(join(path, "max_requests_per_connection"), "is only supported on clusters")
    if msg.HasField("max_connection_duration") and allow_max_requests:
        raise ConfigError(join(path, "max_connection_duration"), "is only supported on listeners yet")
    options: dict[str, Any] = {}
    if msg.HasField("idle_timeout"):
        options["idle_timeout"] = duration_field(msg, "idle_timeout", path, None)
    if msg.HasField("max_connection_duration"):
        options["max_connection_duration"] = duration_field(msg, "max_connection_duration", path, None)
    if msg.HasField("max_requests_per_connection"):
        options["max_requests_per_connection"] = msg.max_requests_per_connection.value or None
    return options
