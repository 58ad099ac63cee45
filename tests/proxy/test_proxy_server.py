"""The Proxy lifecycle: atomic config swaps, drain, SIGTERM in a real process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from proxy_harness import Upstream, free_port, write_bootstrap

from meshlet.config.compiler import load_proxy_config
from meshlet.config.model import ProxyConfig, TlsContext, TransportSocketConfig
from meshlet.errors import ConfigError
from meshlet.proxy.runtime import ProxySettings
from meshlet.proxy.server import Proxy


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream() as up:
        yield up


def compiled(tmp_path: Path, name: str, **kw: object) -> ProxyConfig:
    return load_proxy_config(str(write_bootstrap(tmp_path, name, **kw)))


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    p = Proxy(ProxySettings(drain_time=3.0))
    try:
        yield p
    finally:
        await p.stop()


def web_url(proxy: Proxy, path: str) -> str:
    addr = proxy.listeners.address("web")
    assert addr is not None
    return f"http://127.0.0.1:{addr[1]}{path}"


async def test_apply_start_and_serve(tmp_path: Path, upstream: Upstream, proxy: Proxy) -> None:
    await proxy.apply(compiled(tmp_path, "a.yaml", listener_port=0, upstream_port=upstream.port))
    await proxy.start()
    assert proxy.state == "LIVE"
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(web_url(proxy, "/hello"))
        assert (r.status_code, r.text) == (200, "v1")
        r = await client.get(web_url(proxy, "/some/path"))
        assert (r.status_code, r.text) == (200, "upstream saw /some/path\n")
    assert proxy.runtime.stats.value("listener.127.0.0.1_0.downstream_cx_total") == 1



async def test_shutdown_requested_while_starting_stops_once_started(
    tmp_path: Path, upstream: Upstream, proxy: Proxy
) -> None:
    """A SIGTERM that lands during apply()/start() is not lost: the proxy
    stops right after its listeners come up instead of serving on."""
    proxy.request_shutdown()  # as the signal handler does, before start()
    await proxy.apply(compiled(tmp_path, "a.yaml", listener_port=0, upstream_port=upstream.port))
    await proxy.start()
    await asyncio.wait_for(proxy.wait_stopped(), 10)
    assert proxy.state == "TERMINATED"
    assert proxy.listeners.active_connections == 0

async def test_bad_config_leaves_the_old_one_serving(
    tmp_path: Path, upstream: Upstream, proxy: Proxy
) -> None:
    good = compiled(tmp_path, "a.yaml", listener_port=0, upstream_port=upstream.port)
    await proxy.apply(good)
    await proxy.start()
    web = good.listeners["web"]
    broken_chain = dataclasses.replace(
        web.filter_chains[0],
        transport_socket=TransportSocketConfig("envoy.transport_sockets.tls", TlsContext(server_side=True)),
    )
    bad = dataclasses.replace(
        compiled(tmp_path, "b.yaml", listener_port=0, upstream_port=upstream.port, hello="v2"),
        listeners={"web": dataclasses.replace(web, filter_chains=(broken_chain,))},
    )
    with pytest.raises(ConfigError, match=r"listeners\[web\]\.filter_chains\[0\].*tls_certificates"):
        await proxy.apply(bad)
    assert proxy.config is good
    assert proxy.runtime.stats.value("server.config_update_rejected") == 1
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(web_url(proxy, "/hello"))
        assert r.text == "v1"


async def test_changed_route_for_new_requests_while_in_flight_completes(
    tmp_path: Path, upstream: Upstream, proxy: Proxy
) -> None:
    await proxy.apply(compiled(tmp_path, "a.yaml", listener_port=0, upstream_port=upstream.port))
    await proxy.start()
    async with httpx.AsyncClient(timeout=10) as slow_client, httpx.AsyncClient(timeout=5) as client:
        slow = asyncio.create_task(slow_client.get(web_url(proxy, "/delay/800")))
        async with asyncio.timeout(5):
            while "/delay/800" not in upstream.requests:
                await asyncio.sleep(0.01)
        port_before = proxy.listeners.address("web")
        changed = compiled(tmp_path, "b.yaml", listener_port=0, upstream_port=upstream.port, hello="v2")
        await proxy.apply(changed)
        assert proxy.listeners.address("web") == port_before
        r = await client.get(web_url(proxy, "/hello"))
        assert r.text == "v2"
        done = await asyncio.wait_for(slow, 5)
        assert (done.status_code, done.text) == (200, "upstream saw /delay/800\n")


async def test_drain_refuses_new_and_finishes_in_flight(
    tmp_path: Path, upstream: Upstream, proxy: Proxy
) -> None:
    await proxy.apply(compiled(tmp_path, "a.yaml", listener_port=0, upstream_port=upstream.port))
    await proxy.start()
    url = web_url(proxy, "/delay/500")
    async with httpx.AsyncClient(timeout=10) as client:
        slow = asyncio.create_task(client.get(url))
        async with asyncio.timeout(5):
            while "/delay/500" not in upstream.requests:
                await asyncio.sleep(0.01)
        drain = asyncio.create_task(proxy.drain(5))
        await asyncio.sleep(0.05)
        assert proxy.state == "DRAINING"
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(timeout=2) as fresh:
                await fresh.get(web_url(proxy, "/hello"))
        r = await asyncio.wait_for(slow, 5)
        assert r.status_code == 200
        assert await asyncio.wait_for(drain, 5) is True


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_sigterm_drains_in_flight_then_exits(tmp_path: Path, upstream: Upstream, loop: str) -> None:
    listener_port = free_port()
    config = write_bootstrap(tmp_path, listener_port=listener_port, upstream_port=upstream.port)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshlet.proxy.server", "--config", str(config), "--drain-time", "5",
        "--loop", loop,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )
    try:
        async with asyncio.timeout(8):
            while True:
                try:
                    r = await httpx.AsyncClient(timeout=1).get(f"http://127.0.0.1:{listener_port}/hello")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        assert r.text == "v1"
        async with httpx.AsyncClient(timeout=10) as client:
            slow = asyncio.create_task(client.get(f"http://127.0.0.1:{listener_port}/delay/700"))
            async with asyncio.timeout(5):
                while "/delay/700" not in upstream.requests:
                    await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            with pytest.raises(httpx.ConnectError):
                async with httpx.AsyncClient(timeout=2) as fresh:
                    await fresh.get(f"http://127.0.0.1:{listener_port}/hello")
            r = await asyncio.wait_for(slow, 5)
            assert (r.status_code, r.text) == (200, "upstream saw /delay/700\n")
        assert await asyncio.wait_for(proc.wait(), 6) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert proc.stderr is not None
        stderr = (await proc.stderr.read()).decode()
    assert "Traceback" not in stderr, stderr
