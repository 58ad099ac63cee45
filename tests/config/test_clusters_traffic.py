"""Compiling a cluster's traffic settings: LB policies and their configs,
health checks, outlier detection, circuit breakers; refusals with paths."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshlet.config.clusters import compile_cluster
from meshlet.config.loader import parse_resource
from meshlet.config.model import (
    CircuitBreakerThresholds,
    Cluster,
    HealthCheckKind,
    LbPolicy,
    OutlierDetectionConfig,
    SlowStartConfig,
)
from meshlet.errors import ConfigError, UnsupportedConfig

CLUSTER_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

BASE = """
name: svc
type: STATIC
connect_timeout: 1s
load_assignment:
  cluster_name: svc
  endpoints:
  - locality: { region: r1, zone: a }
    load_balancing_weight: 3
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 1001 } } }
  - locality: { region: r1, zone: b }
    load_balancing_weight: 1
    priority: 1
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 1002 } } }
"""


def compile_yaml(extra: str) -> Cluster:
    data: dict[str, Any] = yaml.safe_load(BASE)
    data.update(yaml.safe_load(extra) or {})
    return compile_cluster(parse_resource(CLUSTER_URL, data), "clusters[0]")


def test_defaults_are_envoys() -> None:
    c = compile_yaml("")
    assert c.lb.healthy_panic_threshold == 50.0
    assert c.circuit_breakers.default == CircuitBreakerThresholds(1024, 1024, 1024, 3)
    assert c.health_checks == () and c.outlier_detection is None
    localities = c.load_assignment.localities if c.load_assignment else ()
    assert [(loc.locality, loc.weight, loc.priority) for loc in localities] == [
        ("r1/a", 3, 0),
        ("r1/b", 1, 1),
    ]


@pytest.mark.parametrize(
    "policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"]
)
def test_every_policy_compiles(policy: str) -> None:
    assert compile_yaml(f"lb_policy: {policy}").lb_policy is LbPolicy(policy)


def test_lb_settings() -> None:
    c = compile_yaml("""
lb_policy: LEAST_REQUEST
least_request_lb_config:
  choice_count: 3
  active_request_bias: { default_value: 0.5, runtime_key: unused }
  slow_start_config:
    slow_start_window: 2s
    aggression: { default_value: 2.0, runtime_key: unused }
    min_weight_percent: { value: 20 }
common_lb_config:
  healthy_panic_threshold: { value: 30 }
  locality_weighted_lb_config: {}
""")
    assert (c.lb.choice_count, c.lb.active_request_bias) == (3, 0.5)
    assert c.lb.slow_start == SlowStartConfig(2.0, 2.0, 20.0)
    assert c.lb.healthy_panic_threshold == 30.0 and c.lb.locality_weighted
    ring = compile_yaml("""
lb_policy: RING_HASH
ring_hash_lb_config: { minimum_ring_size: 64, maximum_ring_size: 4096 }
""")
    assert (ring.lb.ring_min_size, ring.lb.ring_max_size) == (64, 4096)
    assert (
        compile_yaml(
            "lb_policy: MAGLEV\nmaglev_lb_config: { table_size: 251 }"
        ).lb.maglev_table_size
        == 251
    )


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        (
            "lb_policy: ROUND_ROBIN\nmaglev_lb_config: {}",
            "clusters[0].maglev_lb_config",
            "MAGLEV",
        ),
        (
            "lb_policy: MAGLEV\nmaglev_lb_config: { table_size: 1000 }",
            "maglev_lb_config.table_size",
            "prime",
        ),
        (
            "lb_policy: RING_HASH\nring_hash_lb_config: { hash_function: MURMUR_HASH_2 }",
            "ring_hash_lb_config.hash_function",
            "MURMUR_HASH_2",
        ),
        (
            "lb_policy: RING_HASH\nring_hash_lb_config: { minimum_ring_size: 100, maximum_ring_size: 10 }",
            "maximum_ring_size",
            "minimum_ring_size",
        ),
        (
            "lb_policy: LEAST_REQUEST\nleast_request_lb_config: { choice_count: 1 }",
            "choice_count",
            "2",
        ),
        (
            "common_lb_config: { zone_aware_lb_config: {} }",
            "common_lb_config.zone_aware_lb_config",
            "not supported",
        ),
        (
            "round_robin_lb_config: { slow_start_config: {} }",
            "slow_start_config.slow_start_window",
            "required",
        ),
    ],
)
def test_lb_refusals(extra: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        compile_yaml(extra)
    assert path in err.value.path


def test_http_and_tcp_health_checks() -> None:
    http = compile_yaml("""
