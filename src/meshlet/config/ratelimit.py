"""Compile ``envoy.filters.http.local_ratelimit`` (local_ratelimit.v3.LocalRateLimit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as lr
from envoy.type.v3 import http_status_pb2, token_bucket_pb2

from meshlet.config.extensions import type_url_of
from meshlet.config.fields import allow_fields, check_enum, check_fields, duration_field, index, join, wrapped
from meshlet.config.model import FractionalPercent, HeaderValueOption
from meshlet.config.retry import compile_runtime_fraction
from meshlet.config.routes import compile_header_value_option
from meshlet.errors import ConfigError
from meshlet.registry import registry

LOCAL_RATELIMIT_NAME = "envoy.filters.http.local_ratelimit"
LOCAL_RATELIMIT_TYPE_URL = type_url_of(lr.LocalRateLimit)
# Envoy refuses fill intervals below 50 ms.
MIN_FILL_INTERVAL = 0.05

allow_fields(
    lr.LocalRateLimit,
    "stat_prefix",
    "status",
    "token_bucket",
    "filter_enabled",
    "filter_enforced",
    "response_headers_to_add",
    "enable_x_ratelimit_headers",
)
allow_fields(token_bucket_pb2.TokenBucket, "max_tokens", "tokens_per_fill", "fill_interval")
allow_fields(http_status_pb2.HttpStatus, "code")

_DISABLED = FractionalPercent(0, 100)


@dataclass(frozen=True, slots=True)
class TokenBucketConfig:
    max_tokens: int
    tokens_per_fill: int
    fill_interval: float


@dataclass(frozen=True, slots=True)
class LocalRateLimitConfig:
    """Compiled LocalRateLimit. Without ``filter_enabled`` the filter does
    nothing; without ``filter_enforced`` it only counts (both as Envoy)."""

    stat_prefix: str
    bucket: TokenBucketConfig | None
    enabled: FractionalPercent = _DISABLED
    enforced: FractionalPercent = _DISABLED
    status: int = 429
    response_headers: tuple[HeaderValueOption, ...] = ()
    x_ratelimit_headers: bool = False


def compile_local_ratelimit(msg: Any, path: str) -> LocalRateLimitConfig:
    check_fields(msg, path)
    if not msg.stat_prefix:
        raise ConfigError(join(path, "stat_prefix"), "is required")
    bucket = _bucket(msg.token_bucket, join(path, "token_bucket")) if msg.HasField("token_bucket") else None
    status = 429
    if msg.HasField("status"):
        check_fields(msg.status, join(path, "status"))
        status = msg.status.code
        if not 400 <= status < 600:
            raise ConfigError(join(path, "status"), f"{status} is not in [400, 600)")
    headers = []
    for i, option in enumerate(msg.response_headers_to_add):
        compiled = compile_header_value_option(option, index(join(path, "response_headers_to_add"), i))
        if compiled is not None:
            headers.append(compiled)
    mode = check_enum(msg, "enable_x_ratelimit_headers", path, ("OFF", "DRAFT_VERSION_03"))
    return LocalRateLimitConfig(
        stat_prefix=msg.stat_prefix,
        bucket=bucket,
        enabled=_fraction(msg, "filter_enabled", path),
        enforced=_fraction(msg, "filter_enforced", path),
        status=status,
        response_headers=tuple(headers),
        x_ratelimit_headers=mode == "DRAFT_VERSION_03",
    )


def _fraction(msg: Any, field_name: str, path: str) -> FractionalPercent:
    if not msg.HasField(field_name):
        return _DISABLED
    return compile_runtime_fraction(getattr(msg, field_name), join(path, field_name)).default


def _bucket(msg: Any, path: str) -> TokenBucketConfig:
    check_fields(msg, path)
    if msg.max_tokens < 1:
        raise ConfigError(join(path, "max_tokens"), "must be at least 1")
    per_fill = wrapped(msg, "tokens_per_fill", 1)
    if per_fill < 1:
        raise ConfigError(join(path, "tokens_per_fill"), "must be at least 1")
    interval = duration_field(msg, "fill_interval", path, None)
    if interval is None or interval < MIN_FILL_INTERVAL:
        raise ConfigError(join(path, "fill_interval"), "is required and must be at least 50ms")
    return TokenBucketConfig(max_tokens=msg.max_tokens, tokens_per_fill=per_fill, fill_interval=interval)


def compile_local_ratelimit_per_route(msg: Any, path: str) -> LocalRateLimitConfig:
    """typed_per_filter_config: a whole LocalRateLimit with its own bucket for the route."""
    return compile_local_ratelimit(msg, path)


registry.register("http_filter", LOCAL_RATELIMIT_NAME, compile_local_ratelimit, [LOCAL_RATELIMIT_TYPE_URL])
registry.register(
    "http_filter_per_route",
    LOCAL_RATELIMIT_NAME,
    compile_local_ratelimit_per_route,
    [LOCAL_RATELIMIT_TYPE_URL],
)
