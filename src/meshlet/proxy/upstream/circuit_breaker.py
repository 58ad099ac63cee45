"""Circuit breakers: per-cluster, per-priority limits on concurrent work.

Envoy's four resources, each a counter with a ceiling: open connections,
requests waiting for a connection (pending), requests in flight, and retries
in flight. Taking a resource past its ceiling fails at once (no waiting):
the caller answers 503 with ``x-envoy-overloaded: true`` and the matching
overflow counter goes up. Stats use Envoy's names under the cluster scope:
``circuit_breakers.<priority>.{cx,rq_pending,rq,rq_retry}_open`` (1 while
the limit is reached) and, with ``track_remaining``,
``circuit_breakers.<priority>.remaining_{cx,pending,rq,retries}``.
"""

from __future__ import annotations

import weakref
from typing import Protocol

from meshlet.config.model import CircuitBreakers, CircuitBreakerThresholds
from meshlet.proxy.observe.stats import Counter, Gauge, Scope

PRIORITIES = ("DEFAULT", "HIGH")


class Resource:
    """One limited resource: ``try_acquire`` / ``release`` around each use."""

    __slots__ = ("_open", "_overflow", "_remaining", "count", "limit")

    def __init__(
        self, limit: int, open_gauge: Gauge, remaining: Gauge | None, overflow: Counter
    ) -> None:
        self.limit = limit
        self.count = 0
        self._open = open_gauge
        self._remaining = remaining
        self._overflow = overflow
        self._publish()

    def try_acquire(self) -> bool:
        if self.count >= self.limit:
            self._overflow.inc()
            return False
        self.count += 1
        self._publish()
        return True

    def force_acquire(self) -> None:
        """Take the resource even past its limit (see ``ResourceManager.acquire_connection``)."""
        self.count += 1
        self._publish()

    def release(self) -> None:
        if self.count > 0:
            self.count -= 1
            self._publish()

    @property
    def available(self) -> bool:
        return self.count < self.limit

    def _publish(self) -> None:
        # Plain attribute stores: this runs twice per request (acquire, release).
        self._open.value = 1 if self.count >= self.limit else 0
        if self._remaining is not None:
            self._remaining.value = max(self.limit - self.count, 0)


class ConnectionWaiter(Protocol):
    """A pool with requests waiting for a connection slot."""

    @property
    def waiting(self) -> bool: ...

    def wake_one(self) -> None: ...


class ResourceManager:
    """The four resources of one priority of one cluster."""

    def __init__(self, thresholds: CircuitBreakerThresholds, scope: Scope, priority: str) -> None:
        prefix = f"circuit_breakers.{priority.lower()}."
        track = thresholds.track_remaining

        def make(limit: int, open_name: str, remaining_name: str, overflow: str) -> Resource:
            remaining = scope.gauge(prefix + remaining_name) if track else None
            return Resource(limit, scope.gauge(prefix + open_name), remaining, scope.counter(overflow))

        self.thresholds = thresholds
        self.connections = make(
            thresholds.max_connections, "cx_open", "remaining_cx", "upstream_cx_overflow"
        )
        self.pending = make(
            thresholds.max_pending_requests,
            "rq_pending_open",
            "remaining_pending",
            "upstream_rq_pending_overflow",
        )
        # Envoy counts a request refused by max_requests as a pending overflow too.
        self.requests = make(
            thresholds.max_requests, "rq_open", "remaining_rq", "upstream_rq_pending_overflow"
        )
        # Pools sharing the connection limit: a slot freed by one may serve
        # a request queued in another.
        self._pools: weakref.WeakSet[ConnectionWaiter] = weakref.WeakSet()
        self.retries = make(
            thresholds.max_retries, "rq_retry_open", "remaining_retries", "upstream_rq_retry_overflow"
        )

    def try_acquire_request(self) -> bool:
        return self.requests.try_acquire()

    def release_request(self) -> None:
        self.requests.release()

    def try_acquire_pending(self) -> bool:
        return self.pending.try_acquire()

    def release_pending(self) -> None:
        self.pending.release()

    def try_acquire_retry(self) -> bool:
        return self.retries.try_acquire()

    def release_retry(self) -> None:
        self.retries.release()

    def try_acquire_connection(self) -> bool:
        return self.connections.try_acquire()

    def acquire_connection(self, *, pool_is_empty: bool) -> bool:
        """A connection slot for a pool. As Envoy does, a pool without any
        connection always gets one (counted as an overflow when past the
        limit): otherwise other hosts' connections could starve it forever."""
        if self.connections.try_acquire():
            return True
        if pool_is_empty:
            self.connections.force_acquire()
            return True
        return False

    def release_connection(self) -> None:
        self.connections.release()
        for pool in self._pools:
            if pool.waiting:
                pool.wake_one()
                return

    def share_connections_with(self, pool: ConnectionWaiter) -> None:
        self._pools.add(pool)


class CircuitBreakerSet:
    """A cluster's resource managers by priority ("DEFAULT", "HIGH")."""

    def __init__(self, config: CircuitBreakers, scope: Scope) -> None:
        self.default = ResourceManager(config.default, scope, "DEFAULT")
        self.high = ResourceManager(config.high, scope, "HIGH")

    def for_priority(self, priority: str = "DEFAULT") -> ResourceManager:
        return self.high if priority == "HIGH" else self.default
