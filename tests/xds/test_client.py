"""The ADS client driving an in-process proxy: apply failures NACKed, removals, back-off."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import yaml
from ads_helpers import cluster, dynamic_bootstrap, endpoints, http_listener, route

from meshlet.config.compiler import compile_bootstrap
from meshlet.config.loader import parse_bootstrap_text
from meshlet.proxy.server import Proxy
from meshlet.xds.cache import SnapshotCache
from meshlet.xds.client import AdsClient, Backoff, run_client
from meshlet.xds.server import start_ads_server
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot

NODE = "in-process"


def snapshot(listeners: dict[str, int]) -> Snapshot:
    return Snapshot.build({
        LISTENER: [http_listener(name, port, "r1") for name, port in listeners.items()],
        ROUTE: [route("r1", "c1")],
        CLUSTER: [cluster("c1")],
        ENDPOINT: [endpoints("c1", 9)],
    })


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def running() -> AsyncIterator[tuple[SnapshotCache, Proxy]]:
    cache = SnapshotCache(debounce=0.0)
    server, port = await start_ads_server(cache)
    static = compile_bootstrap(parse_bootstrap_text(yaml.safe_dump(dynamic_bootstrap(NODE, port, 0))))
    proxy = Proxy()
    await proxy.apply(static)
    await proxy.start()
    task = asyncio.ensure_future(run_client(AdsClient(proxy, static)))
    try:
        yield cache, proxy
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await proxy.stop()
        await server.stop(None)


async def until(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_listener_that_cannot_bind_is_nacked_and_removal_unbinds(
    running: tuple[SnapshotCache, Proxy],
) -> None:
    cache, proxy = running
    first, second = free_port(), free_port()
    cache.set_snapshot(NODE, snapshot({"one": first}))
    await until(lambda: proxy.config is not None and "one" in proxy.config.listeners)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cache.set_snapshot(NODE, snapshot({"one": first, "two": busy}))
        status = cache.node_status(NODE)
        assert status is not None
        await until(lambda: status.types[LISTENER].last_nack is not None)
        nack = status.types[LISTENER].last_nack
        assert nack is not None and str(busy) in nack.error, nack
        assert proxy.config is not None and set(proxy.config.listeners) == {"one"}

    # SotW full state: a listener missing from the next response is removed.
    cache.set_snapshot(NODE, snapshot({"three": second}))
    await until(lambda: proxy.config is not None and set(proxy.config.listeners) == {"three"})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", first))  # "one" let go of its port


def test_backoff_grows_jittered_and_capped() -> None:
    backoff = Backoff(base=0.5, cap=4.0, rand=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    low = Backoff(base=0.5, cap=4.0, rand=lambda: 0.0)
    assert low.next_delay() == 0.25
