"""Compile cluster.v3.Cluster and endpoint.v3.ClusterLoadAssignment."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from envoy.type.v3 import percent_pb2

from meshlet.config.address import compile_address
from meshlet.config.dynamic import eds_load_assignment
from meshlet.config.extensions import type_url_of, unpack_any
from meshlet.config.fields import (
    allow_fields,
    check_enum,
    check_fields,
    duration_field,
    index,
    join,
    key,
    model_default,
    wrapped,
)
from meshlet.config.health import compile_circuit_breakers, compile_health_checks, compile_outlier_detection
from meshlet.config.model import (
    Cluster,
    ClusterLoadAssignment,
    DiscoveryType,
    Endpoint,
    HealthStatus,
    Http2Settings,
    LbPolicy,
    LbSettings,
    LocalityEndpoints,
    SlowStartConfig,
    UpstreamProtocol,
)
from meshlet.config.protocol import check_http1_options, common_options, compile_http2_settings
from meshlet.config.tls import compile_transport_socket
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.proxy.upstream.hashing import is_prime

allow_fields(
    cluster_pb2.Cluster,
    "name",
    "type",
    "lb_policy",
    "connect_timeout",
    "load_assignment",
    "eds_cluster_config",
    "transport_socket",
    "http2_protocol_options",
    "typed_extension_protocol_options",
    "dns_refresh_rate",
    "dns_lookup_family",
    "respect_dns_ttl",
    "per_connection_buffer_limit_bytes",
    "health_checks",
    "outlier_detection",
    "circuit_breakers",
    "common_lb_config",
    "round_robin_lb_config",
    "least_request_lb_config",
    "ring_hash_lb_config",
    "maglev_lb_config",
)
_C = cluster_pb2.Cluster
allow_fields(_C.CommonLbConfig, "healthy_panic_threshold", "locality_weighted_lb_config")
allow_fields(_C.RoundRobinLbConfig, "slow_start_config")
allow_fields(_C.LeastRequestLbConfig, "choice_count", "active_request_bias", "slow_start_config")
allow_fields(_C.RingHashLbConfig, "minimum_ring_size", "maximum_ring_size", "hash_function")
allow_fields(_C.MaglevLbConfig, "table_size")
allow_fields(_C.SlowStartConfig, "slow_start_window", "aggression", "min_weight_percent")
# meshlet has no runtime layer: a runtime_key (Envoy requires one) is accepted
# and the default_value is what applies.
allow_fields(base_pb2.RuntimeDouble, "default_value", "runtime_key")
allow_fields(percent_pb2.Percent, "value")
# Which *_lb_config goes with which lb_policy.
_POLICY_CONFIG = {
    "round_robin_lb_config": LbPolicy.ROUND_ROBIN,
    "least_request_lb_config": LbPolicy.LEAST_REQUEST,
    "ring_hash_lb_config": LbPolicy.RING_HASH,
    "maglev_lb_config": LbPolicy.MAGLEV,
}
allow_fields(endpoint_pb2.ClusterLoadAssignment, "cluster_name", "endpoints")
allow_fields(ec.LocalityLbEndpoints, "locality", "lb_endpoints", "load_balancing_weight", "priority")
allow_fields(ec.LbEndpoint, "endpoint", "health_status", "load_balancing_weight")
allow_fields(ec.Endpoint, "address", "hostname")
allow_fields(base_pb2.Locality, "region", "zone", "sub_zone")
allow_fields(
    hpo.HttpProtocolOptions,
    "common_http_protocol_options",
    "explicit_http_config",
    "use_downstream_protocol_config",
    "auto_config",
)
allow_fields(hpo.HttpProtocolOptions.ExplicitHttpConfig, "http_protocol_options", "http2_protocol_options")
allow_fields(
    hpo.HttpProtocolOptions.UseDownstreamHttpConfig, "http_protocol_options", "http2_protocol_options"
)
allow_fields(hpo.HttpProtocolOptions.AutoHttpConfig, "http_protocol_options", "http2_protocol_options")

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HTTP_PROTOCOL_OPTIONS_URL = type_url_of(hpo.HttpProtocolOptions)
_DNS_FAMILIES = ("AUTO", "V4_ONLY", "V6_ONLY", "V4_PREFERRED", "ALL")
_HEALTH = {v.name: v for v in HealthStatus}
_DEFAULT_CONNECT_TIMEOUT: float = model_default(Cluster, "connect_timeout")
_DEFAULT_IDLE_TIMEOUT: float = model_default(Cluster, "idle_timeout")
_DEFAULT_DNS_REFRESH: float = model_default(Cluster, "dns_refresh_rate")
_DEFAULT_BUFFER_LIMIT: int = model_default(Cluster, "per_connection_buffer_limit_bytes")


def compile_cluster(msg: Any, path: str) -> Cluster:
    check_fields(msg, path)
    if not msg.name:
        raise ConfigError(join(path, "name"), "is required")
    discovery = DiscoveryType(check_enum(msg, "type", path, ("STATIC", "STRICT_DNS", "EDS")))
    lb_policy = LbPolicy(check_enum(msg, "lb_policy", path, [p.value for p in LbPolicy]))
    connect_timeout = duration_field(msg, "connect_timeout", path, _DEFAULT_CONNECT_TIMEOUT)
    if connect_timeout is None:
        raise ConfigError(join(path, "connect_timeout"), "must be greater than 0")
    assignment = _load_assignment(msg, path, discovery)
    transport = None
    if msg.HasField("transport_socket"):
        transport = compile_transport_socket(
            msg.transport_socket, join(path, "transport_socket"), server_side=False
        )
    buffer_limit = wrapped(msg, "per_connection_buffer_limit_bytes", _DEFAULT_BUFFER_LIMIT)
    if buffer_limit < 1:
        raise ConfigError(join(path, "per_connection_buffer_limit_bytes"), "must be at least 1")
    refresh = duration_field(msg, "dns_refresh_rate", path, _DEFAULT_DNS_REFRESH)
    if refresh is None:
        raise ConfigError(join(path, "dns_refresh_rate"), "must be greater than 0")
    extras: dict[str, Any] = {} if transport is None else {"transport_socket": transport}
    extras.update(_health(msg, path))
    return Cluster(
        name=msg.name,
        discovery=discovery,
        lb_policy=lb_policy,
        connect_timeout=connect_timeout,
        load_assignment=assignment,
        per_connection_buffer_limit_bytes=buffer_limit,
        dns_refresh_rate=refresh,
        dns_lookup_family=_dns_family(msg, path),
        respect_dns_ttl=msg.respect_dns_ttl,
        lb=compile_lb_settings(msg, path, lb_policy),
        **_protocol_options(msg, path),
        **extras,
    )


def _load_assignment(msg: Any, path: str, discovery: DiscoveryType) -> ClusterLoadAssignment:
    if discovery is DiscoveryType.EDS:
        return eds_load_assignment(msg, path)
    if not msg.HasField("load_assignment"):
        raise ConfigError(join(path, "load_assignment"), f"is required for a {discovery.value} cluster")
    return compile_cluster_load_assignment(
        msg.load_assignment,
        join(path, "load_assignment"),
        allow_hostnames=discovery is DiscoveryType.STRICT_DNS,
        default_name=msg.name,
    )


def _health(msg: Any, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if msg.health_checks:
        out["health_checks"] = compile_health_checks(msg.health_checks, join(path, "health_checks"))
    if msg.HasField("outlier_detection"):
        out["outlier_detection"] = compile_outlier_detection(
            msg.outlier_detection, join(path, "outlier_detection")
        )
    if msg.HasField("circuit_breakers"):
        breakers_path = join(path, "circuit_breakers")
        out["circuit_breakers"] = compile_circuit_breakers(msg.circuit_breakers, breakers_path)
    return out


def compile_lb_settings(msg: Any, path: str, policy: LbPolicy) -> LbSettings:
    """common_lb_config and the ``*_lb_config`` of the cluster's policy."""
    values: dict[str, Any] = {}
    for name, owner in _POLICY_CONFIG.items():
        if msg.HasField(name) and owner is not policy:
            raise ConfigError(join(path, name), f"applies to lb_policy {owner.value}, not {policy.value}")
    if msg.HasField("common_lb_config"):
        values.update(_common_lb(msg.common_lb_config, join(path, "common_lb_config")))
    if msg.HasField("round_robin_lb_config"):
        values.update(_slow_start_of(msg.round_robin_lb_config, join(path, "round_robin_lb_config")))
    if msg.HasField("least_request_lb_config"):
        values.update(_least_request(msg.least_request_lb_config, join(path, "least_request_lb_config")))
    if msg.HasField("ring_hash_lb_config"):
        values.update(_ring_hash(msg.ring_hash_lb_config, join(path, "ring_hash_lb_config")))
    if msg.HasField("maglev_lb_config"):
        values.update(_maglev(msg.maglev_lb_config, join(path, "maglev_lb_config")))
    return LbSettings(**values)


