"""``meshlet xds dump`` against a real ADS server: every resource a node gets, as YAML."""

from __future__ import annotations

import asyncio
import sys

import yaml
from ads_helpers import cluster, endpoints, http_listener, route

from meshlet.xds.cache import SnapshotCache
from meshlet.xds.server import start_ads_server
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot


async def run_cli(*args: str) -> tuple[int, str, str]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshlet.cli.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await child.communicate()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_dump_follows_references() -> None:
    cache = SnapshotCache(debounce=0.0)
    cache.set_snapshot("n1", Snapshot.build({
        LISTENER: [http_listener("http", 8080, "r1")],
        ROUTE: [route("r1", "c1"), route("unused", "c1")],
        CLUSTER: [cluster("c1")],
        ENDPOINT: [endpoints("c1", 9001, 9002)],
    }))
    server, port = await start_ads_server(cache)
    try:
        code, out, err = await run_cli("xds", "dump", "--server", f"127.0.0.1:{port}", "--node", "n1")
    finally:
        await server.stop(None)
    assert code == 0, err
    dump = yaml.safe_load(out)
    assert list(dump["listeners"]) == ["http"]
    assert list(dump["routes"]) == ["r1"]  # only what the listener names
    assert list(dump["clusters"]) == ["c1"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in dump["endpoints"]["c1"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [9001, 9002]
    status = cache.node_status("n1")
    assert status is not None and status.synced()


async def test_dump_without_a_server_fails_clearly() -> None:
    code, _, err = await run_cli("xds", "dump", "--server", "127.0.0.1:1", "--node", "n", "--timeout", "0.5")
    assert code == 1
    assert "no answer from 127.0.0.1:1" in err
