"""Load balancers: pick one host of a cluster for a request.

Two layers, as in Envoy:

* leaf balancers pick among a fixed set of eligible hosts: ``RoundRobin``
  (smooth weighted), ``RandomLb``, ``LeastRequest`` (power of N choices, or
  weighted by ``weight / (active + 1) ** bias`` when weights differ),
  ``RingHash`` and ``Maglev`` (``hashing.py``);
* ``ClusterLoadBalancer`` sits above them: it groups hosts by priority,
  spills load from a priority to the next as its health drops (Envoy's
  overprovisioning factor 1.4), applies the panic threshold per priority,
  picks a locality by weight when ``locality_weighted_lb_config`` is on, and
  ramps the weight of new hosts during slow start.

Hosts are anything with the ``HostLike`` attributes, so every policy is
testable without sockets; clock and randomness are injected.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from meshlet.config.model import LbPolicy, LbSettings, SlowStartConfig
from meshlet.errors import UnsupportedConfig
from meshlet.proxy.upstream.hashing import Maglev, RingHash

_DEFAULT_SETTINGS = LbSettings()
# Envoy's default overprovisioning factor: a priority at 72 % health still
# takes all of its load (72 * 1.4 > 100).
OVERPROVISIONING = 1.4


class HostLike(Protocol):
    @property
    def weight(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def active_requests(self) -> int: ...


class ClusterHost(HostLike, Protocol):
    """What ``ClusterLoadBalancer`` needs beyond a leaf: placement and age."""

    @property
    def priority(self) -> int: ...

    @property
    def locality(self) -> str: ...

    @property
    def locality_weight(self) -> int | None: ...

    @property
    def address_key(self) -> str: ...

    @property
    def slow_start_since(self) -> float | None: ...


H = TypeVar("H", bound=HostLike)
C = TypeVar("C", bound=ClusterHost)
WeightOf = Callable[[H], float]


@dataclass(slots=True)
class LbContext:
    """Per-request inputs to host selection.

    ``hash_key`` feeds RING_HASH / MAGLEV (``hashing.compute_hash``);
    ``tried`` holds hosts earlier attempts used, which a retry with the
    previous-hosts predicate avoids for up to ``host_selection_attempts``
    picks; ``attempt`` counts those picks (hash balancers walk on by it)."""

    hash_key: int | None = None
    tried: set[object] = field(default_factory=set)
    host_selection_attempts: int = 1
    attempt: int = 0


def static_weight(host: HostLike) -> float:
    return float(max(host.weight, 1))


class LoadBalancer(ABC, Generic[H]):
    """One leaf balancer's state over a set of eligible hosts."""

    @abstractmethod
    def set_hosts(self, hosts: Sequence[H]) -> None:
        """New eligible set; keeps what state it can across calls."""

    @abstractmethod
    def choose(self, context: LbContext | None = None) -> H | None:
        """A host for the next request, or None when there is none."""


class RoundRobin(LoadBalancer[H]):
    """Smooth weighted round-robin (as nginx): every pick adds each host's
    weight to its running score, takes the highest and subtracts the total.
    Weights 5:1:1 give a a b a c a a, never a burst of five. With equal
    static weights it is a plain rotation (fast path). ``dynamic`` weights
    (slow start) are read again at every pick."""

    def __init__(self, weight_of: WeightOf[H] = static_weight, *, dynamic: bool = False) -> None:
        self._weight_of = weight_of
        self._dynamic = dynamic
        self._hosts: list[H] = []
        self._scores: list[float] = []
        self._weights: list[float] = []
        self._total = 0.0
        self._uniform = True
        self._next = 0

    def set_hosts(self, hosts: Sequence[H]) -> None:
        old = dict(zip((id(h) for h in self._hosts), self._scores))
        self._hosts = list(hosts)
        self._scores = [old.get(id(h), 0.0) for h in self._hosts]
        self._weights = [self._weight_of(h) for h in self._hosts]
        self._uniform = not self._dynamic and len(set(self._weights)) <= 1
        self._total = sum(self._weights)
        if self._hosts:
            self._next %= len(self._hosts)

    def choose(self, context: LbContext | None = None) -> H | None:
        hosts = self._hosts
        if not hosts:
            return None
        if self._uniform:
            host = hosts[self._next]
            self._next = (self._next + 1) % len(hosts)
            return host
        weights = [self._weight_of(h) for h in hosts] if self._dynamic else self._weights
        total = sum(weights) if self._dynamic else self._total
        scores = self._scores
        best = 0
        for i, w in enumerate(weights):
            scores[i] += w
            if scores[i] > scores[best]:
                best = i
        scores[best] -= total
        return hosts[best]