def _percent(msg: Any, path: str) -> float:
    check_fields(msg, path)
    if not 0.0 <= msg.value <= 100.0:
        raise ConfigError(join(path, "value"), "must be between 0 and 100")
    return float(msg.value)


def _common_lb(msg: Any, path: str) -> dict[str, Any]:
    check_fields(msg, path)
    out: dict[str, Any] = {}
    if msg.HasField("healthy_panic_threshold"):
        threshold_path = join(path, "healthy_panic_threshold")
        out["healthy_panic_threshold"] = _percent(msg.healthy_panic_threshold, threshold_path)
    if msg.HasField("locality_weighted_lb_config"):
        check_fields(msg.locality_weighted_lb_config, join(path, "locality_weighted_lb_config"))
        out["locality_weighted"] = True
    return out


def _runtime_double(msg: Any, path: str) -> float:
    check_fields(msg, path)
    return float(msg.default_value)


def _slow_start_of(msg: Any, path: str) -> dict[str, Any]:
    check_fields(msg, path)
    if not msg.HasField("slow_start_config"):
        return {}
    cfg_path = join(path, "slow_start_config")
    cfg = msg.slow_start_config
    check_fields(cfg, cfg_path)
    window = duration_field(cfg, "slow_start_window", cfg_path, None)
    if window is None:
        raise ConfigError(join(cfg_path, "slow_start_window"), "is required and must be greater than 0")
    aggression = 1.0
    if cfg.HasField("aggression"):
        aggression = _runtime_double(cfg.aggression, join(cfg_path, "aggression"))
        if aggression <= 0:
            raise ConfigError(join(cfg_path, "aggression"), "must be greater than 0")
    min_weight = 10.0
    if cfg.HasField("min_weight_percent"):
        min_weight = _percent(cfg.min_weight_percent, join(cfg_path, "min_weight_percent"))
    return {"slow_start": SlowStartConfig(window, aggression, min_weight)}


