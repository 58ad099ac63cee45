"""Simulated proxies on real ADS streams (the control-plane benchmark's load)."""

from __future__ import annotations

from ads_helpers import cluster, endpoints

from meshlet.xds.cache import SnapshotCache
from meshlet.xds.loadgen import Fleet
from meshlet.xds.server import start_ads_server
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, Snapshot


def snap(port: int) -> Snapshot:
    return Snapshot.build({CLUSTER: [cluster("c")], ENDPOINT: [endpoints("c", port)]})


async def test_fleet_follows_pushes_sotw_and_delta() -> None:
    cache = SnapshotCache(debounce=0.01, max_delay=0.05, group_of=lambda node: "all")
    cache.set_snapshot("all", snap(1))
    server, port = await start_ads_server(cache)
    fleet = Fleet(f"127.0.0.1:{port}", channels=2)
    try:
        for i in range(20):
            fleet.add(f"p{i}", delta=i % 2 == 1)
        assert await fleet.wait_all(ENDPOINT, snap(1).version(ENDPOINT), 10)
        cache.set_snapshot("all", snap(2))
        assert await fleet.wait_all(ENDPOINT, snap(2).version(ENDPOINT), 10)
        assert all(p.error is None for p in fleet.proxies)
        assert await cache.wait_for(lambda: all(s.synced() for s in cache.status()), 5)
        assert sorted(s.protocol for s in cache.status()).count("delta") == 10
    finally:
        await fleet.close()
        await server.stop(None)
