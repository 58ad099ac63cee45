"""The stats store in the Prometheus text format (admin ``/stats/prometheus``).

Names and labels follow Envoy's Prometheus output: the tag spliced into the
Envoy name becomes a label (``cluster.backend.upstream_rq_total`` →
``envoy_cluster_upstream_rq_total{envoy_cluster_name="backend"}``), and
histograms carry ``_bucket{le=...}``, ``_sum`` and ``_count``. Rendering goes
through ``prometheus_client``'s metric families and ``generate_latest``, so
escaping and formatting are the reference implementation's. One difference
from Envoy follows from that: counter samples always end in ``_total``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from meshlet.proxy.observe.stats import Counter, Gauge, Histogram, StatKey, StatsStore

if TYPE_CHECKING:
    from prometheus_client.core import Metric

# prometheus_client (about 10 MB resident with what it imports: http.server,
# wsgiref, email) is imported on the first render, not by every proxy at start.
# This is its CONTENT_TYPE_LATEST (a test keeps them equal).
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

_Stat = Any  # Counter | Gauge | Histogram, matched to its family's adder


def _labels(key: StatKey) -> dict[str, str]:
    return {key.tag_name: key.tag_value} if key.tag_name else {}


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else format(bound, "g")


class _StoreCollector:
    """A ``prometheus_client`` collector over one ``StatsStore`` snapshot."""

    def __init__(self, store: StatsStore, name_filter: re.Pattern[str] | None) -> None:
        self._store = store
        self._filter = name_filter

    def _wanted(self, key: StatKey) -> bool:
        return self._filter is None or self._filter.search(key.name) is not None

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._store.counters.items(), _counter_family, _add_counter)
        yield from self._families(self._store.gauges.items(), _gauge_family, _add_gauge)
        yield from self._families(self._store.histograms.items(), _histogram_family, _add_histogram)

    def _families(
        self,
        items: Iterable[tuple[StatKey, _Stat]],
        make: Callable[[str], Metric],
        add: Callable[[Metric, StatKey, _Stat], None],
    ) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for key, stat in sorted(items, key=lambda kv: (kv[0].prometheus_name, kv[0].tag_value)):
            if not self._wanted(key):
                continue
            name = key.prometheus_name
            family = families.get(name)
            if family is None:
                family = families[name] = make(name)
            add(family, key, stat)
        yield from families.values()


def _counter_family(name: str) -> Metric:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, name, labels=None)


def _gauge_family(name: str) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, name, labels=None)


def _histogram_family(name: str) -> Metric:
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, name, labels=None)


def _add_counter(family: Metric, key: StatKey, stat: Counter) -> None:
    base = family.name
    family.add_sample(f"{base}_total", _labels(key), stat.value)


def _add_gauge(family: Metric, key: StatKey, stat: Gauge) -> None:
    family.add_sample(family.name, _labels(key), stat.value)


def _add_histogram(family: Metric, key: StatKey, stat: Histogram) -> None:
    labels = _labels(key)
    base = family.name
    for bound, count in stat.cumulative():
        family.add_sample(f"{base}_bucket", {**labels, "le": _le(bound)}, count)
    family.add_sample(f"{base}_count", labels, stat.count)
    family.add_sample(f"{base}_sum", labels, stat.sum)


def render(store: StatsStore, name_filter: re.Pattern[str] | None = None) -> bytes:
    """All stats (optionally only those whose Envoy name matches ``name_filter``)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StoreCollector(store, name_filter))
    return bytes(generate_latest(registry))
