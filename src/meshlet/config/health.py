"""Compile a cluster's health settings: core.v3.HealthCheck (HTTP and TCP),
cluster.v3.OutlierDetection and cluster.v3.CircuitBreakers."""

from __future__ import annotations

import binascii
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.type.v3 import range_pb2

from meshlet.config.fields import (
    allow_fields,
    check_enum,
    check_fields,
    duration_field,
    enum_name,
    index,
    join,
    model_default,
    wrapped,
)
from meshlet.config.model import (
    CircuitBreakers,
    CircuitBreakerThresholds,
    HealthCheckConfig,
    HealthCheckKind,
    OutlierDetectionConfig,
)
from meshlet.errors import ConfigError, UnsupportedConfig

_HC = health_check_pb2.HealthCheck
allow_fields(
    _HC,
    "timeout",
    "interval",
    "initial_jitter",
    "interval_jitter",
    "interval_jitter_percent",
    "unhealthy_threshold",
    "healthy_threshold",
    "http_health_check",
    "tcp_health_check",
    "no_traffic_interval",
    "no_traffic_healthy_interval",
    "unhealthy_interval",
)
allow_fields(
    _HC.HttpHealthCheck,
    "host",
    "path",
    "request_headers_to_add",
    "request_headers_to_remove",
    "expected_statuses",
    "method",
)
allow_fields(_HC.TcpHealthCheck, "send", "receive")
allow_fields(_HC.Payload, "text", "binary")
allow_fields(range_pb2.Int64Range, "start", "end")
allow_fields(base_pb2.HeaderValue, "key", "value")
allow_fields(base_pb2.HeaderValueOption, "header")

_OD = outlier_detection_pb2.OutlierDetection
_OUTLIER_UINTS = (
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "max_ejection_percent",
    "enforcing_consecutive_5xx",
    "enforcing_consecutive_gateway_failure",
    "enforcing_success_rate",
    "success_rate_minimum_hosts",
    "success_rate_request_volume",
    "success_rate_stdev_factor",
)
_OUTLIER_PERCENTS = frozenset(
    {
        "max_ejection_percent",
        "enforcing_consecutive_5xx",
        "enforcing_consecutive_gateway_failure",
        "enforcing_success_rate",
    }
)
_OUTLIER_DURATIONS = ("interval", "base_ejection_time", "max_ejection_time")
allow_fields(_OD, *_OUTLIER_UINTS, *_OUTLIER_DURATIONS, "always_eject_one_host")

_CB = circuit_breaker_pb2.CircuitBreakers
_CB_LIMITS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")
allow_fields(_CB, "thresholds")
allow_fields(_CB.Thresholds, "priority", *_CB_LIMITS, "track_remaining")