def _least_request(msg: Any, path: str) -> dict[str, Any]:
    out = _slow_start_of(msg, path)
    choice_count = wrapped(msg, "choice_count", 2)
    if choice_count < 2:
        raise ConfigError(join(path, "choice_count"), "must be at least 2")
    out["choice_count"] = choice_count
    if msg.HasField("active_request_bias"):
        bias = _runtime_double(msg.active_request_bias, join(path, "active_request_bias"))
        if bias < 0:
            raise ConfigError(join(path, "active_request_bias"), "must not be negative")
        out["active_request_bias"] = bias
    return out


_RING_LIMIT = 8 * 1024 * 1024


def _ring_hash(msg: Any, path: str) -> dict[str, Any]:
    check_fields(msg, path)
    check_enum(msg, "hash_function", path, ("XX_HASH",))
    minimum = wrapped(msg, "minimum_ring_size", 1024)
    maximum = wrapped(msg, "maximum_ring_size", _RING_LIMIT)
    if not 1 <= minimum <= _RING_LIMIT:
        raise ConfigError(join(path, "minimum_ring_size"), f"must be between 1 and {_RING_LIMIT}")
    if not minimum <= maximum <= _RING_LIMIT:
        raise ConfigError(
            join(path, "maximum_ring_size"), f"must be between minimum_ring_size and {_RING_LIMIT}"
        )
    return {"ring_min_size": minimum, "ring_max_size": maximum}


def _maglev(msg: Any, path: str) -> dict[str, Any]:
    check_fields(msg, path)
    size = wrapped(msg, "table_size", 65537)
    if size > 5000011 or not is_prime(size):
        raise ConfigError(join(path, "table_size"), "must be a prime number no larger than 5000011")
    return {"maglev_table_size": size}


def _dns_family(msg: Any, path: str) -> Any:
    return check_enum(msg, "dns_lookup_family", path, _DNS_FAMILIES)


def _protocol_options(msg: Any, path: str) -> dict[str, Any]:
    """protocol / http2 / idle_timeout / max_requests_per_connection of a cluster."""
    options = msg.typed_extension_protocol_options
    for name in options:
        if name != HTTP_PROTOCOL_OPTIONS:
            raise UnsupportedConfig(
                key(join(path, "typed_extension_protocol_options"), name), f"{name} is not supported yet"
            )
    if msg.HasField("http2_protocol_options"):
        if HTTP_PROTOCOL_OPTIONS in options:
            raise ConfigError(
                join(path, "http2_protocol_options"),
                f"cannot be combined with typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS!r}]",
            )
        h2 = compile_http2_settings(msg.http2_protocol_options, join(path, "http2_protocol_options"))
        return {"protocol": UpstreamProtocol.HTTP2, "http2": h2}
    if HTTP_PROTOCOL_OPTIONS not in options:
        return {}
    any_path = key(join(path, "typed_extension_protocol_options"), HTTP_PROTOCOL_OPTIONS)
    packed = options[HTTP_PROTOCOL_OPTIONS]
    if packed.type_url != _HTTP_PROTOCOL_OPTIONS_URL:
        raise ConfigError(join(any_path, "@type"), f"expected {_HTTP_PROTOCOL_OPTIONS_URL}")
    return compile_http_protocol_options(unpack_any(packed, any_path), any_path)


