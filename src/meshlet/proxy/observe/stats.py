"""Stats: counters, gauges and latency histograms, cheap on the hot path.

Names follow Envoy's (``cluster.<name>.upstream_rq_total``,
``http.<stat_prefix>.downstream_rq_2xx``, ``listener.<addr>.downstream_cx_total``)
so dashboards built for Envoy read them. Each stat also carries the tag that
was spliced into its name (``envoy_cluster_name`` = ``<name>``), so the
Prometheus rendering can emit ``envoy_cluster_upstream_rq_total{envoy_cluster_name="x"}``
as Envoy does.

Hot-path code looks a stat up once (at config compile / connection set-up)
and then only calls ``inc()`` / ``record()``: plain attribute arithmetic.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# Envoy's default histogram buckets (milliseconds).
DEFAULT_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
    1800000, 3600000,
)


class Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


class Gauge:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def dec(self, n: int = 1) -> None:
        self.value -= n

    def set(self, v: int) -> None:
        self.value = v


class Histogram:
    """Cumulative-bucket histogram in milliseconds, plus sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BUCKETS_MS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: +Inf
        self.count = 0
        self.sum = 0.0

    def record(self, value_ms: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value_ms)] += 1
        self.count += 1
        self.sum += value_ms

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (0..1); 0 when empty."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")

    def cumulative(self) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        running = 0
        for bound, c in zip(self.bounds, self.counts):
            running += c
            out.append((bound, running))
        out.append((float("inf"), self.count))
        return out


@dataclass(frozen=True, slots=True)
class StatKey:
    """``prefix`` and ``suffix`` surround the tag value in the Envoy name:
    ``cluster.`` + ``backend`` + ``.upstream_rq_total``. Untagged stats have
    an empty ``tag_name`` and the whole name in ``suffix``."""

    prefix: str
    tag_name: str
    tag_value: str
    suffix: str

    @property
    def name(self) -> str:
        if not self.tag_name:
            return self.suffix
        return f"{self.prefix}{self.tag_value}.{self.suffix}"

    @property
    def prometheus_name(self) -> str:
        base = f"{self.prefix}{self.suffix}" if self.tag_name else self.suffix
        return "envoy_" + "".join(c if c.isalnum() else "_" for c in base)


class Scope:
    """A view of the store with a fixed prefix and tag, e.g. one cluster's stats."""

    __slots__ = ("_prefix", "_store", "_tag_name", "_tag_value")

    def __init__(self, store: StatsStore, prefix: str, tag_name: str, tag_value: str) -> None:
        self._store = store
        self._prefix = prefix
        self._tag_name = tag_name
        self._tag_value = tag_value

    def _key(self, name: str) -> StatKey:
        return StatKey(self._prefix, self._tag_name, self._tag_value, name)

    def counter(self, name: str) -> Counter:
        return self._store.counter_for(self._key(name))

    def gauge(self, name: str) -> Gauge:
        return self._store.gauge_for(self._key(name))

    def histogram(self, name: str) -> Histogram:
        return self._store.histogram_for(self._key(name))


class StatsStore:
    """All of one proxy's stats. Stats are created on first use and live as
    long as the process (Envoy keeps them across config changes too)."""

    def __init__(self) -> None:
        self.counters: dict[StatKey, Counter] = {}
        self.gauges: dict[StatKey, Gauge] = {}
        self.histograms: dict[StatKey, Histogram] = {}

    def scope(self, prefix: str, tag_name: str = "", tag_value: str = "") -> Scope:
        """``scope("cluster.", "envoy_cluster_name", "backend")``."""
        return Scope(self, prefix, tag_name, tag_value)

    def counter(self, name: str) -> Counter:
        return self.counter_for(StatKey("", "", "", name))

    def gauge(self, name: str) -> Gauge:
        return self.gauge_for(StatKey("", "", "", name))

    def histogram(self, name: str) -> Histogram:
        return self.histogram_for(StatKey("", "", "", name))

    def counter_for(self, key: StatKey) -> Counter:
        c = self.counters.get(key)
        if c is None:
            c = self.counters[key] = Counter()
        return c

    def gauge_for(self, key: StatKey) -> Gauge:
        g = self.gauges.get(key)
        if g is None:
            g = self.gauges[key] = Gauge()
        return g

    def histogram_for(self, key: StatKey) -> Histogram:
        h = self.histograms.get(key)
        if h is None:
            h = self.histograms[key] = Histogram()
        return h

    def value(self, name: str) -> int | None:
        """A counter's or gauge's value by its full Envoy name (tests, admin filters)."""
        for table in (self.counters, self.gauges):
            for key, stat in table.items():
                if key.name == name:
                    return stat.value
        return None
