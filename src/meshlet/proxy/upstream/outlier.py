"""Outlier detection: passive health from real traffic (Envoy's algorithm).

Every response (or the 5xx the proxy made for a failed attempt) is recorded
against its host. Consecutive-failure detectors eject inline: ``consecutive_5xx``
counts any 5xx, ``consecutive_gateway_failure`` counts 502/503/504; a success
resets both. Success-rate ejection runs at each ``interval`` sweep: among
hosts with at least ``success_rate_request_volume`` requests in the interval
(and only when there are ``success_rate_minimum_hosts`` of them), a host whose
success rate is below ``mean - stdev_factor/1000 * stdev`` is an outlier.

A detected outlier is ejected with probability ``enforcing_*`` percent, and
only while ejected hosts (counting this one) stay within
``max_ejection_percent`` of the cluster (``always_eject_one_host`` allows one
regardless). It stays out for ``base_ejection_time * n`` (capped by
``max_ejection_time``), where n counts its ejections; the sweep re-admits it
when that time has passed. Once a re-admitted host has stayed in service
for ``base_ejection_time``, each further sweep lowers n by one again.

The detector is sans-IO apart from its sweep timer: clock and randomness
are injected; ``sweep`` can be driven directly in tests.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from meshlet.config.model import OutlierDetectionConfig
from meshlet.proxy.observe.stats import Counter, Scope

_GATEWAY_FAILURES = frozenset({502, 503, 504})

CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
SUCCESS_RATE = "success_rate"


class OutlierState:
    """One host's outlier bookkeeping (lives on the host)."""

    __slots__ = (
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected",
        "ejected_at",
        "ejections",
        "interval_requests",
        "interval_successes",
        "unejected_at",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.interval_requests = 0
        self.interval_successes = 0
        self.ejected = False
        self.ejected_at = 0.0
        self.unejected_at: float | None = None
        self.ejections = 0  # the ejection-time multiplier

    def reset_consecutive(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0


class _Stats:
    def __init__(self, scope: Scope) -> None:
        p = "outlier_detection."
        self.ejections_active = scope.gauge(p + "ejections_active")
        self.ejections_enforced_total = scope.counter(p + "ejections_enforced_total")
        self.ejections_overflow = scope.counter(p + "ejections_overflow")
        self.detected: dict[str, Counter] = {}
        self.enforced: dict[str, Counter] = {}
        for kind in (CONSECUTIVE_5XX, CONSECUTIVE_GATEWAY_FAILURE, SUCCESS_RATE):
            self.detected[kind] = scope.counter(f"{p}ejections_detected_{kind}")
            self.enforced[kind] = scope.counter(f"{p}ejections_enforced_{kind}")


class OutlierHost(Protocol):
    """A host as the detector sees it: anything carrying an ``OutlierState``."""

    @property
    def outlier(self) -> OutlierState: ...


HostT = TypeVar("HostT", bound=OutlierHost)


class OutlierDetector(Generic[HostT]):
    def __init__(
        self,
        config: OutlierDetectionConfig,
        scope: Scope,
        on_change: Callable[[HostT], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._stats = _Stats(scope)
        self._on_change = on_change
        self._clock = clock
        self._rng = rng or random.Random()
        self._hosts: list[HostT] = []
        self._task: asyncio.Task[None] | None = None

    # -- membership and timer --------------------------------------------- #

    def set_hosts(self, hosts: Sequence[HostT]) -> None:
        self._hosts = list(hosts)
        self._publish_active()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval)
            self.sweep()

    # -- results ------------------------------------------------------------ #

    def record(self, host: HostT, status: int) -> None:
        state = host.outlier
        state.interval_requests += 1
        if status < 500:
            state.interval_successes += 1
            state.reset_consecutive()
            return
        if state.ejected:
            return
        cfg = self.config
        state.consecutive_5xx += 1
        if status in _GATEWAY_FAILURES:
            state.consecutive_gateway += 1
            if state.consecutive_gateway == cfg.consecutive_gateway_failure:
                self._detected(
                    host, CONSECUTIVE_GATEWAY_FAILURE, cfg.enforcing_consecutive_gateway_failure
                )
                if state.ejected:
                    return
        else:
            state.consecutive_gateway = 0
        if state.consecutive_5xx == cfg.consecutive_5xx:
            self._detected(host, CONSECUTIVE_5XX, cfg.enforcing_consecutive_5xx)

    def _detected(self, host: HostT, kind: str, enforcing_percent: int) -> None:
        self._stats.detected[kind].inc()
        if self._rng.random() * 100.0 >= enforcing_percent:
            return
        if not self._may_eject():
            self._stats.ejections_overflow.inc()
            return
        self._eject(host, kind)

    def _may_eject(self) -> bool:
        total = len(self._hosts)
        if total == 0:
            return False
        active = sum(1 for h in self._hosts if h.outlier.ejected)
        if self.config.always_eject_one_host and active == 0:
            return True
        return 100.0 * (active + 1) / total <= self.config.max_ejection_percent

    def _eject(self, host: HostT, kind: str) -> None:
        state = host.outlier
        state.ejected = True
        state.ejected_at = self._clock()
        # The multiplier stops growing once it reaches max_ejection_time.
        if self.config.base_ejection_time * state.ejections < self.config.max_ejection_time:
            state.ejections += 1
        state.ejections = max(state.ejections, 1)
        state.reset_consecutive()
        self._stats.enforced[kind].inc()
        self._stats.ejections_enforced_total.inc()
        self._publish_active()
        self._on_change(host)

    def ejection_time(self, state: OutlierState) -> float:
        cfg = self.config
        return min(
            cfg.base_ejection_time * state.ejections, max(cfg.max_ejection_time, cfg.base_ejection_time)
        )

    # -- the interval sweep ------------------------------------------------- #

    def sweep(self) -> None:
        """Re-admit hosts whose ejection time is over, age ejection
        multipliers of hosts in service, run success-rate detection, and
        start a new interval."""
        now = self._clock()
        for host in self._hosts:
            state = host.outlier
            if state.ejected:
                if now - state.ejected_at >= self.ejection_time(state):
                    self._uneject(host)
            elif state.ejections > 0 and self._served_base_time(state, now):
                state.ejections -= 1
        self._success_rate()
        for host in self._hosts:
            host.outlier.interval_requests = 0
            host.outlier.interval_successes = 0

    def _served_base_time(self, state: OutlierState, now: float) -> bool:
        since = state.unejected_at
        return since is None or now - since >= self.config.base_ejection_time

    def _uneject(self, host: HostT) -> None:
        state = host.outlier
        state.ejected = False
        state.unejected_at = self._clock()
        state.reset_consecutive()
        self._publish_active()
        self._on_change(host)

    def _success_rate(self) -> None:
        cfg = self.config
        volume = cfg.success_rate_request_volume
        candidates = [
            h for h in self._hosts if not h.outlier.ejected and h.outlier.interval_requests >= volume
        ]
        if len(candidates) < cfg.success_rate_minimum_hosts or not candidates:
            return
        rates = [100.0 * h.outlier.interval_successes / h.outlier.interval_requests for h in candidates]
        mean = sum(rates) / len(rates)
        stdev = math.sqrt(sum((r - mean) ** 2 for r in rates) / len(rates))
        threshold = mean - (cfg.success_rate_stdev_factor / 1000.0) * stdev
        for host, rate in zip(candidates, rates):
            if rate < threshold:
                self._detected(host, SUCCESS_RATE, cfg.enforcing_success_rate)

    def _publish_active(self) -> None:
        self._stats.ejections_active.set(sum(1 for h in self._hosts if h.outlier.ejected))