def compile_http_protocol_options(msg: Any, path: str) -> dict[str, Any]:
    """envoy.extensions.upstreams.http.v3.HttpProtocolOptions as Cluster keyword arguments."""
    check_fields(msg, path)
    kind = msg.WhichOneof("upstream_protocol_options")
    if kind is None:
        raise ConfigError(
            path, "one of explicit_http_config, use_downstream_protocol_config, auto_config is required"
        )
    result: dict[str, Any] = {"idle_timeout": _DEFAULT_IDLE_TIMEOUT}
    if msg.HasField("common_http_protocol_options"):
        common_path = join(path, "common_http_protocol_options")
        result.update(common_options(msg.common_http_protocol_options, common_path, allow_max_requests=True))
    config_path = join(path, kind)
    config = getattr(msg, kind)
    check_fields(config, config_path)
    if config.HasField("http_protocol_options"):
        check_http1_options(config.http_protocol_options, join(config_path, "http_protocol_options"))
    http2: Http2Settings | None = None
    if config.HasField("http2_protocol_options"):
        http2 = compile_http2_settings(
            config.http2_protocol_options, join(config_path, "http2_protocol_options")
        )
    if kind == "explicit_http_config":
        explicit = config.WhichOneof("protocol_config")
        if explicit is None:
            raise ConfigError(config_path, "one of http_protocol_options, http2_protocol_options is required")
        result["protocol"] = UpstreamProtocol.HTTP2 if http2 is not None else UpstreamProtocol.HTTP1
    elif kind == "auto_config":
        result["protocol"] = UpstreamProtocol.AUTO
    else:
        result["protocol"] = UpstreamProtocol.DOWNSTREAM
    if http2 is not None:
        result["http2"] = http2
    return result


def compile_cluster_load_assignment(
    msg: Any, path: str, *, allow_hostnames: bool = False, default_name: str = ""
) -> ClusterLoadAssignment:
    """Endpoints by locality. Addresses must be IPs unless ``allow_hostnames`` (STRICT_DNS)."""
    check_fields(msg, path)
    name = msg.cluster_name or default_name
    if not name:
        raise ConfigError(join(path, "cluster_name"), "is required")
    localities = tuple(
        _locality(loc, index(join(path, "endpoints"), i), allow_hostnames)
        for i, loc in enumerate(msg.endpoints)
    )
    return ClusterLoadAssignment(cluster_name=name, localities=localities)


def _locality(msg: Any, path: str, allow_hostnames: bool) -> LocalityEndpoints:
    check_fields(msg, path)
    locality = ""
    if msg.HasField("locality"):
        check_fields(msg.locality, join(path, "locality"))
        locality = "/".join((msg.locality.region, msg.locality.zone, msg.locality.sub_zone)).rstrip("/")
    weight = wrapped(msg, "load_balancing_weight", None)
    if weight is not None and weight < 1:
        raise ConfigError(join(path, "load_balancing_weight"), "must be at least 1")
    endpoints = tuple(
        _lb_endpoint(ep, index(join(path, "lb_endpoints"), i), allow_hostnames)
        for i, ep in enumerate(msg.lb_endpoints)
    )
    return LocalityEndpoints(endpoints=endpoints, locality=locality, weight=weight, priority=msg.priority)


def _lb_endpoint(msg: Any, path: str, allow_hostnames: bool) -> Endpoint:
    check_fields(msg, path)
    if msg.WhichOneof("host_identifier") != "endpoint":
        raise ConfigError(join(path, "endpoint"), "is required")
    endpoint_path = join(path, "endpoint")
    check_fields(msg.endpoint, endpoint_path)
    if not msg.endpoint.HasField("address"):
        raise ConfigError(join(endpoint_path, "address"), "is required")
    address = compile_address(
        msg.endpoint.address, join(endpoint_path, "address"), allow_hostname=allow_hostnames
    )
    weight = wrapped(msg, "load_balancing_weight", 1)
    if weight < 1:
        raise ConfigError(join(path, "load_balancing_weight"), "must be at least 1")
    health = check_enum(msg, "health_status", path, _HEALTH)
    return Endpoint(
        address=address, weight=weight, health_status=_HEALTH[health], hostname=msg.endpoint.hostname
    )
