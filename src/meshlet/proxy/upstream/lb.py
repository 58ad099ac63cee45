"""Load balancers: pick one host of a cluster for a request.

Each policy is a small class behind ``LoadBalancer``. The cluster calls
``set_hosts`` whenever membership or health changes (DNS refresh, EDS,
health checks) and ``choose`` per request. Hosts are anything with
``weight``, ``healthy`` and ``active_requests`` (``HostLike``), so the
policies are testable without sockets.

As in Envoy, when fewer than ``PANIC_THRESHOLD`` of the hosts are healthy
the balancer ignores health and spreads over all hosts ("panic mode"):
sending to hosts that may be unhealthy beats overloading the few left.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from meshlet.config.model import LbPolicy
from meshlet.errors import UnsupportedConfig

PANIC_THRESHOLD = 0.5


class HostLike(Protocol):
    @property
    def weight(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def active_requests(self) -> int: ...


H = TypeVar("H", bound=HostLike)


def eligible_hosts(hosts: Sequence[H]) -> list[H]:
    """The healthy hosts, or all of them in panic mode."""
    healthy = [h for h in hosts if h.healthy]
    if len(healthy) < PANIC_THRESHOLD * len(hosts):
        return list(hosts)
    return healthy


class LoadBalancer(ABC, Generic[H]):
    """One cluster's balancing state."""

    @abstractmethod
    def set_hosts(self, hosts: Sequence[H]) -> None:
        """New membership or health; keeps what state it can across calls."""

    @abstractmethod
    def choose(self) -> H | None:
        """A host for the next request, or None when the cluster has none."""


class RoundRobin(LoadBalancer[H]):
    """Smooth weighted round-robin (as nginx): every pick adds each host's
    weight to its running score, takes the highest and subtracts the total.
    Weights 5:1:1 give a a b a c a a, never a burst of five. With equal
    weights it is a plain rotation (fast path)."""

    def __init__(self) -> None:
        self._hosts: list[H] = []
        self._scores: list[int] = []
        self._total = 0
        self._uniform = True
        self._next = 0

    def set_hosts(self, hosts: Sequence[H]) -> None:
        old = dict(zip((id(h) for h in self._hosts), self._scores))
        self._hosts = eligible_hosts(hosts)
        self._scores = [old.get(id(h), 0) for h in self._hosts]
        weights = {max(h.weight, 1) for h in self._hosts}
        self._uniform = len(weights) <= 1
        self._total = sum(max(h.weight, 1) for h in self._hosts)
        if self._hosts:
            self._next %= len(self._hosts)

    def choose(self) -> H | None:
        hosts = self._hosts
        if not hosts:
            return None
        if self._uniform:
            host = hosts[self._next]
            self._next = (self._next + 1) % len(hosts)
            return host
        scores = self._scores
        best = 0
        for i, h in enumerate(hosts):
            scores[i] += max(h.weight, 1)
            if scores[i] > scores[best]:
                best = i
        scores[best] -= self._total
        return hosts[best]


class RandomLb(LoadBalancer[H]):
    """Weighted random choice."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._hosts: list[H] = []
        self._weights: list[int] = []

    def set_hosts(self, hosts: Sequence[H]) -> None:
        self._hosts = eligible_hosts(hosts)
        self._weights = [max(h.weight, 1) for h in self._hosts]

    def choose(self) -> H | None:
        if not self._hosts:
            return None
        return self._rng.choices(self._hosts, self._weights)[0]


class LeastRequest(LoadBalancer[H]):
    """Power of two choices: of two random hosts, the one with fewer active
    requests (Envoy's default choice_count of 2)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._hosts: list[H] = []

    def set_hosts(self, hosts: Sequence[H]) -> None:
        self._hosts = eligible_hosts(hosts)

    def choose(self) -> H | None:
        hosts = self._hosts
        if len(hosts) <= 1:
            return hosts[0] if hosts else None
        a, b = self._rng.sample(hosts, 2)
        return a if a.active_requests <= b.active_requests else b


_POLICIES: dict[LbPolicy, Callable[[], LoadBalancer[HostLike]]] = {
    LbPolicy.ROUND_ROBIN: RoundRobin,
    LbPolicy.RANDOM: RandomLb,
    LbPolicy.LEAST_REQUEST: LeastRequest,
}


def supports(policy: LbPolicy) -> bool:
    return policy in _POLICIES


def make_lb(policy: LbPolicy, path: str = "lb_policy") -> LoadBalancer[HostLike]:
    factory = _POLICIES.get(policy)
    if factory is None:
        raise UnsupportedConfig(path, f"load balancing policy {policy.value} is not supported")
    return factory()