health_checks:
- timeout: 0.5s
  interval: 2s
  unhealthy_interval: 1s
  no_traffic_interval: 3s
  interval_jitter: 0.1s
  unhealthy_threshold: 3
  healthy_threshold: 2
  http_health_check:
    path: /healthz
    host: health.local
    request_headers_to_add: [{ header: { key: X-Probe, value: "1" } }]
    expected_statuses: [{ start: 200, end: 300 }]
""").health_checks[0]
    assert http.kind is HealthCheckKind.HTTP
    assert (
        http.timeout,
        http.interval,
        http.unhealthy_interval,
        http.no_traffic_interval,
    ) == (
        0.5,
        2,
        1,
        3,
    )
    assert (http.unhealthy_threshold, http.healthy_threshold, http.interval_jitter) == (
        3,
        2,
        0.1,
    )
    assert (http.path, http.host, http.request_headers) == (
        "/healthz",
        "health.local",
        (("x-probe", "1"),),
    )
    assert http.expected_statuses == ((200, 300),)
    tcp = compile_yaml("""
health_checks:
- timeout: 1s
  interval: 1s
  unhealthy_threshold: 1
  healthy_threshold: 1
  tcp_health_check:
    send: { text: "50494e47" }
    receive: [{ text: "504f4e47" }]
""").health_checks[0]
    assert (tcp.kind, tcp.send, tcp.receive) == (HealthCheckKind.TCP, b"PING", (b"PONG",))


@pytest.mark.parametrize(
    ("check", "path", "message"),
    [
        (
            "{interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}}",
            "timeout",
            "required",
        ),
        (
            "{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1,"
            " grpc_health_check: {}}",
            "grpc_health_check",
            "not supported",
        ),
        (
            "{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1,"
            " tcp_health_check: {send: {text: zz}}}",
            "send.text",
            "hex",
        ),
        (
            "{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1,"
            " http_health_check: {path: /, expected_statuses: [{start: 300, end: 200}]}}",
            "expected_statuses[0]",
            "range",
        ),
        (
            "{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1}",
            "health_checks[0]",
            "one of",
        ),
    ],
)
def test_health_check_refusals(check: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        compile_yaml(f"health_checks: [{check}]")
    assert path in err.value.path


def test_outlier_detection_and_circuit_breakers() -> None:
    c = compile_yaml("""
outlier_detection:
  consecutive_5xx: 3
  consecutive_gateway_failure: 2
  enforcing_consecutive_gateway_failure: 100
  interval: 0.1s
  base_ejection_time: 0.2s
  max_ejection_time: 1s
  max_ejection_percent: 50
  success_rate_minimum_hosts: 3
  success_rate_request_volume: 10
  success_rate_stdev_factor: 1000
circuit_breakers:
  thresholds:
  - { max_connections: 1, max_pending_requests: 2, max_requests: 3, max_retries: 4, track_remaining: true }
  - { priority: HIGH, max_requests: 10 }
""")
    assert c.outlier_detection == OutlierDetectionConfig(
        consecutive_5xx=3,
        consecutive_gateway_failure=2,
        enforcing_consecutive_gateway_failure=100,
        interval=0.1,
        base_ejection_time=0.2,
        max_ejection_time=1.0,
        max_ejection_percent=50,
        success_rate_minimum_hosts=3,
        success_rate_request_volume=10,
        success_rate_stdev_factor=1000,
    )
    assert c.circuit_breakers.default == CircuitBreakerThresholds(
        1, 2, 3, 4, track_remaining=True
    )
    assert c.circuit_breakers.high == CircuitBreakerThresholds(max_requests=10)


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        (
            "outlier_detection: { max_ejection_percent: 101 }",
            "outlier_detection.max_ejection_percent",
        ),
        (
            "outlier_detection: { failure_percentage_threshold: 5 }",
            "outlier_detection.failure_percentage_threshold",
        ),
        (
            "circuit_breakers: { thresholds: [{ max_requests: 1 }, { max_requests: 2 }] }",
            "circuit_breakers.thresholds[1].priority",
        ),
        (
            "circuit_breakers: { thresholds: [{ retry_budget: {} }] }",
            "circuit_breakers.thresholds[0].retry_budget",
        ),
    ],
)
def test_outlier_and_breaker_refusals(extra: str, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        compile_yaml(extra)
    assert err.value.path.endswith(path)


def test_unsupported_is_named() -> None:
    with pytest.raises(UnsupportedConfig, match="failure_percentage_threshold"):
        compile_yaml("outlier_detection: { failure_percentage_threshold: 5 }")
