"""Network filters (http_connection_manager, tcp_proxy) and the router HTTP filter."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from meshlet.config import context
from meshlet.config import fault as _fault  # noqa: F401  (registers envoy.filters.http.fault)
from meshlet.config import ratelimit as _ratelimit  # noqa: F401  (registers local_ratelimit)
from meshlet.config.access_log import compile_access_logs
from meshlet.config.dynamic import rds_route_config
from meshlet.config.extensions import compile_extension, resolve_extension, type_url_of
from meshlet.config.fields import allow_fields, check_enum, check_fields, duration_field, index, join, wrapped
from meshlet.config.model import (
    CodecType,
    HttpConnectionManagerConfig,
    HttpFilterConfig,
    RouterFilterConfig,
    TcpProxyConfig,
)
from meshlet.config.protocol import common_options, compile_http2_settings
from meshlet.config.routes import compile_route_configuration
from meshlet.errors import ConfigError
from meshlet.registry import registry

NETWORK_FILTER = "network_filter"
HTTP_FILTER = "http_filter"
HCM_NAME = "envoy.filters.network.http_connection_manager"
TCP_PROXY_NAME = "envoy.filters.network.tcp_proxy"
ROUTER_NAME = "envoy.filters.http.router"

allow_fields(
    hcm.HttpConnectionManager,
    "codec_type",
    "stat_prefix",
    "route_config",
    "rds",
    "http_filters",
    "access_log",
    "max_request_headers_kb",
    "request_headers_timeout",
    "stream_idle_timeout",
    "request_timeout",
    "common_http_protocol_options",
    "drain_timeout",
    "use_remote_address",
    "xff_num_trusted_hops",
    "skip_xff_append",
    "generate_request_id",
    "preserve_external_request_id",
    "server_name",
    "http2_protocol_options",
    "upgrade_configs",
)
allow_fields(listener_components_pb2.Filter, "name", "typed_config")
allow_fields(hcm.HttpFilter, "name", "typed_config", "disabled")
allow_fields(hcm.HttpConnectionManager.UpgradeConfig, "upgrade_type", "enabled")
allow_fields(router_pb2.Router, "suppress_envoy_headers")
allow_fields(
    tcp_proxy_pb2.TcpProxy, "stat_prefix", "cluster", "idle_timeout", "access_log", "max_connect_attempts"
)

_DEFAULT_HCM = HttpConnectionManagerConfig(stat_prefix="")
_DEFAULT_TCP = TcpProxyConfig(stat_prefix="", cluster="")
# Envoy's hard limits for max_request_headers_kb.
_MAX_HEADERS_KB = 8192


def compile_http_connection_manager(msg: Any, path: str) -> HttpConnectionManagerConfig:
    check_fields(msg, path)
    if not msg.stat_prefix:
        raise ConfigError(join(path, "stat_prefix"), "is required")
    if msg.HasField("rds"):
        route_config = rds_route_config(msg.rds, join(path, "rds"))
    elif msg.HasField("route_config"):
        route_config = compile_route_configuration(msg.route_config, join(path, "route_config"))
    else:
        raise ConfigError(join(path, "route_config"), "is required (or rds)")
    filters = _with_stat_prefix(
        compile_http_filters(msg.http_filters, join(path, "http_filters")), msg.stat_prefix
    )
    timeouts = _hcm_timeouts(msg, path)
    connection: dict[str, Any] = {}
    if msg.HasField("common_http_protocol_options"):
        options_path = join(path, "common_http_protocol_options")
        connection = common_options(msg.common_http_protocol_options, options_path, allow_max_requests=False)
    http2 = _DEFAULT_HCM.http2
    if msg.HasField("http2_protocol_options"):
        http2 = compile_http2_settings(msg.http2_protocol_options, join(path, "http2_protocol_options"))
    return HttpConnectionManagerConfig(
        stat_prefix=msg.stat_prefix,
        codec_type=CodecType(check_enum(msg, "codec_type", path, [c.value for c in CodecType])),
        route_config_name=route_config.name,
        route_config=route_config,
        http_filters=filters,
        access_logs=compile_access_logs(msg.access_log, join(path, "access_log")),
        max_request_headers_kb=_headers_kb(msg, path),
        use_remote_address=wrapped(msg, "use_remote_address", False),
        xff_num_trusted_hops=msg.xff_num_trusted_hops,
        skip_xff_append=msg.skip_xff_append,
        generate_request_id=wrapped(msg, "generate_request_id", True),
        preserve_external_request_id=msg.preserve_external_request_id,
        server_name=msg.server_name or _DEFAULT_HCM.server_name,
        http2=http2,
        upgrades=_hcm_upgrades(msg, path),
        **timeouts,
        **connection,
    )


def _headers_kb(msg: Any, path: str) -> int:
    kb: int = wrapped(msg, "max_request_headers_kb", _DEFAULT_HCM.max_request_headers_kb)
    if not 1 <= kb <= _MAX_HEADERS_KB:
        raise ConfigError(
            join(path, "max_request_headers_kb"), f"{kb} is out of range [1, {_MAX_HEADERS_KB}]"
        )
    return kb


def _hcm_timeouts(msg: Any, path: str) -> dict[str, Any]:
    drain = duration_field(msg, "drain_timeout", path, _DEFAULT_HCM.drain_timeout, zero_disables=False)
    return {
        "request_headers_timeout": duration_field(
            msg, "request_headers_timeout", path, _DEFAULT_HCM.request_headers_timeout
        ),
        "stream_idle_timeout": duration_field(
            msg, "stream_idle_timeout", path, _DEFAULT_HCM.stream_idle_timeout
        ),
        "request_timeout": duration_field(msg, "request_timeout", path, _DEFAULT_HCM.request_timeout),
        "drain_timeout": drain if drain is not None else _DEFAULT_HCM.drain_timeout,
    }


def _hcm_upgrades(msg: Any, path: str) -> frozenset[str]:
    upgrades: set[str] = set()
    for i, upgrade in enumerate(msg.upgrade_configs):
        upgrade_path = index(join(path, "upgrade_configs"), i)
        check_fields(upgrade, upgrade_path)
        if not upgrade.upgrade_type:
            raise ConfigError(join(upgrade_path, "upgrade_type"), "is required")
        # enabled: false leaves it off by default; routes may still enable it.
        if wrapped(upgrade, "enabled", True):
            upgrades.add(upgrade.upgrade_type.lower())
    return frozenset(upgrades)


def compile_http_filters(filters: Sequence[Any], path: str) -> tuple[HttpFilterConfig, ...]:
    """The HTTP filter chain; ``envoy.filters.http.router`` must be last (and only last)."""
    if not filters:
        raise ConfigError(path, f"at least the {ROUTER_NAME} filter is required")
    compiled = []
    for i, f in enumerate(filters):
        filter_path = index(path, i)
        check_fields(f, filter_path)
        if not f.name:
            raise ConfigError(join(filter_path, "name"), "is required")
        ext, message = resolve_extension(HTTP_FILTER, f, filter_path)
        config = ext.factory(message, join(filter_path, "typed_config"))
        is_router = isinstance(config, RouterFilterConfig)
        if is_router and i != len(filters) - 1:
            raise ConfigError(filter_path, f"{ROUTER_NAME} must be the last HTTP filter")
        if not is_router and i == len(filters) - 1:
            raise ConfigError(filter_path, f"the last HTTP filter must be {ROUTER_NAME}, not {f.name!r}")
        if is_router and f.disabled:
            raise ConfigError(join(filter_path, "disabled"), f"{ROUTER_NAME} cannot be disabled")
        type_url = f.typed_config.type_url if f.HasField("typed_config") else next(iter(ext.type_urls), "")
        compiled.append(HttpFilterConfig(name=f.name, type_url=type_url, config=config, disabled=f.disabled))
    return tuple(compiled)


def _with_stat_prefix(
    filters: tuple[HttpFilterConfig, ...], stat_prefix: str
) -> tuple[HttpFilterConfig, ...]:
    """Filters whose stats live under ``http.<stat_prefix>.`` (the fault filter)
    learn the connection manager's prefix here."""
    updated = []
    for f in filters:
        scoped = getattr(f.config, "for_connection_manager", None)
        updated.append(dataclasses.replace(f, config=scoped(stat_prefix)) if scoped is not None else f)
    return tuple(updated)


