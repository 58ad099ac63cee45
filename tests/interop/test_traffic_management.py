"""Traffic management end to end, driven by curl: retries across endpoints, weighted
clusters, fault injection and local rate limiting, through the real proxy process."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from interop_helpers import (
    MeshletProcess,
    StartMeshlet,
    address,
    bootstrap,
    cluster,
    hcm,
    listener,
    ports,
    require,
    route,
    run,
)

from meshlet.bench.apps import start_upstream
from meshlet.bench.procs import free_port

pytestmark = pytest.mark.interop

FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
LOCAL_RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"


@pytest.fixture(scope="module")
def named_upstreams() -> Iterator[dict[str, int]]:
    """Two sample apps that say who they are (x-served-by)."""
    started = {name: start_upstream(name=name) for name in ("a", "b")}
    try:
        yield {name: port for name, (_, port) in started.items()}
    finally:
        for child, _ in started.values():
            child.stop()


def curl_many(url: str, n: int, *extra: str) -> list[str]:
    """``n`` requests on one curl process: each line is "<status> <x-served-by>"."""
    require("curl")
    per_url = [arg for _ in range(n) for arg in ("-o", "/dev/null", url)]  # -o binds to one URL
    done = run(["curl", "-sS", "--max-time", "20", *extra, "-w", "%{http_code} %header{x-served-by}\\n",
                *per_url], timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def stats(meshlet: MeshletProcess) -> dict[str, str]:
    _, body = meshlet.admin("/stats")
    return dict(line.split(": ", 1) for line in body.splitlines() if ": " in line)


def test_retries_move_past_a_dead_endpoint(start_meshlet: StartMeshlet,
                                           named_upstreams: dict[str, int]) -> None:
    port, admin = ports(2)
    two_endpoints: dict[str, Any] = cluster("app", named_upstreams["a"], connect_timeout="0.5s")
    endpoints = two_endpoints["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoints.append({"endpoint": {"address": address(free_port())}})  # nothing listens there
    retry = {"retry_on": "connect-failure", "num_retries": 2}
    http = hcm([route("/", retry_policy=retry)])
    config = bootstrap([listener("http", port, [http])], [two_endpoints], admin)
    meshlet = start_meshlet(config)
    lines = curl_many(f"http://127.0.0.1:{port}/", 10)
    assert lines == ["200 a"] * 10
    assert int(stats(meshlet)["cluster.app.upstream_rq_retry"]) >= 1


def test_weighted_clusters_split_traffic(start_meshlet: StartMeshlet,
                                         named_upstreams: dict[str, int]) -> None:
    port, admin = ports(2)
    split = {"weighted_clusters": {"clusters": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}]}}
    routes = [{"match": {"prefix": "/"}, "route": split}]
    clusters = [cluster("a", named_upstreams["a"]), cluster("b", named_upstreams["b"])]
    start_meshlet(bootstrap([listener("http", port, [hcm(routes)])], clusters, admin))
    seen = Counter(line for line in curl_many(f"http://127.0.0.1:{port}/", 60))
    assert set(seen) == {"200 a", "200 b"}  # 60 requests at 50/50: both sides, with near certainty


def test_fault_injection_aborts(start_meshlet: StartMeshlet, upstream_port: int) -> None:
    port, admin = ports(2)
    fault = {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": FAULT,
        "abort": {"http_status": 418, "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
    }}
    http = hcm([route("/")], http_filters=[fault])
    start_meshlet(bootstrap([listener("http", port, [http])], [cluster("app", upstream_port)], admin))
    require("curl")
    done = run(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}/"])
    body, _, status = done.stdout.rpartition("\n")
    assert (status, body) == ("418", "fault filter abort")


def test_local_rate_limit(start_meshlet: StartMeshlet, upstream_port: int) -> None:
    port, admin = ports(2)
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "rl"}
    limiter = {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": LOCAL_RATELIMIT,
        "stat_prefix": "http_local_rate_limiter",
        "token_bucket": {"max_tokens": 3, "tokens_per_fill": 3, "fill_interval": "60s"},
        "filter_enabled": always,
        "filter_enforced": always,
    }}
    http = hcm([route("/")], http_filters=[limiter])
    start_meshlet(bootstrap([listener("http", port, [http])], [cluster("app", upstream_port)], admin))
    statuses = [line.split()[0] for line in curl_many(f"http://127.0.0.1:{port}/", 5)]
    assert statuses == ["200", "200", "200", "429", "429"]


def test_active_health_checks_steer_around_a_dead_endpoint(start_meshlet: StartMeshlet,
                                                           named_upstreams: dict[str, int]) -> None:
    port, admin = ports(2)
    dead = free_port()
    checked: dict[str, Any] = cluster("app", named_upstreams["a"], connect_timeout="0.5s")
    endpoints = checked["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoints.append({"endpoint": {"address": address(dead)}})
    checked["health_checks"] = [{"timeout": "0.5s", "interval": "0.1s", "unhealthy_threshold": 1,
                                 "healthy_threshold": 1, "http_health_check": {"path": "/status/200"}}]
    meshlet = start_meshlet(bootstrap([listener("http", port, [hcm([route("/")])])], [checked], admin))
    deadline = time.monotonic() + 10
    while True:  # both endpoints start failed (as in Envoy) until their first check
        _, clusters = meshlet.admin("/clusters")
        flags = {line.split("::")[1]: line.rsplit("::", 1)[1] for line in clusters.splitlines()
                 if "::health_flags::" in line}
        if flags.get(f"127.0.0.1:{named_upstreams['a']}") == "healthy":
            break
        assert time.monotonic() < deadline, clusters
        time.sleep(0.1)
    assert "failed_active_hc" in flags[f"127.0.0.1:{dead}"]
    assert curl_many(f"http://127.0.0.1:{port}/", 10) == ["200 a"] * 10  # no retries configured