class RandomLb(LoadBalancer[H]):
    """Weighted random choice."""

    def __init__(self, rng: random.Random | None = None, weight_of: WeightOf[H] = static_weight) -> None:
        self._rng = rng or random.Random()
        self._weight_of = weight_of
        self._hosts: list[H] = []
        self._weights: list[float] = []
        self._uniform = True

    def set_hosts(self, hosts: Sequence[H]) -> None:
        self._hosts = list(hosts)
        self._weights = [self._weight_of(h) for h in self._hosts]
        self._uniform = len(set(self._weights)) <= 1

    def choose(self, context: LbContext | None = None) -> H | None:
        if not self._hosts:
            return None
        if self._uniform:
            return self._rng.choice(self._hosts)
        return self._rng.choices(self._hosts, self._weights)[0]


class LeastRequest(LoadBalancer[H]):
    """Envoy's LEAST_REQUEST. Equal weights: of ``choice_count`` random hosts,
    the one with the fewest active requests (power of two choices by
    default). Unequal weights: a smooth weighted pick where each host's
    weight is ``weight / (active + 1) ** active_request_bias``, so load and
    weight both count (bias 0 is plain weighted round-robin)."""

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        choice_count: int = 2,
        active_request_bias: float = 1.0,
        weight_of: WeightOf[H] = static_weight,
        dynamic: bool = False,
    ) -> None:
        self._rng = rng or random.Random()
        self._choices = max(choice_count, 2)
        self._bias = active_request_bias
        self._weight_of = weight_of
        self._dynamic = dynamic
        self._hosts: list[H] = []
        self._weighted = False
        self._scores: list[float] = []

    def set_hosts(self, hosts: Sequence[H]) -> None:
        self._hosts = list(hosts)
        self._scores = [0.0] * len(self._hosts)
        self._weighted = self._dynamic or len({self._weight_of(h) for h in hosts}) > 1

    def choose(self, context: LbContext | None = None) -> H | None:
        hosts = self._hosts
        if len(hosts) <= 1:
            return hosts[0] if hosts else None
        if self._weighted:
            return self._choose_weighted()
        # Distinct candidates: two hosts are always compared with each other.
        candidates = self._rng.sample(hosts, min(self._choices, len(hosts)))
        best = candidates[0]
        for other in candidates[1:]:
            if other.active_requests < best.active_requests:
                best = other
        return best

    def _choose_weighted(self) -> H:
        hosts, scores, bias = self._hosts, self._scores, self._bias
        weights = [self._weight_of(h) / (h.active_requests + 1) ** bias for h in hosts]
        total = sum(weights)
        best = 0
        for i, w in enumerate(weights):
            scores[i] += w
            if scores[i] > scores[best]:
                best = i
        scores[best] -= total
        return hosts[best]


# --------------------------------------------------------------------------- #
# The cluster-level balancer: priorities, panic, localities, slow start
# --------------------------------------------------------------------------- #

def slow_start_factor(cfg: SlowStartConfig, age: float) -> float:
    """Envoy's time factor: ``(age / window) ** (1 / aggression)``, at least
    ``min_weight_percent``; 1 once the window has passed."""
    if age >= cfg.window:
        return 1.0
    floor = cfg.min_weight_percent / 100.0
    ramp: float = (max(age, 0.0) / cfg.window) ** (1.0 / cfg.aggression)
    return max(floor, ramp)


