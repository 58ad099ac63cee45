"""A real ``meshlet proxy`` process configured over ADS: traffic, updates, NACKs, control-plane restarts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from ads_helpers import (
    NamedUpstream,
    ProxyProcess,
    cluster,
    dynamic_bootstrap,
    endpoints,
    http_listener,
    route,
)

from meshlet.bench.procs import free_port
from meshlet.xds.cache import SnapshotCache
from meshlet.xds.server import start_ads_server
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot

NODE = "sidecar-1"


def mesh_snapshot(
    listen_port: int, target: str, ports: dict[str, int], *, bad_cluster: bool = False
) -> Snapshot:
    clusters = [cluster(name) for name in ports]
    if bad_cluster:
        broken = cluster("broken")
        broken.lb_policy = broken.CLUSTER_PROVIDED
        clusters.append(broken)
    return Snapshot.build({
        LISTENER: [http_listener("http", listen_port, "routes")],
        ROUTE: [route("routes", target)],
        CLUSTER: clusters,
        ENDPOINT: [endpoints(name, port) for name, port in ports.items()],
    })


async def eventually(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await check() if asyncio.iscoroutinefunction(check) else check()
            if last:
                return
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s (last: {last!r})")


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, int]]:
    async with NamedUpstream("A") as a, NamedUpstream("B") as b:
        yield {"svc-a": a.port, "svc-b": b.port}


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_proxy_follows_ads(tmp_path: Path, upstreams: dict[str, int], delta: bool) -> None:
    ads_port, admin_port, listen_port = free_port(), free_port(), free_port()
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    cache.set_snapshot(NODE, mesh_snapshot(listen_port, "svc-a", upstreams))
    server, _ = await start_ads_server(cache, f"127.0.0.1:{ads_port}")
    proxy = ProxyProcess(tmp_path, dynamic_bootstrap(NODE, ads_port, admin_port, delta=delta)).start()
    url = f"http://127.0.0.1:{listen_port}/"
    try:
        await proxy.wait_ready()
        # A fresh connection per request: a listener update closes idle keep-alive connections.
        no_keepalive = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=2.0, limits=no_keepalive) as http:

            async def answers(name: str) -> Callable[[], object]:
                async def check() -> bool:
                    return (await http.get(url)).text == name
                return check

            # Ready means configured: the proxy waited for its first config over ADS.
            assert (await http.get(url)).text == "A"
            status = cache.node_status(NODE)
            assert status is not None and status.protocol == ("delta" if delta else "sotw")
            assert await cache.wait_for(status.synced, 5)

            # A route change takes effect.
            cache.set_snapshot(NODE, mesh_snapshot(listen_port, "svc-b", upstreams))
            await eventually(await answers("B"), "route change")

            # A resource the proxy cannot run: NACK with its error; the old config keeps serving.
            cache.set_snapshot(NODE, mesh_snapshot(listen_port, "svc-b", upstreams, bad_cluster=True))
            assert await cache.wait_for(lambda: status.types[CLUSTER].last_nack is not None, 10)
            nack = status.types[CLUSTER].last_nack
            assert nack is not None and "lb_policy" in nack.error and "CLUSTER_PROVIDED" in nack.error
            assert (await http.get(url)).text == "B"

            # /config_dump shows the dynamic resources.
            code, body = await proxy.admin("/config_dump")
            assert code == 200
            dump = json.dumps(json.loads(body))
            assert "dynamic_active_clusters" in dump and '"svc-b"' in dump and "dynamic_route_configs" in dump

            # The control plane goes away: the proxy keeps serving its last good config.
            await server.stop(None)
            for _ in range(5):
                assert (await http.get(url)).text == "B"
                await asyncio.sleep(0.05)
            # ...and resyncs with a restarted one.
            fresh = SnapshotCache(debounce=0.01, max_delay=0.05)
            fresh.set_snapshot(NODE, mesh_snapshot(listen_port, "svc-a", upstreams))
            server, _ = await start_ads_server(fresh, f"127.0.0.1:{ads_port}")
            await eventually(await answers("A"), "resync after a control-plane restart", timeout=20.0)
            resynced = fresh.node_status(NODE)
            assert resynced is not None and resynced.connected
    except BaseException:
        print(proxy.log())
        raise
    finally:
        proxy.stop()
        await server.stop(None)

