"""Consistent hashing: the request's hash key and the RING_HASH / MAGLEV tables.

``compute_hash`` turns a route's hash policies into one 64-bit key, the way
Envoy's ``HashPolicyImpl`` does: each policy that yields a value is folded in
with a one-bit rotation (so two equal policies do not cancel out), and a
``terminal`` policy that produced a key stops the walk.

Hashes are xxHash64 (seed 0), as in Envoy, from the ``xxhash`` package, so a
header value lands on the same ring point as it would in Envoy for the same
host addresses.

``RingHash`` and ``Maglev`` are leaf balancers: they are built from a fixed
host list with weights and pick by key in O(log n) and O(1).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Generic, TypeVar
from urllib.parse import parse_qsl

import xxhash

from meshlet.config.model import HashPolicy, HashPolicyKind
from meshlet.proxy.http.stream import RequestHead

if TYPE_CHECKING:
    from meshlet.proxy.observe.access_log import StreamInfo
    from meshlet.proxy.upstream.lb import LbContext

_MASK64 = (1 << 64) - 1

H = TypeVar("H")


def xxhash64(data: str | bytes, seed: int = 0) -> int:
    raw = data.encode() if isinstance(data, str) else data
    return int(xxhash.xxh64_intdigest(raw, seed))


def _fold(current: int | None, new: int) -> int:
    if current is None:
        return new
    rotated = ((current << 1) | (current >> 63)) & _MASK64
    return rotated ^ new


def _header_values(head: RequestHead, name: str) -> list[str]:
    if name == ":authority" or name == "host":
        return [head.authority]
    if name == ":path":
        return [head.path]
    if name == ":method":
        return [head.method]
    return [v for k, v in head.headers if k == name]


def _cookie(head: RequestHead, name: str) -> str | None:
    for key, value in head.headers:
        if key != "cookie":
            continue
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(value)
        except CookieError:
            continue
        morsel = jar.get(name)
        if morsel is not None:
            return morsel.value
    return None


def _query_parameter(path: str, name: str) -> str | None:
    _, sep, query = path.partition("?")
    if not sep:
        return None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value
    return None


def policy_hash(policy: HashPolicy, head: RequestHead, source_ip: str | None) -> int | None:
    """One policy's key, or None when the request lacks its input."""
    kind = policy.kind
    if kind is HashPolicyKind.HEADER:
        values = _header_values(head, policy.name)
        if not values:
            return None
        # Several values of one header hash as one (Envoy hashes them in order).
        result: int | None = None
        for value in values:
            result = _fold(result, xxhash64(value))
        return result
    if kind is HashPolicyKind.COOKIE:
        cookie = _cookie(head, policy.name)
        return None if cookie is None else xxhash64(cookie)
    if kind is HashPolicyKind.SOURCE_IP:
        return None if not source_ip else xxhash64(source_ip)
    parameter = _query_parameter(head.path, policy.name)
    return None if parameter is None else xxhash64(parameter)


def compute_hash(
    policies: Sequence[HashPolicy], head: RequestHead, info: StreamInfo | None
) -> int | None:
    """The request's consistent-hash key for ``policies``; None when no policy
    applies (the balancer then picks at random)."""
    if not policies:
        return None
    source_ip = info.connection.peer[0] if info is not None else None
    result: int | None = None
    for policy in policies:
        new = policy_hash(policy, head, source_ip)
        if new is not None:
            result = _fold(result, new)
        if policy.terminal and result is not None:
            break
    return result


# --------------------------------------------------------------------------- #
# Leaf balancers
# --------------------------------------------------------------------------- #

WeightOf = Callable[[H], float]


