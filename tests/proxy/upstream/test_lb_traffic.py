"""Load balancing under real traffic: requests through a running proxy to
backends on loopback, counted by the backend that answered."""

from __future__ import annotations

import pytest
from upstream_traffic import Backend, backends, bootstrap, endpoints_yaml, running_proxy, spread, wait_for

# Weighted policies: weights 1:3 give the light host 25 % of 2000 requests
# within 5 points (smooth round-robin is exact; random has sigma ~1 point).
WEIGHTED_POLICIES = ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"]


def static_cluster(policy: str, bs: list[Backend], weights: list[int], extra: str = "") -> str:
    return f"""    type: STATIC
    lb_policy: {policy}
{extra}    load_assignment:
      cluster_name: svc
      endpoints:
      - lb_endpoints: {endpoints_yaml(bs, weights)}
"""


@pytest.mark.parametrize("policy", WEIGHTED_POLICIES)
async def test_endpoint_weights(policy: str) -> None:
    async with backends(2) as bs, running_proxy(bootstrap(static_cluster(policy, bs, [1, 3]))) as proxy:
        # One at a time: least-request then sees idle hosts, where its
        # weight / (active + 1) formula is the static weight.
        counts = await spread(proxy, 2000, concurrency=1 if policy == "LEAST_REQUEST" else 8)
    assert sum(counts.values()) == 2000 and set(counts) == {"b0", "b1"}
    assert abs(counts["b0"] / 2000 - 0.25) < 0.05, counts


async def test_round_robin_equal_weights_is_even() -> None:
    async with backends(3) as bs, running_proxy(bootstrap(static_cluster("ROUND_ROBIN", bs, [1, 1, 1]))) as p:
        counts = await spread(p, 600, concurrency=1)
    assert counts == {"b0": 200, "b1": 200, "b2": 200}


async def test_least_request_weights_yield_to_load() -> None:
    """With bias 1 a heavier host that is also busier gets less than its
    weight share; with bias 0 load is ignored."""
    async with backends(2) as bs:
        bs[1].delay = 0.02  # the weight-3 host is slow
        config = static_cluster("LEAST_REQUEST", bs, [1, 3])
        async with running_proxy(bootstrap(config)) as proxy:
            loaded = await spread(proxy, 400, concurrency=8)
        bias0 = "    least_request_lb_config: { active_request_bias: { default_value: 0, runtime_key: b } }\n"
        async with running_proxy(bootstrap(static_cluster("LEAST_REQUEST", bs, [1, 3], bias0))) as proxy:
            weights_only = await spread(proxy, 400, concurrency=8)
    assert loaded["b0"] / 400 > 0.35, loaded
    assert abs(weights_only["b0"] / 400 - 0.25) < 0.05, weights_only


async def test_least_request_prefers_the_less_loaded_host() -> None:
    async with backends(2) as bs:
        bs[0].delay = 0.05  # b0 is slow, so its requests stay active longer
        async with running_proxy(bootstrap(static_cluster("LEAST_REQUEST", bs, [1, 1]))) as proxy:
            counts = await spread(proxy, 400, concurrency=8)
    # Round-robin would split 50/50; two choices send most to the fast host.
    assert counts["b1"] / 400 > 0.75, counts


async def test_locality_weighted_endpoints() -> None:
    async with backends(3) as bs:
        cluster = f"""    type: STATIC
    common_lb_config: {{ locality_weighted_lb_config: {{}} }}
    load_assignment:
      cluster_name: svc
      endpoints:
      - locality: {{ zone: a }}
        load_balancing_weight: 1
        lb_endpoints: {endpoints_yaml(bs[:2])}
      - locality: {{ zone: b }}
        load_balancing_weight: 3
        lb_endpoints: {endpoints_yaml(bs[2:])}
"""
        async with running_proxy(bootstrap(cluster)) as proxy:
            counts = await spread(proxy, 2000)
    # Zone b has one host of three but three quarters of the weight.
    assert abs(counts["b2"] / 2000 - 0.75) < 0.05, counts
    assert abs(counts["b0"] - counts["b1"]) < 0.05 * 2000


async def test_priorities_fail_over_when_p0_is_down() -> None:
    async with backends(2) as bs:
        cluster = f"""    type: STATIC
    health_checks:
    - {{ timeout: 2s, interval: 0.05s, no_traffic_interval: 0.05s, unhealthy_threshold: 1,
        healthy_threshold: 1, http_health_check: {{ path: /healthz }} }}
    load_assignment:
      cluster_name: svc
      endpoints:
      - lb_endpoints: {endpoints_yaml(bs[:1])}
      - priority: 1
        lb_endpoints: {endpoints_yaml(bs[1:])}
"""
        async with running_proxy(bootstrap(cluster)) as proxy:
            assert await spread(proxy, 50) == {"b0": 50}
            cluster_rt = proxy.runtime.cluster_manager().get("svc")
            assert cluster_rt is not None
            bs[0].healthy = False
            await wait_for(lambda: cluster_rt.hosts[0].failed_active_hc)
            # P0 has no healthy host left: all of its load spills to P1.
            assert await spread(proxy, 50) == {"b1": 50}
            bs[0].healthy = True
            await wait_for(lambda: not cluster_rt.hosts[0].failed_active_hc)
            assert await spread(proxy, 50) == {"b0": 50}


async def test_slow_start_ramps_a_host_back_in() -> None:
    """A host that passes its health check again starts at
    min_weight_percent of its weight and ramps up over the window."""
    async with backends(2) as bs:
        cluster = f"""    type: STATIC
    round_robin_lb_config:
      slow_start_config: {{ slow_start_window: 600s, min_weight_percent: {{ value: 10 }} }}
    common_lb_config: {{ healthy_panic_threshold: {{ value: 0 }} }}
    health_checks:
    - {{ timeout: 2s, interval: 0.05s, no_traffic_interval: 0.05s, unhealthy_threshold: 1,
        healthy_threshold: 1, http_health_check: {{ path: /healthz }} }}
    load_assignment:
      cluster_name: svc
      endpoints:
      - lb_endpoints: {endpoints_yaml(bs)}
"""
        async with running_proxy(bootstrap(cluster)) as proxy:
            svc = proxy.runtime.cluster_manager().get("svc")
            assert svc is not None
            # Hosts of the first membership are not ramped.
            assert await spread(proxy, 100) == {"b0": 50, "b1": 50}
            bs[0].healthy = False
            await wait_for(lambda: svc.hosts[0].failed_active_hc)
            bs[0].healthy = True
            await wait_for(lambda: not svc.hosts[0].failed_active_hc)
            counts = await spread(proxy, 1000)
    # Weight 0.1 (the 600 s window barely moves it) against 1: about 9 %.
    assert 0.04 < counts["b0"] / 1000 < 0.16, counts
