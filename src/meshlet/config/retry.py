"""Compile route.v3.RetryPolicy and the fractional percents traffic management uses."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.v3 import percent_pb2

from meshlet.config.fields import (
    allow_fields,
    check_fields,
    duration_field,
    enum_name,
    index,
    join,
    wrapped,
)
from meshlet.config.matchers import compile_header_matcher
from meshlet.config.model import (
    DEFAULT_RETRY_BASE_INTERVAL,
    FractionalPercent,
    RetryPolicy,
    RuntimeFraction,
)
from meshlet.errors import ConfigError, UnsupportedConfig

allow_fields(
    rc.RetryPolicy,
    "retry_on",
    "num_retries",
    "per_try_timeout",
    "retry_host_predicate",
    "host_selection_retry_max_attempts",
    "retriable_status_codes",
    "retry_back_off",
    "retriable_headers",
)
allow_fields(rc.RetryPolicy.RetryBackOff, "base_interval", "max_interval")
allow_fields(rc.RetryPolicy.RetryHostPredicate, "name", "typed_config")
allow_fields(percent_pb2.FractionalPercent, "numerator", "denominator")
allow_fields(base_pb2.RuntimeFractionalPercent, "default_value", "runtime_key")

PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_HOSTS_TYPE = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
    }
)
_GRPC_RETRY_ON = frozenset(
    {"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}
)
_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


def parse_retry_on(text: str, path: str) -> frozenset[str]:
    """The comma-separated ``retry_on`` conditions; unknown ones are refused."""
    conditions = frozenset(part.strip() for part in text.split(",") if part.strip())
    for condition in sorted(conditions):
        if condition in _GRPC_RETRY_ON:
            raise UnsupportedConfig(path, f"gRPC retry condition {condition!r} is not supported yet")
        if condition not in RETRY_ON:
            raise UnsupportedConfig(
                path,
                f"retry condition {condition!r} is not supported (supported: {', '.join(sorted(RETRY_ON))})",
            )
    return conditions


def compile_retry_policy(msg: Any, path: str) -> RetryPolicy:
    check_fields(msg, path)
    retry_on = parse_retry_on(msg.retry_on, join(path, "retry_on"))
    codes = frozenset(msg.retriable_status_codes)
    for i, code in enumerate(msg.retriable_status_codes):
        if not 100 <= code < 600:
            raise ConfigError(index(join(path, "retriable_status_codes"), i), f"{code} is not an HTTP status")
    headers = tuple(
        compile_header_matcher(h, index(join(path, "retriable_headers"), i))
        for i, h in enumerate(msg.retriable_headers)
    )
    base, cap = _back_off(msg, path)
    attempts = msg.host_selection_retry_max_attempts or 1
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=wrapped(msg, "num_retries", 1),
        per_try_timeout=duration_field(msg, "per_try_timeout", path, None),
        retriable_status_codes=codes,
        retriable_headers=headers,
        back_off_base=base,
        back_off_max=cap,
        avoid_previous_hosts=_host_predicates(msg, path),
        host_selection_retry_max_attempts=max(attempts, 1),
    )


def _back_off(msg: Any, path: str) -> tuple[float, float]:
    if not msg.HasField("retry_back_off"):
        return DEFAULT_RETRY_BASE_INTERVAL, DEFAULT_RETRY_BASE_INTERVAL * 10
    back_off_path = join(path, "retry_back_off")
    back_off = msg.retry_back_off
    check_fields(back_off, back_off_path)
    if not back_off.HasField("base_interval"):
        raise ConfigError(join(back_off_path, "base_interval"), "is required")
    base = duration_field(back_off, "base_interval", back_off_path, None)
    if base is None or base < 0.001:
        raise ConfigError(join(back_off_path, "base_interval"), "must be at least 1ms")
    cap = duration_field(back_off, "max_interval", back_off_path, base * 10)
    if cap is None or cap < base:
        raise ConfigError(join(back_off_path, "max_interval"), "must not be less than base_interval")
    return base, cap


def _host_predicates(msg: Any, path: str) -> bool:
    avoid = False
    for i, predicate in enumerate(msg.retry_host_predicate):
        item_path = index(join(path, "retry_host_predicate"), i)
        check_fields(predicate, item_path)
        type_url = predicate.typed_config.type_url if predicate.HasField("typed_config") else ""
        if predicate.name != PREVIOUS_HOSTS and not type_url.endswith("/" + PREVIOUS_HOSTS_TYPE):
            raise UnsupportedConfig(
                join(item_path, "name"),
                f"retry host predicate {predicate.name or type_url!r} is not supported"
                f" (only {PREVIOUS_HOSTS})",
            )
        avoid = True
    return avoid


def compile_fractional_percent(msg: Any, path: str) -> FractionalPercent:
    check_fields(msg, path)
    denominator = _DENOMINATORS[enum_name(msg, "denominator")]
    # Envoy clamps a numerator above the denominator to 100 %.
    return FractionalPercent(numerator=min(msg.numerator, denominator), denominator=denominator)


def compile_runtime_fraction(msg: Any, path: str) -> RuntimeFraction:
    """The runtime key is kept for /config_dump; the bootstrap's static runtime
    layer only carries meshlet settings, so the default value always applies."""
    check_fields(msg, path)
    if not msg.HasField("default_value"):
        raise ConfigError(join(path, "default_value"), "is required")
    default = compile_fractional_percent(msg.default_value, join(path, "default_value"))
    return RuntimeFraction(default=default, runtime_key=msg.runtime_key)