_METHODS = ("METHOD_UNSPECIFIED", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH")
_DEFAULT_NO_TRAFFIC: float = model_default(HealthCheckConfig, "no_traffic_interval")


# --------------------------------------------------------------------------- #
# Active health checks
# --------------------------------------------------------------------------- #


def compile_health_checks(messages: Any, path: str) -> tuple[HealthCheckConfig, ...]:
    checks = tuple(compile_health_check(m, index(path, i)) for i, m in enumerate(messages))
    if len(checks) > 1:
        raise UnsupportedConfig(
            index(path, 1), "more than one health check per cluster is not supported yet"
        )
    return checks


def _required_duration(msg: Any, name: str, path: str) -> float:
    if not msg.HasField(name):
        raise ConfigError(join(path, name), "is required")
    value = duration_field(msg, name, path, None)
    if value is None:
        raise ConfigError(join(path, name), "must be greater than 0")
    return value


def _threshold(msg: Any, name: str, path: str) -> int:
    if not msg.HasField(name):
        raise ConfigError(join(path, name), "is required")
    value = int(getattr(msg, name).value)
    if value < 1:
        raise ConfigError(join(path, name), "must be at least 1")
    return value


def compile_health_check(msg: Any, path: str) -> HealthCheckConfig:
    check_fields(msg, path)
    kind_name = msg.WhichOneof("health_checker")
    if kind_name is None:
        raise ConfigError(path, "one of http_health_check, tcp_health_check is required")
    common: dict[str, Any] = {
        "timeout": _required_duration(msg, "timeout", path),
        "interval": _required_duration(msg, "interval", path),
        "unhealthy_threshold": _threshold(msg, "unhealthy_threshold", path),
        "healthy_threshold": _threshold(msg, "healthy_threshold", path),
        "initial_jitter": duration_field(msg, "initial_jitter", path, 0.0) or 0.0,
        "interval_jitter": duration_field(msg, "interval_jitter", path, 0.0) or 0.0,
        "interval_jitter_percent": msg.interval_jitter_percent,
        "no_traffic_interval": _positive(msg, "no_traffic_interval", path, _DEFAULT_NO_TRAFFIC),
        "no_traffic_healthy_interval": duration_field(msg, "no_traffic_healthy_interval", path, None),
        "unhealthy_interval": duration_field(msg, "unhealthy_interval", path, None),
    }
    if kind_name == "http_health_check":
        return HealthCheckConfig(
            kind=HealthCheckKind.HTTP,
            **common,
            **_http_check(msg.http_health_check, join(path, kind_name)),
        )
    return HealthCheckConfig(
        kind=HealthCheckKind.TCP, **common, **_tcp_check(msg.tcp_health_check, join(path, kind_name))
    )


def _positive(msg: Any, name: str, path: str, default: float) -> float:
    value = duration_field(msg, name, path, default)
    if value is None:
        raise ConfigError(join(path, name), "must be greater than 0")
    return value


def _http_check(msg: Any, path: str) -> dict[str, Any]:
    check_fields(msg, path)
    if not msg.path:
        raise ConfigError(join(path, "path"), "is required")
    if any(c in msg.path for c in "\r\n ") or not msg.path.startswith("/"):
        raise ConfigError(join(path, "path"), "must be an origin-form path starting with '/'")
    method = check_enum(msg, "method", path, _METHODS)
    headers = []
    for i, option in enumerate(msg.request_headers_to_add):
        option_path = index(join(path, "request_headers_to_add"), i)
        check_fields(option, option_path)
        check_fields(option.header, join(option_path, "header"))
        name = option.header.key.lower()
        if not name or name.startswith(":") or any(c in name + option.header.value for c in "\r\n\0"):
            raise ConfigError(join(option_path, "header"), "is not a valid header")
        headers.append((name, option.header.value))
    statuses = []
    for i, rng in enumerate(msg.expected_statuses):
        range_path = index(join(path, "expected_statuses"), i)
        check_fields(rng, range_path)
        if not 100 <= rng.start < rng.end <= 600:
            raise ConfigError(range_path, "must be a range [start, end) within [100, 600)")
        statuses.append((int(rng.start), int(rng.end)))
    result: dict[str, Any] = {
        "path": msg.path,
        "host": msg.host,
        "method": "GET" if method == "METHOD_UNSPECIFIED" else method,
        "request_headers": tuple(headers),
        "request_headers_to_remove": tuple(n.lower() for n in msg.request_headers_to_remove),
    }
    if statuses:
        result["expected_statuses"] = tuple(statuses)
    return result


def _payload(msg: Any, path: str) -> bytes:
    check_fields(msg, path)
    kind = msg.WhichOneof("payload")
    if kind == "binary":
        return bytes(msg.binary)
    if kind == "text":
        try:
            return binascii.unhexlify(msg.text)
        except (binascii.Error, ValueError):
            raise ConfigError(join(path, "text"), "must be hex-encoded bytes") from None
    raise ConfigError(path, "one of text, binary is required")


def _tcp_check(msg: Any, path: str) -> dict[str, Any]:
    check_fields(msg, path)
    send = _payload(msg.send, join(path, "send")) if msg.HasField("send") else b""
    receive = tuple(_payload(p, index(join(path, "receive"), i)) for i, p in enumerate(msg.receive))
    return {"send": send, "receive": receive}


# --------------------------------------------------------------------------- #
# Outlier detection
# --------------------------------------------------------------------------- #


def compile_outlier_detection(msg: Any, path: str) -> OutlierDetectionConfig:
    check_fields(msg, path)
    values: dict[str, Any] = {}
    for name in _OUTLIER_UINTS:
        if msg.HasField(name):
            value = int(wrapped(msg, name, 0))
            if name in _OUTLIER_PERCENTS and value > 100:
                raise ConfigError(join(path, name), "must be at most 100")
            values[name] = value
    for name in _OUTLIER_DURATIONS:
        seconds = duration_field(msg, name, path, model_default(OutlierDetectionConfig, name))
        if seconds is None:
            raise ConfigError(join(path, name), "must be greater than 0")
        values[name] = seconds
    values["always_eject_one_host"] = bool(wrapped(msg, "always_eject_one_host", False))
    return OutlierDetectionConfig(**values)


# --------------------------------------------------------------------------- #
# Circuit breakers
# --------------------------------------------------------------------------- #


def compile_circuit_breakers(msg: Any, path: str) -> CircuitBreakers:
    check_fields(msg, path)
    by_priority: dict[str, CircuitBreakerThresholds] = {}
    for i, thresholds in enumerate(msg.thresholds):
        item_path = index(join(path, "thresholds"), i)
        check_fields(thresholds, item_path)
        priority = enum_name(thresholds, "priority")
        if priority in by_priority:
            raise ConfigError(join(item_path, "priority"), f"{priority} is given more than once")
        limits = {
            name: int(wrapped(thresholds, name, model_default(CircuitBreakerThresholds, name)))
            for name in _CB_LIMITS
        }
        by_priority[priority] = CircuitBreakerThresholds(
            **limits, track_remaining=thresholds.track_remaining
        )
    return CircuitBreakers(
        default=by_priority.get("DEFAULT", CircuitBreakerThresholds()),
        high=by_priority.get("HIGH", CircuitBreakerThresholds()),
    )
