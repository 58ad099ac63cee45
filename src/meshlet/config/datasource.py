"""envoy.config.core.v3.DataSource: file name, inline string or inline bytes."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2

from meshlet.config.fields import allow_fields, check_fields, join
from meshlet.errors import ConfigError

allow_fields(base_pb2.DataSource, "filename", "inline_bytes", "inline_string")

# Config files (certificates, bodies, formats) are small; refuse anything absurd.
MAX_DATA_SOURCE_BYTES = 4 * 1024 * 1024


def read_data_source(msg: Any, path: str, *, limit: int = MAX_DATA_SOURCE_BYTES) -> bytes:
    """The bytes a DataSource names; ConfigError naming ``path`` when unreadable."""
    check_fields(msg, path)
    kind = msg.WhichOneof("specifier")
    if kind is None:
        raise ConfigError(path, "one of filename, inline_string, inline_bytes is required")
    if kind == "filename":
        data = _read_file(msg.filename, join(path, "filename"), limit)
    elif kind == "inline_string":
        data = msg.inline_string.encode("utf-8")
    else:
        data = bytes(msg.inline_bytes)
    if len(data) > limit:
        raise ConfigError(join(path, kind), f"is larger than {limit} bytes")
    return data


def describe_data_source(msg: Any) -> str:
    """Where the data came from, for diagnostics (never the data itself)."""
    kind = msg.WhichOneof("specifier")
    return f"file:{msg.filename}" if kind == "filename" else f"<{kind or 'unset'}>"


def _read_file(filename: str, path: str, limit: int) -> bytes:
    if not filename:
        raise ConfigError(path, "must not be empty")
    try:
        with open(filename, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(path, f"{filename}: no such file") from None
    except OSError as exc:
        raise ConfigError(path, f"{filename}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError(path, f"{filename} is larger than {limit} bytes")
    return data
