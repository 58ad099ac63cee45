"""Compile ``envoy.filters.http.fault`` (extensions.filters.http.fault.v3.HTTPFault)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault
from envoy.extensions.filters.http.fault.v3 import fault_pb2

from meshlet.config.extensions import type_url_of
from meshlet.config.fields import allow_fields, check_fields, duration_field, index, join, wrapped
from meshlet.config.matchers import compile_header_matcher
from meshlet.config.model import FractionalPercent, HeaderMatcher
from meshlet.config.retry import compile_fractional_percent
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.registry import registry

FAULT_NAME = "envoy.filters.http.fault"
FAULT_TYPE_URL = type_url_of(fault_pb2.HTTPFault)

allow_fields(fault_pb2.HTTPFault, "delay", "abort", "headers", "downstream_nodes", "max_active_faults")
allow_fields(fault_pb2.FaultAbort, "http_status", "grpc_status", "header_abort", "percentage")
allow_fields(fault_pb2.FaultAbort.HeaderAbort)
allow_fields(common_fault.FaultDelay, "fixed_delay", "header_delay", "percentage")
allow_fields(common_fault.FaultDelay.HeaderDelay)

_NO_PERCENT = FractionalPercent(0, 100)


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Compiled HTTPFault. A delay and an abort each apply to ``*_percent`` of
    the matching requests; ``*_from_header`` takes the value (and optionally a
    lower percentage) from the request's ``x-envoy-fault-*`` headers."""

    delay: float | None = None
    delay_from_header: bool = False
    delay_percent: FractionalPercent = _NO_PERCENT
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    abort_from_header: bool = False
    abort_percent: FractionalPercent = _NO_PERCENT
    headers: tuple[HeaderMatcher, ...] = ()
    downstream_nodes: frozenset[str] = frozenset()
    max_active_faults: int | None = None
    # The connection manager's stat_prefix (stats live under http.<prefix>.fault.).
    stat_prefix: str = ""

    @property
    def has_delay(self) -> bool:
        return self.delay is not None or self.delay_from_header

    @property
    def has_abort(self) -> bool:
        return self.abort_status is not None or self.abort_grpc_status is not None or self.abort_from_header

    def for_connection_manager(self, stat_prefix: str) -> FaultConfig:
        return replace(self, stat_prefix=stat_prefix)


def compile_fault(msg: Any, path: str) -> FaultConfig:
    check_fields(msg, path)
    config = FaultConfig(
        headers=tuple(
            compile_header_matcher(h, index(join(path, "headers"), i)) for i, h in enumerate(msg.headers)
        ),
        downstream_nodes=frozenset(msg.downstream_nodes),
        max_active_faults=wrapped(msg, "max_active_faults", None),
    )
    if msg.HasField("delay"):
        config = _with_delay(config, msg.delay, join(path, "delay"))
    if msg.HasField("abort"):
        config = _with_abort(config, msg.abort, join(path, "abort"))
    return config


def _percent(msg: Any, path: str) -> FractionalPercent:
    if not msg.HasField("percentage"):
        return _NO_PERCENT
    return compile_fractional_percent(msg.percentage, join(path, "percentage"))


def _with_delay(config: FaultConfig, msg: Any, path: str) -> FaultConfig:
    check_fields(msg, path)
    kind = msg.WhichOneof("fault_delay_secifier")
    if kind is None:
        raise ConfigError(path, "one of fixed_delay, header_delay is required")
    delay = duration_field(msg, "fixed_delay", path, None) if kind == "fixed_delay" else None
    if kind == "fixed_delay" and delay is None:
        raise ConfigError(join(path, "fixed_delay"), "must be positive")
    return replace(
        config, delay=delay, delay_from_header=kind == "header_delay", delay_percent=_percent(msg, path)
    )


def _with_abort(config: FaultConfig, msg: Any, path: str) -> FaultConfig:
    check_fields(msg, path)
    kind = msg.WhichOneof("error_type")
    if kind is None:
        raise ConfigError(path, "one of http_status, grpc_status, header_abort is required")
    status = grpc = None
    if kind == "http_status":
        status = msg.http_status
        if not 200 <= status < 600:
            raise ConfigError(join(path, "http_status"), f"{status} is not in [200, 600)")
    elif kind == "grpc_status":
        grpc = msg.grpc_status
        if grpc > 16:
            raise UnsupportedConfig(join(path, "grpc_status"), f"{grpc} is not a gRPC status code")
    return replace(
        config,
        abort_status=status,
        abort_grpc_status=grpc,
        abort_from_header=kind == "header_abort",
        abort_percent=_percent(msg, path),
    )


def compile_fault_per_route(msg: Any, path: str) -> FaultConfig:
    """typed_per_filter_config: an HTTPFault that replaces the filter's own for the route."""
    return compile_fault(msg, path)


registry.register("http_filter", FAULT_NAME, compile_fault, [FAULT_TYPE_URL])
registry.register("http_filter_per_route", FAULT_NAME, compile_fault_per_route, [FAULT_TYPE_URL])
