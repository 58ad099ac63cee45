"""What every part of one running proxy shares: settings, stats, clusters.

``meshlet.proxy.server.Proxy`` builds one ``ProxyRuntime`` and hands it to
listeners, connection managers and the admin endpoint. Config objects stay
immutable; the runtime is where live state (cluster LB state, pools, drain
flag) lives.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshlet.proxy.observe.stats import StatsStore

if TYPE_CHECKING:
    from meshlet.proxy.upstream.manager import ClusterManager


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Process-wide choices, from the CLI or the bootstrap (CLI wins)."""

    # Default engine for every envoy.transport_sockets.tls socket: "openssl" | "meshlet".
    tls_engine: str = "openssl"
    # Regex engine for safe_regex matchers: "re" | "re2" | "hyperscan".
    regex_engine: str = "re"
    # Bound on graceful drain after SIGTERM / admin /drain_listeners.
    drain_time: float = 5.0


class ProxyRuntime:
    def __init__(self, settings: ProxySettings | None = None, stats: StatsStore | None = None) -> None:
        self.settings = settings or ProxySettings()
        self.stats = stats or StatsStore()
        self.started_at = time.time()
        self.draining = False
        # Set by the Proxy right after construction (upstream owns the type).
        self.clusters: ClusterManager | None = None
        self._next_connection_id = 0
        # The one source of randomness for traffic decisions (weighted
        # clusters, retries' jitter, faults, mirrors): tests seed it.
        self.random = random.Random()

    def next_connection_id(self) -> int:
        self._next_connection_id += 1
        return self._next_connection_id

    def cluster_manager(self) -> ClusterManager:
        if self.clusters is None:
            raise RuntimeError("cluster manager not attached to the proxy runtime")
        return self.clusters