def _router(msg: Any, path: str) -> RouterFilterConfig:
    check_fields(msg, path)
    return RouterFilterConfig(suppress_envoy_headers=msg.suppress_envoy_headers)


def compile_tcp_proxy(msg: Any, path: str) -> TcpProxyConfig:
    check_fields(msg, path)
    if not msg.stat_prefix:
        raise ConfigError(join(path, "stat_prefix"), "is required")
    if msg.WhichOneof("cluster_specifier") != "cluster" or not msg.cluster:
        raise ConfigError(join(path, "cluster"), "is required")
    known = context.current().clusters
    if known is not None and msg.cluster not in known:
        raise ConfigError(join(path, "cluster"), f"unknown cluster {msg.cluster!r}")
    attempts = wrapped(msg, "max_connect_attempts", _DEFAULT_TCP.max_connect_attempts)
    if attempts < 1:
        raise ConfigError(join(path, "max_connect_attempts"), "must be at least 1")
    return TcpProxyConfig(
        stat_prefix=msg.stat_prefix,
        cluster=msg.cluster,
        idle_timeout=duration_field(msg, "idle_timeout", path, _DEFAULT_TCP.idle_timeout),
        access_logs=compile_access_logs(msg.access_log, join(path, "access_log")),
        max_connect_attempts=attempts,
    )


def compile_network_filters(filters: Sequence[Any], path: str) -> tuple[Any, ...]:
    """A filter chain's network filters; the last one must be terminal."""
    if not filters:
        raise ConfigError(path, "at least one network filter is required")
    compiled = []
    for i, f in enumerate(filters):
        filter_path = index(path, i)
        check_fields(f, filter_path)
        if not f.name and not f.HasField("typed_config"):
            raise ConfigError(join(filter_path, "name"), "is required")
        config = compile_extension(NETWORK_FILTER, f, filter_path)
        terminal = isinstance(config, HttpConnectionManagerConfig | TcpProxyConfig)
        if terminal != (i == len(filters) - 1):
            where = "must be the last filter" if terminal else "the last filter must be terminal"
            raise ConfigError(
                filter_path, f"{f.name or 'filter'}: {where} (http_connection_manager or tcp_proxy)"
            )
        compiled.append(config)
    return tuple(compiled)


registry.register(
    NETWORK_FILTER, HCM_NAME, compile_http_connection_manager, [type_url_of(hcm.HttpConnectionManager)]
)
registry.register(NETWORK_FILTER, TCP_PROXY_NAME, compile_tcp_proxy, [type_url_of(tcp_proxy_pb2.TcpProxy)])
registry.register(HTTP_FILTER, ROUTER_NAME, _router, [type_url_of(router_pb2.Router)])