def health_percent(hosts: Sequence[HostLike]) -> float:
    """Healthy share of a host set, overprovisioned and capped at 100."""
    if not hosts:
        return 0.0
    healthy = sum(1 for h in hosts if h.healthy)
    return min(100.0, OVERPROVISIONING * 100.0 * healthy / len(hosts))


def priority_loads(healths: Sequence[float]) -> list[float]:
    """Share of traffic (percent) per priority: each priority takes what its
    health allows and spills the rest to the next; when the total health is
    under 100 the shares are scaled up to sum to 100."""
    if not healths:
        return []
    total = min(100.0, sum(healths))
    if total <= 0:
        return [100.0] + [0.0] * (len(healths) - 1)
    remaining = 100.0
    loads: list[float] = []
    for health in healths:
        share = min(remaining, health * 100.0 / total)
        loads.append(share)
        remaining -= share
    return loads


class _LocalityPicker:
    """Chooses a locality by effective weight (locality weight times its
    overprovisioned health), smooth weighted so the spread is exact."""

    def __init__(self, names: list[str], weights: list[float]) -> None:
        self.names = names
        self._weights = weights
        self._total = sum(weights)
        self._scores = [0.0] * len(names)

    @property
    def empty(self) -> bool:
        return self._total <= 0

    def pick(self) -> int:
        scores = self._scores
        best = 0
        for i, w in enumerate(self._weights):
            scores[i] += w
            if scores[i] > scores[best]:
                best = i
        scores[best] -= self._total
        return best


class _PriorityLevel(Generic[C]):
    """One priority's hosts and the leaf balancer(s) over its eligible ones."""

    def __init__(
        self,
        hosts: list[C],
        make_leaf: Callable[[], LoadBalancer[C]],
        *,
        panic: bool,
        by_locality: bool,
    ) -> None:
        self.hosts = hosts
        self.panic = panic
        eligible = hosts if panic else [h for h in hosts if h.healthy]
        self._picker: _LocalityPicker | None = None
        self._leaves: list[LoadBalancer[C]] = []
        if by_locality:
            self._split_by_locality(eligible, make_leaf)
        if self._picker is None:
            leaf = make_leaf()
            leaf.set_hosts(eligible)
            self._leaves = [leaf]

    def _split_by_locality(self, eligible: list[C], make_leaf: Callable[[], LoadBalancer[C]]) -> None:
        groups: dict[str, list[C]] = {}
        for h in self.hosts:
            groups.setdefault(h.locality, [])
        for h in eligible:
            groups[h.locality].append(h)
        names, weights, leaves = [], [], []
        for name, members in groups.items():
            everyone = [h for h in self.hosts if h.locality == name]
            weight = everyone[0].locality_weight or 0
            share = 1.0 if self.panic else health_percent(everyone) / 100.0
            if weight <= 0 or not members:
                continue
            leaf = make_leaf()
            leaf.set_hosts(members)
            names.append(name)
            weights.append(weight * share)
            leaves.append(leaf)
        picker = _LocalityPicker(names, weights)
        if not picker.empty:
            self._picker, self._leaves = picker, leaves

    def choose(self, context: LbContext | None) -> C | None:
        if self._picker is not None:
            return self._leaves[self._picker.pick()].choose(context)
        return self._leaves[0].choose(context)


