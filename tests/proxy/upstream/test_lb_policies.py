"""The cluster load balancer without sockets: hashing tables, priorities,
panic, localities, slow start and weighted least-request."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from meshlet.config.model import HashPolicy, HashPolicyKind, LbPolicy, LbSettings, SlowStartConfig
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.upstream.hashing import Maglev, RingHash, compute_hash, xxhash64
from meshlet.proxy.upstream.lb import (
    ClusterLoadBalancer,
    LbContext,
    LeastRequest,
    priority_loads,
    slow_start_factor,
)


@dataclass(eq=False)
class FakeHost:
    name: str
    weight: int = 1
    healthy: bool = True
    active_requests: int = 0
    priority: int = 0
    locality: str = ""
    locality_weight: int | None = None
    slow_start_since: float | None = None

    @property
    def address_key(self) -> str:
        return f"10.0.0.{self.name}:80"


def hosts(n: int, **kw: object) -> list[FakeHost]:
    return [FakeHost(str(i), **kw) for i in range(n)]  # type: ignore[arg-type]


def spread(lb: ClusterLoadBalancer[FakeHost], n: int, context: LbContext | None = None) -> Counter[str]:
    return Counter(h.name for h in (lb.choose(context) for _ in range(n)) if h)


def test_xxhash64_matches_the_reference_vectors() -> None:
    # XXH64 of the empty string and of "abc" with seed 0 (xxHash's test vectors).
    assert xxhash64(b"") == 0xEF46DB3751D8E999
    assert xxhash64("abc") == 0x44BC2CF5AD770999


@pytest.mark.parametrize("policy", [LbPolicy.RING_HASH, LbPolicy.MAGLEV])
def test_hash_policies_are_sticky_and_spread(policy: LbPolicy) -> None:
    lb: ClusterLoadBalancer[FakeHost] = ClusterLoadBalancer(policy, rng=random.Random(1))
    members = hosts(4)
    lb.set_hosts(members)
    owners = {}
    for key in range(4000):
        ctx = LbContext(hash_key=xxhash64(f"user-{key}"))
        first = lb.choose(ctx)
        assert first is not None and all(lb.choose(ctx) is first for _ in range(3))
        owners[key] = first.name
    counts = Counter(owners.values())
    # Four equal hosts: each owns 25 % of keys, within 6 points.
    assert all(abs(c / 4000 - 0.25) < 0.06 for c in counts.values()), counts
    # Removing one host moves its keys (about a quarter) and few others,
    # where modulo hashing would move three quarters. The ring moves a few
    # more: each remaining host gets more points on a ring of the same size
    # (Envoy's sizing rule), which the maglev table does not need.
    lb.set_hosts(members[:3])
    moved = 0
    for key, owner in owners.items():
        now = lb.choose(LbContext(hash_key=xxhash64(f"user-{key}")))
        assert now is not None and now is not members[3]
        moved += now.name != owner
    orphaned = counts[members[3].name]
    extra = 0.15 if policy is LbPolicy.RING_HASH else 0.03
    assert orphaned <= moved < orphaned + extra * 4000


def test_hash_tables_honour_weights() -> None:
    members = [FakeHost("a", weight=1), FakeHost("b", weight=3)]
    for table in (
        RingHash[FakeHost](lambda h: h.weight, lambda h: h.address_key, min_size=1024),
        Maglev[FakeHost](lambda h: h.weight, lambda h: h.address_key, table_size=65537),
    ):
        table.set_hosts(members)
        counts = Counter(
            h.name for h in (table.choose(LbContext(xxhash64(str(k)))) for k in range(8000)) if h
        )
        assert abs(counts["b"] / 8000 - 0.75) < 0.05, counts


def test_ring_size_follows_envoys_rule() -> None:
    ring = RingHash[FakeHost](lambda h: h.weight, lambda h: h.address_key, min_size=100, max_size=1000)
    ring.set_hosts(hosts(3))
    assert ring.size == 102  # 34 points each: ceil(100 / 3) per host
    ring.set_hosts([FakeHost("a", weight=1), FakeHost("b", weight=1000)])
    assert ring.size == 1000  # capped at maximum_ring_size


def test_maglev_refuses_a_non_prime_table() -> None:
    with pytest.raises(ValueError, match="prime"):
        Maglev[FakeHost](lambda h: 1.0, lambda h: h.address_key, table_size=1000)


def test_compute_hash_inputs_and_terminal() -> None:
    head = RequestHead(
        "GET",
        "http",
        "svc",
        "/p?user=alice&x=1",
        [("x-user", "bob"), ("cookie", "a=1; session=s123")],
    )
    header = HashPolicy(HashPolicyKind.HEADER, "x-user")
    cookie = HashPolicy(HashPolicyKind.COOKIE, "session")
    query = HashPolicy(HashPolicyKind.QUERY_PARAMETER, "user")
    missing = HashPolicy(HashPolicyKind.HEADER, "x-none")
    assert compute_hash([header], head, None) == xxhash64("bob")
    assert compute_hash([cookie], head, None) == xxhash64("s123")
    assert compute_hash([query], head, None) == xxhash64("alice")
    assert compute_hash([missing], head, None) is None
    assert compute_hash([], head, None) is None
    both = compute_hash([header, query], head, None)
    assert both is not None and both not in (xxhash64("bob"), xxhash64("alice"))
    terminal = HashPolicy(HashPolicyKind.HEADER, "x-user", terminal=True)
    assert compute_hash([terminal, query], head, None) == xxhash64("bob")
    # Two identical policies do not cancel each other out.
    assert compute_hash([header, header], head, None) not in (0, None)


def test_priority_spill_over_with_overprovisioning() -> None:
    assert priority_loads([100.0, 100.0]) == [100.0, 0.0]
    # P0 at 50 % healthy: 50 * 1.4 = 70 % stays, 30 % spills to P1.
    assert priority_loads([70.0, 100.0]) == pytest.approx([70.0, 30.0])
    # Nothing healthy anywhere: all to P0 (which is then in panic).
    assert priority_loads([0.0, 0.0]) == [100.0, 0.0]


def test_priorities_take_traffic_by_health() -> None:
    p0 = [FakeHost(f"p0-{i}") for i in range(4)]
    p1 = [FakeHost(f"p1-{i}", priority=1) for i in range(2)]
    lb: ClusterLoadBalancer[FakeHost] = ClusterLoadBalancer(LbPolicy.ROUND_ROBIN, rng=random.Random(3))
    lb.set_hosts(p0 + p1)
    assert all(name.startswith("p0") for name in spread(lb, 200))
    p0[0].healthy = p0[1].healthy = False  # 50 % healthy -> 70 % load stays on P0
    lb.set_hosts(p0 + p1)
    counts = spread(lb, 4000)
    on_p1 = sum(c for name, c in counts.items() if name.startswith("p1"))
    assert abs(on_p1 / 4000 - 0.30) < 0.04
    assert counts["p0-0"] == counts["p0-1"] == 0
    assert not lb.in_panic


def test_panic_threshold() -> None:
    members = hosts(4)
    for h in members[:3]:
        h.healthy = False  # 25 % healthy, below the default 50 %
    lb: ClusterLoadBalancer[FakeHost] = ClusterLoadBalancer(LbPolicy.ROUND_ROBIN)
    lb.set_hosts(members)
    assert lb.in_panic
    assert set(spread(lb, 40)) == {"0", "1", "2", "3"}
    calm: ClusterLoadBalancer[FakeHost] = ClusterLoadBalancer(
        LbPolicy.ROUND_ROBIN, LbSettings(healthy_panic_threshold=0)
    )
    calm.set_hosts(members)
    assert not calm.in_panic and set(spread(calm, 40)) == {"3"}


def test_locality_weighted_spread() -> None:
    a = [FakeHost(f"a{i}", locality="z/a", locality_weight=1) for i in range(3)]
    b = [FakeHost("b0", locality="z/b", locality_weight=3)]
    lb: ClusterLoadBalancer[FakeHost] = ClusterLoadBalancer(
        LbPolicy.ROUND_ROBIN, LbSettings(locality_weighted=True)
    )
    lb.set_hosts(a + b)
    counts = spread(lb, 400)
    assert counts["b0"] == 300  # locality weight 3 of 4, though it has one host of four
    assert counts["a0"] + counts["a1"] + counts["a2"] == 100
    # A locality at 1/3 health (x1.4 = 47 %) keeps that share of its weight.
    a[0].healthy = a[1].healthy = False
    lb.set_hosts(a + b)
    counts = spread(lb, 3467)
    assert abs(counts["a2"] / 3467 - 0.4667 / 3.4667) < 0.02


def test_slow_start_ramps_new_hosts() -> None:
    cfg = SlowStartConfig(window=10.0, aggression=1.0, min_weight_percent=10.0)
    assert slow_start_factor(cfg, 0.0) == 0.1
    assert slow_start_factor(cfg, 5.0) == 0.5
    assert slow_start_factor(cfg, 10.0) == 1.0
    assert slow_start_factor(SlowStartConfig(10.0, 2.0, 0.0), 2.5) == pytest.approx(0.5)
    now = [100.0]
    old, new = FakeHost("old"), FakeHost("new", slow_start_since=100.0)
    lb: ClusterLoadBalancer[FakeHost] = ClusterLoadBalancer(
        LbPolicy.ROUND_ROBIN, LbSettings(slow_start=cfg), clock=lambda: now[0]
    )
    lb.set_hosts([old, new])
    assert spread(lb, 1100)["new"] == 100  # 0.1 : 1
    now[0] = 105.0
    assert spread(lb, 1500)["new"] == 500  # 0.5 : 1
    now[0] = 111.0
    assert spread(lb, 1000)["new"] == 500


def test_least_request_weighted_by_active_requests() -> None:
    heavy, light = FakeHost("heavy", weight=3), FakeHost("light", weight=1)
    lr: LeastRequest[FakeHost] = LeastRequest(random.Random(2), weight_of=lambda h: h.weight)
    lr.set_hosts([heavy, light])
    idle = Counter(h.name for h in (lr.choose() for _ in range(400)) if h)
    assert idle == {"heavy": 300, "light": 100}
    heavy.active_requests = 5  # 3 / 6 = 0.5 against 1 / 1
    busy = Counter(h.name for h in (lr.choose() for _ in range(300)) if h)
    assert busy == {"heavy": 100, "light": 200}
    # Bias 0: load is ignored, weights alone decide.
    plain: LeastRequest[FakeHost] = LeastRequest(active_request_bias=0.0, weight_of=lambda h: h.weight)
    plain.set_hosts([heavy, light])
    assert Counter(h.name for h in (plain.choose() for _ in range(400)) if h)["heavy"] == 300


def test_choice_count_widens_the_sample() -> None:
    members = [FakeHost(str(i), active_requests=i) for i in range(10)]
    lr: LeastRequest[FakeHost] = LeastRequest(random.Random(5), choice_count=10)
    lr.set_hosts(members)
    assert all(lr.choose() is members[0] for _ in range(20))
