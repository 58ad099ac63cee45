"""The cluster manager: every cluster of the proxy, swapped atomically.

``update`` takes the whole new cluster set (static bootstrap or CDS): a
cluster whose config is unchanged keeps its live state (hosts, pools, LB
position, DNS task); a changed one is rebuilt and its predecessor drains
(in-flight requests finish on their connections); a removed one drains.
All new clusters are built before any is swapped in, so a bad cluster
rejects the whole update and the old set keeps serving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshlet.config.model import Cluster
from meshlet.errors import ConfigError
from meshlet.proxy.upstream.cluster import ClusterRuntime

if TYPE_CHECKING:
    from meshlet.proxy.runtime import ProxyRuntime


class ClusterManager:
    def __init__(self, runtime: ProxyRuntime) -> None:
        self._runtime = runtime
        self._clusters: dict[str, ClusterRuntime] = {}

    def update(self, clusters: dict[str, Cluster]) -> None:
        """Install ``clusters`` as the full set. Raises ``ConfigError`` (and
        changes nothing) if one cannot be built. Needs a running event loop
        when a cluster resolves DNS in the background."""
        fresh: dict[str, ClusterRuntime] = {}
        for name, cfg in clusters.items():
            old = self._clusters.get(name)
            if old is not None and old.config == cfg:
                fresh[name] = old
                continue
            try:
                fresh[name] = ClusterRuntime(cfg, self._runtime)
            except ConfigError as exc:
                raise exc.under(f"clusters[{name}]") from None
        retired = [c for name, c in self._clusters.items() if fresh.get(name) is not c]
        self._clusters = fresh
        for cluster in fresh.values():
            cluster.start()
        for cluster in retired:
            cluster.drain()

    def get(self, name: str) -> ClusterRuntime | None:
        return self._clusters.get(name)

    def names(self) -> list[str]:
        return sorted(self._clusters)

    def describe(self) -> dict[str, dict[str, object]]:
        """Plain dicts for the admin ``/clusters`` page."""
        return {name: c.describe() for name, c in sorted(self._clusters.items())}

    def close(self) -> None:
        for cluster in self._clusters.values():
            cluster.close()
        self._clusters = {}