class ClusterLoadBalancer(Generic[C]):
    """Priorities, panic threshold, localities and slow start over leaf
    balancers of one policy. ``set_hosts`` is called on every membership or
    health change; ``choose`` per request."""

    def __init__(
        self,
        policy: LbPolicy,
        settings: LbSettings = _DEFAULT_SETTINGS,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_policy(policy)
        self.policy = policy
        self._settings = settings
        self._rng = rng or random.Random()
        self._clock = clock
        self._levels: list[_PriorityLevel[C]] = []
        self._loads: list[float] = []
        self._hashed = policy in (LbPolicy.RING_HASH, LbPolicy.MAGLEV)
        slow = settings.slow_start if policy in (LbPolicy.ROUND_ROBIN, LbPolicy.LEAST_REQUEST) else None
        self._slow_start = slow

    # -- weights ----------------------------------------------------------- #

    def _weight(self, host: C) -> float:
        weight = float(max(host.weight, 1))
        if self._hashed and self._settings.locality_weighted:
            # Hash balancers have no locality step: the locality's weight
            # scales its hosts' share of the ring or table instead.
            weight *= host.locality_weight or 1
        slow = self._slow_start
        if slow is not None and host.slow_start_since is not None:
            weight *= slow_start_factor(slow, self._clock() - host.slow_start_since)
        return weight

    def _make_leaf(self) -> LoadBalancer[C]:
        s, rng, policy = self._settings, self._rng, self.policy
        dynamic = self._slow_start is not None
        if policy is LbPolicy.ROUND_ROBIN:
            return RoundRobin(self._weight, dynamic=dynamic)
        if policy is LbPolicy.LEAST_REQUEST:
            return LeastRequest(
                rng,
                choice_count=s.choice_count,
                active_request_bias=s.active_request_bias,
                weight_of=self._weight,
                dynamic=dynamic,
            )
        if policy is LbPolicy.RANDOM:
            return RandomLb(rng, self._weight)
        if policy is LbPolicy.RING_HASH:
            return _HashLeaf(
                RingHash(
                    self._weight,
                    _address_key,
                    min_size=s.ring_min_size,
                    max_size=s.ring_max_size,
                    rng=rng,
                )
            )
        return _HashLeaf(Maglev(self._weight, _address_key, table_size=s.maglev_table_size, rng=rng))

    # -- membership -------------------------------------------------------- #

    def set_hosts(self, hosts: Sequence[C]) -> None:
        by_priority: dict[int, list[C]] = {}
        for h in hosts:
            by_priority.setdefault(h.priority, []).append(h)
        ordered = [by_priority[p] for p in sorted(by_priority)]
        healths = [health_percent(level) for level in ordered]
        total_health = min(100.0, sum(healths))
        threshold = self._settings.healthy_panic_threshold
        levels: list[_PriorityLevel[C]] = []
        for level_hosts in ordered:
            healthy = sum(1 for h in level_hosts if h.healthy)
            # Panic only when the priorities together cannot carry the load.
            panic = total_health < 100.0 and 100.0 * healthy / len(level_hosts) < threshold
            levels.append(
                _PriorityLevel(
                    level_hosts,
                    self._make_leaf,
                    panic=panic,
                    by_locality=self._settings.locality_weighted and not self._hashed,
                )
            )
        self._levels = levels
        self._loads = priority_loads(healths)

    @property
    def in_panic(self) -> bool:
        return any(level.panic for level in self._levels)

    def choose(self, context: LbContext | None = None) -> C | None:
        levels = self._levels
        if not levels:
            return None
        if len(levels) == 1:
            return levels[0].choose(context)
        return levels[self._pick_priority(context)].choose(context)

    def _pick_priority(self, context: LbContext | None) -> int:
        key = context.hash_key if context is not None else None
        # Hash balancers place a key in a priority by the key itself, so the
        # same key keeps going to the same priority.
        point = (key % 100) if key is not None else self._rng.random() * 100.0
        for i, load in enumerate(self._loads):
            if point < load:
                return i
            point -= load
        return len(self._loads) - 1


class _HashLeaf(LoadBalancer[C]):
    """Adapts a ring or maglev table to the leaf interface."""

    def __init__(self, table: RingHash[C] | Maglev[C]) -> None:
        self.table = table

    def set_hosts(self, hosts: Sequence[C]) -> None:
        self.table.set_hosts(hosts)

    def choose(self, context: LbContext | None = None) -> C | None:
        return self.table.choose(context)


def _address_key(host: ClusterHost) -> str:
    return host.address_key


_SUPPORTED = frozenset(LbPolicy)


def check_policy(policy: LbPolicy, path: str = "lb_policy") -> None:
    if policy not in _SUPPORTED:
        raise UnsupportedConfig(path, f"load balancing policy {policy.value} is not supported")
