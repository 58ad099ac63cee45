"""Load balancers, without sockets."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from meshlet.config.model import LbPolicy
from meshlet.proxy.upstream.lb import ClusterLoadBalancer, LeastRequest, RandomLb, RoundRobin


@dataclass(eq=False)
class FakeHost:
    name: str
    weight: int = 1
    healthy: bool = True
    active_requests: int = 0


@dataclass(eq=False)
class PlacedHost(FakeHost):
    priority: int = 0
    locality: str = ""
    locality_weight: int | None = None
    slow_start_since: float | None = None

    @property
    def address_key(self) -> str:
        return self.name


def test_smooth_weighted_round_robin_sequence() -> None:
    a, b, c = FakeHost("a", 5), FakeHost("b", 1), FakeHost("c", 1)
    lb: RoundRobin[FakeHost] = RoundRobin()
    lb.set_hosts([a, b, c])
    picks = [lb.choose() for _ in range(7)]
    assert "".join(h.name for h in picks if h) == "aabacaa"


def test_equal_weights_rotate() -> None:
    hosts = [FakeHost(n) for n in "xyz"]
    lb: RoundRobin[FakeHost] = RoundRobin()
    lb.set_hosts(hosts)
    assert [h.name for h in (lb.choose() for _ in range(6)) if h] == list("xyzxyz")


def test_weighted_distribution_over_many_picks() -> None:
    hosts = [FakeHost("a", 3), FakeHost("b", 1)]
    lb: RoundRobin[FakeHost] = RoundRobin()
    lb.set_hosts(hosts)
    counts = Counter(h.name for h in (lb.choose() for _ in range(400)) if h)
    assert counts == {"a": 300, "b": 100}


def test_unhealthy_hosts_skipped_until_panic() -> None:
    hosts = [PlacedHost("a"), PlacedHost("b", healthy=False), PlacedHost("c")]
    lb: ClusterLoadBalancer[PlacedHost] = ClusterLoadBalancer(LbPolicy.ROUND_ROBIN)
    lb.set_hosts(hosts)
    assert {h.name for h in (lb.choose() for _ in range(6)) if h} == {"a", "c"}
    # Fewer than half healthy: panic mode spreads over every host.
    mostly_down = [PlacedHost("a"), PlacedHost("b", healthy=False), PlacedHost("c", healthy=False)]
    lb.set_hosts(mostly_down)
    assert {h.name for h in (lb.choose() for _ in range(6)) if h} == {"a", "b", "c"}


def test_empty_cluster_has_no_host() -> None:
    for lb in (RoundRobin[FakeHost](), RandomLb[FakeHost](), LeastRequest[FakeHost]()):
        lb.set_hosts([])
        assert lb.choose() is None


def test_least_request_prefers_idle_host() -> None:
    busy, idle = FakeHost("busy", active_requests=10), FakeHost("idle")
    lb: LeastRequest[FakeHost] = LeastRequest(random.Random(1))
    lb.set_hosts([busy, idle])
    assert all(lb.choose() is idle for _ in range(20))


def test_random_respects_weights() -> None:
    lb: RandomLb[FakeHost] = RandomLb(random.Random(7))
    lb.set_hosts([FakeHost("a", 9), FakeHost("b", 1)])
    counts = Counter(h.name for h in (lb.choose() for _ in range(2000)) if h)
    assert counts["a"] > 1600