def _normalized(weights: Sequence[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


class RingHash(Generic[H]):
    """Ketama-style ring as Envoy's RING_HASH: every host gets points in
    proportion to its weight, each point the xxHash64 of ``"<address>_<i>"``;
    a key goes to the first point at or after it (wrapping around).

    The ring size is the smallest multiple of the weights that gives the
    lightest host at least ``min_size * its share`` points, capped at
    ``max_size`` (Envoy's sizing rule)."""

    def __init__(
        self,
        weight_of: WeightOf[H],
        key_of: Callable[[H], str],
        *,
        min_size: int = 1024,
        max_size: int = 8 * 1024 * 1024,
        rng: random.Random | None = None,
    ) -> None:
        self._weight_of = weight_of
        self._key_of = key_of
        self._min_size = min_size
        self._max_size = max_size
        self._rng = rng or random.Random()
        self._points: list[int] = []
        self._owners: list[H] = []

    @property
    def size(self) -> int:
        return len(self._points)

    def set_hosts(self, hosts: Sequence[H]) -> None:
        if not hosts:
            self._points, self._owners = [], []
            return
        shares = _normalized([max(self._weight_of(h), 1e-9) for h in hosts])
        lightest = min(shares)
        scale = min(math.ceil(lightest * self._min_size) / lightest, float(self._max_size))
        entries: list[tuple[int, int]] = []
        target = 0.0
        placed = 0
        for index, (host, share) in enumerate(zip(hosts, shares)):
            # A running target keeps the total at ``scale`` despite rounding.
            target += scale * share
            count = math.floor(target) - placed
            placed += count
            prefix = self._key_of(host) + "_"
            entries.extend((xxhash64(prefix + str(i)), index) for i in range(count))
        entries.sort()
        self._points = [point for point, _ in entries]
        self._owners = [hosts[index] for _, index in entries]

    def choose(self, context: LbContext | None = None) -> H | None:
        if not self._points:
            return None
        key = context.hash_key if context is not None else None
        if key is None:
            key = self._rng.getrandbits(64)
        i = bisect.bisect_left(self._points, key)
        # A retry that must avoid earlier hosts walks on along the ring.
        attempt = context.attempt if context is not None else 0
        return self._owners[(i + attempt) % len(self._points)]


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


class Maglev(Generic[H]):
    """Maglev lookup table (Eisenbud et al., 2016) as Envoy builds it: each
    host walks its own permutation of the table (offset and skip from two
    xxHash64 seeds of its address) and claims the next free slot in turn;
    weights are honoured by letting a host take a turn only when its
    accumulated weight allows it. A key picks ``table[key % size]``."""

    def __init__(
        self,
        weight_of: WeightOf[H],
        key_of: Callable[[H], str],
        *,
        table_size: int = 65537,
        rng: random.Random | None = None,
    ) -> None:
        if not is_prime(table_size):
            raise ValueError(f"maglev table size {table_size} is not prime")
        self._weight_of = weight_of
        self._key_of = key_of
        self._size = table_size
        self._rng = rng or random.Random()
        self._table: list[H] = []

    def set_hosts(self, hosts: Sequence[H]) -> None:
        self._table = self._build(hosts) if hosts else []

    def _build(self, hosts: Sequence[H]) -> list[H]:
        size = self._size
        weights = _normalized([max(self._weight_of(h), 1e-9) for h in hosts])
        heaviest = max(weights)
        keys = [self._key_of(h) for h in hosts]
        skips = [xxhash64(k, 1) % (size - 1) + 1 for k in keys]
        # Each host's current position in its permutation, offset + skip * n.
        positions = [xxhash64(k, 0) % size for k in keys]
        targets = [0.0] * len(hosts)
        slots: list[int] = [-1] * size
        filled = 0
        iteration = 0
        while filled < size:
            for i, weight in enumerate(weights):
                if iteration * weight < targets[i]:
                    continue
                targets[i] += heaviest
                c, skip = positions[i], skips[i]
                while slots[c] >= 0:
                    c = (c + skip) % size
                slots[c] = i
                positions[i] = (c + skip) % size
                filled += 1
                if filled >= size:
                    break
            iteration += 1
        return [hosts[i] for i in slots]

    def choose(self, context: LbContext | None = None) -> H | None:
        table = self._table
        if not table:
            return None
        key = context.hash_key if context is not None else None
        if key is None:
            key = self._rng.getrandbits(64)
        attempt = context.attempt if context is not None else 0
        return table[(key + attempt) % self._size]
