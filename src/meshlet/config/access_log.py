"""Access loggers: ``envoy.access_loggers.file`` / ``stdout`` / ``stderr``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import substitution_format_string_pb2 as sfs
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from google.protobuf import json_format

from meshlet.config.datasource import read_data_source
from meshlet.config.extensions import compile_extension, type_url_of
from meshlet.config.fields import allow_fields, check_fields, index, join
from meshlet.config.model import AccessLogConfig
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.proxy.observe.access_log import compile_format, compile_json_format
from meshlet.registry import registry

CATEGORY = "access_logger"
MAX_FORMAT_BYTES = 64 * 1024

allow_fields(accesslog_pb2.AccessLog, "name", "typed_config")
allow_fields(file_pb2.FileAccessLog, "path", "log_format")
allow_fields(stream_pb2.StdoutAccessLog, "log_format")
allow_fields(stream_pb2.StderrAccessLog, "log_format")
allow_fields(sfs.SubstitutionFormatString, "text_format", "text_format_source", "json_format")


def compile_access_logs(entries: Sequence[Any], path: str) -> tuple[AccessLogConfig, ...]:
    logs = []
    for i, entry in enumerate(entries):
        entry_path = index(path, i)
        check_fields(entry, entry_path)
        compiled = compile_extension(CATEGORY, entry, entry_path)
        if not isinstance(compiled, AccessLogConfig):
            raise ConfigError(entry_path, f"access logger {entry.name!r} did not compile to an access log")
        logs.append(compiled)
    return tuple(logs)


def _file_logger(msg: Any, path: str) -> AccessLogConfig:
    check_fields(msg, path)
    if not msg.path:
        raise ConfigError(join(path, "path"), "is required")
    return _with_format(msg.path, msg, path)


def _stream_logger(target: str) -> Any:
    def factory(msg: Any, path: str) -> AccessLogConfig:
        check_fields(msg, path)
        return _with_format(target, msg, path)

    return factory


def _with_format(target: str, msg: Any, path: str) -> AccessLogConfig:
    if not msg.HasField("log_format"):
        return AccessLogConfig(path=target)
    fmt_path = join(path, "log_format")
    fmt = msg.log_format
    check_fields(fmt, fmt_path)
    kind = fmt.WhichOneof("format")
    # Formats are compiled here once so a bad command operator is a config
    # error naming the field, not a failure when the first request is logged.
    if kind == "text_format":
        compile_format(fmt.text_format, join(fmt_path, "text_format"))
        return AccessLogConfig(path=target, text_format=fmt.text_format)
    if kind == "text_format_source":
        source_path = join(fmt_path, "text_format_source")
        text = read_data_source(fmt.text_format_source, source_path, limit=MAX_FORMAT_BYTES)
        decoded = text.decode("utf-8", "replace")
        compile_format(decoded, source_path)
        return AccessLogConfig(path=target, text_format=decoded)
    if kind == "json_format":
        json_path = join(fmt_path, "json_format")
        json_fmt = _json_format(fmt.json_format, json_path)
        compile_json_format(json_fmt, json_path)
        return AccessLogConfig(path=target, json_format=json_fmt)
    raise ConfigError(fmt_path, "one of text_format, text_format_source, json_format is required")


def _json_format(struct: Any, path: str) -> dict[str, str]:
    data = json_format.MessageToDict(struct)
    for key, value in data.items():
        if not isinstance(value, str):
            raise UnsupportedConfig(join(path, key), "only string values are supported in json_format yet")
    return dict(data)


registry.register(CATEGORY, "envoy.access_loggers.file", _file_logger, [type_url_of(file_pb2.FileAccessLog)])
registry.register(
    CATEGORY,
    "envoy.access_loggers.stdout",
    _stream_logger("/dev/stdout"),
    [type_url_of(stream_pb2.StdoutAccessLog)],
)
registry.register(
    CATEGORY,
    "envoy.access_loggers.stderr",
    _stream_logger("/dev/stderr"),
    [type_url_of(stream_pb2.StderrAccessLog)],
)
