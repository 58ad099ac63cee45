"""Compiling traffic management: retry policies, weighted clusters, mirrors,
runtime_fraction, per-route filter configs, and what is refused."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from meshlet.config.compiler import compile_bootstrap
from meshlet.config.fault import FaultConfig
from meshlet.config.loader import parse_bootstrap_text
from meshlet.config.model import (
    ClusterAction,
    FractionalPercent,
    MirrorPolicy,
    ProxyConfig,
    RetryPolicy,
    VirtualHost,
)
from meshlet.config.ratelimit import LocalRateLimitConfig
from meshlet.errors import ConfigError, UnsupportedConfig

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTES = (
    "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0]"
)


def config_with(route: dict[str, Any], vhost: dict[str, Any] | None = None) -> dict[str, Any]:
    clusters = [
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": []},
        }
        for name in ("app", "canary", "shadow")
    ]
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "web",
        "route_config": {
            "name": "r",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route], **(vhost or {})}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    listener = {
        "name": "web",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


def compiled_vhost(route: dict[str, Any], vhost: dict[str, Any] | None = None) -> VirtualHost:
    config: ProxyConfig = compile_bootstrap(parse_bootstrap_text(json.dumps(config_with(route, vhost))))
    return config.route_configs["r"].virtual_hosts[0]


def action_of(route_action: dict[str, Any]) -> ClusterAction:
    action = compiled_vhost({"match": {"prefix": "/"}, "route": route_action}).routes[0].action
    assert isinstance(action, ClusterAction)
    return action


def refused(route: dict[str, Any], vhost: dict[str, Any] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compiled_vhost(route, vhost)
    return info.value


def test_retry_policy_compiles_every_supported_field() -> None:
    policy = action_of(
        {
            "cluster": "app",
            "retry_policy": {
                "retry_on": "5xx, connect-failure,retriable-headers,retriable-status-codes",
                "num_retries": 4,
                "per_try_timeout": "0.25s",
                "retriable_status_codes": [409, 418],
                "retriable_headers": [{"name": "x-retry-me", "present_match": True}],
                "retry_back_off": {"base_interval": "0.1s"},
                "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
                "host_selection_retry_max_attempts": 5,
            },
        }
    ).retry_policy
    assert policy is not None
    assert policy.retry_on == frozenset(
        {"5xx", "connect-failure", "retriable-headers", "retriable-status-codes"}
    )
    assert (policy.num_retries, policy.per_try_timeout) == (4, 0.25)
    assert policy.retriable_status_codes == frozenset({409, 418})
    assert [m.name for m in policy.retriable_headers] == ["x-retry-me"]
    # max_interval defaults to ten times the base interval.
    assert (policy.back_off_base, policy.back_off_max) == (0.1, pytest.approx(1.0))
    assert policy.avoid_previous_hosts
    assert policy.host_selection_retry_max_attempts == 5


def test_retry_defaults_and_the_virtual_host_policy() -> None:
    vhost = compiled_vhost(
        {"match": {"prefix": "/"}, "route": {"cluster": "app"}},
        {
            "retry_policy": {"retry_on": "gateway-error"},
            "include_request_attempt_count": True,
            "include_attempt_count_in_response": True,
            "per_request_buffer_limit_bytes": 2048,
        },
    )
    assert vhost.retry_policy == RetryPolicy(retry_on=frozenset({"gateway-error"}))
    assert vhost.retry_policy.num_retries == 1
    assert (vhost.retry_policy.back_off_base, vhost.retry_policy.back_off_max) == (0.025, 0.25)
    assert vhost.include_request_attempt_count and vhost.include_attempt_count_in_response
    assert vhost.per_request_buffer_limit == 2048


def test_weighted_clusters_and_mirrors() -> None:
    action = action_of(
        {
            "weighted_clusters": {
                "clusters": [
                    {"name": "app", "weight": 90},
                    {
                        "name": "canary",
                        "weight": 10,
                        "request_headers_to_add": [{"header": {"key": "x-canary", "value": "1"}}],
                    },
                ],
                "total_weight": 100,
            },
            "request_mirror_policies": [
                {
                    "cluster": "shadow",
                    "runtime_fraction": {"default_value": {"numerator": 5, "denominator": "TEN_THOUSAND"}},
                }
            ],
        }
    )
    assert action.cluster == ""
    assert [(c.name, c.weight) for c in action.weighted_clusters] == [("app", 90), ("canary", 10)]
    assert action.total_weight == 100
    assert action.weighted_clusters[1].request_headers.add[0].name == "x-canary"
    assert action.mirror_policies == (MirrorPolicy("shadow", FractionalPercent(5, 10_000)),)


def test_runtime_fraction_on_the_match() -> None:
    route = {
        "match": {
            "prefix": "/",
            "runtime_fraction": {
                "default_value": {"numerator": 150, "denominator": "HUNDRED"},
                "runtime_key": "k",
            },
        },
        "route": {"cluster": "app"},
    }
    # Envoy clamps a numerator above its denominator.
    assert compiled_vhost(route).routes[0].match.runtime_fraction == FractionalPercent(100, 100)


def test_per_filter_configs_compile_by_type() -> None:
    fault = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "abort": {"http_status": 503, "percentage": {"numerator": 1}},
    }
    limit = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "r",
        "token_bucket": {"max_tokens": 1, "fill_interval": "1s"},
    }
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "app"},
        "typed_per_filter_config": {"envoy.filters.http.fault": fault, "rl": limit},
    }
    per_filter = compiled_vhost(route).routes[0].per_filter_config
    assert isinstance(per_filter["envoy.filters.http.fault"], FaultConfig)
    assert isinstance(per_filter["rl"], LocalRateLimitConfig)


@pytest.mark.parametrize(
    ("route_action", "path", "message"),
    [
        (
            {"cluster": "app", "retry_policy": {"retry_on": "5xx,bogus"}},
            "route.retry_policy.retry_on",
            "'bogus'",
        ),
        (
            {"cluster": "app", "retry_policy": {"retry_on": "unavailable"}},
            "route.retry_policy.retry_on",
            "gRPC retry condition 'unavailable' is not supported yet",
        ),
        (
            {
                "cluster": "app",
                "retry_policy": {
                    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.omit_canary_hosts"}]
                },
            },
            "route.retry_policy.retry_host_predicate[0].name",
            "omit_canary_hosts",
        ),
        (
            {
                "cluster": "app",
                "retry_policy": {"retry_back_off": {"base_interval": "1s", "max_interval": "0.5s"}},
            },
            "route.retry_policy.retry_back_off.max_interval",
            "must not be less than base_interval",
        ),
        (
            {"weighted_clusters": {"clusters": [{"name": "app", "weight": 1}], "total_weight": 7}},
            "route.weighted_clusters.total_weight",
            "is 7 but the cluster weights add up to 1",
        ),
        (
            {"weighted_clusters": {"clusters": [{"name": "app", "weight": 1}], "runtime_key_prefix": "rk"}},
            "route.weighted_clusters.runtime_key_prefix",
            "runtime overrides of cluster weights are not supported",
        ),
        (
            {"weighted_clusters": {"clusters": [{"name": "nope", "weight": 1}]}},
            "route.weighted_clusters.clusters[0].name",
            "unknown cluster 'nope'",
        ),
        (
            {"weighted_clusters": {"clusters": [{"name": "app", "weight": 0}]}},
            "route.weighted_clusters.clusters",
            "must be positive",
        ),
        (
            {"cluster": "app", "request_mirror_policies": [{"cluster": "ghost"}]},
            "route.request_mirror_policies[0].cluster",
            "unknown cluster 'ghost'",
        ),
        (
            {"cluster": "app", "request_mirror_policies": [{"cluster": "shadow", "trace_sampled": True}]},
            "route.request_mirror_policies[0].trace_sampled",
            "not supported yet",
        ),
    ],
)
def test_refusals_name_the_field(route_action: dict[str, Any], path: str, message: str) -> None:
    error = refused({"match": {"prefix": "/"}, "route": route_action})
    assert error.path == f"{ROUTES}.routes[0].{path}"
    assert re.search(re.escape(message), error.message), error.message


def test_unknown_per_filter_config_type_is_refused() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "app"},
        "typed_per_filter_config": {
            "envoy.filters.http.buffer": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"
            }
        },
    }
    error = refused(route)
    assert isinstance(error, UnsupportedConfig)
    assert "envoy.extensions.filters.http.buffer.v3.Buffer" in error.message
    assert "typed_per_filter_config" in error.path
