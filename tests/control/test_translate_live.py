"""A real ``meshlet proxy`` subscribed to the control plane (store -> pusher -> ADS)
routes real traffic as bookinfo's scenarios say, to small upstream apps on loopback."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from translate_helpers import (
    ALL_V1,
    FIFTY_FIFTY,
    JASON_V2,
    MIRROR,
    SERVICES,
    load,
    sidecar_id,
    workload_doc,
)

from meshlet.bench.admin import admin_get
from meshlet.bench.procs import free_port
from meshlet.control.push import ConfigPusher
from meshlet.control.resources import Resource
from meshlet.control.store.sqlite import SqliteStore
from meshlet.xds.cache import SnapshotCache
from meshlet.xds.server import start_ads_server

HTTP_OPTIONS_URL = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
OUTBOUND = "127.0.31.1"
PRODUCTPAGE = ("productpage-v1", "127.0.30.1")
APPS = [("reviews-v1", "reviews", "v1", "127.0.30.3"), ("reviews-v2", "reviews", "v2", "127.0.30.4"),
        ("reviews-v3", "reviews", "v3", "127.0.30.5"), ("ratings-v1", "ratings", "v1", "127.0.30.6")]


class App:
    """An HTTP/1.1 app answering every request with its name; it keeps the Host
    headers it saw (mirrored copies arrive with ``-shadow``)."""

    def __init__(self, name: str, host: str) -> None:
        self.name, self.host, self.port = name, host, 0
        self.hosts_seen: list[str] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> App:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = self.name.encode()
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"host:"):
                        self.hosts_seen.append(line[5:].strip().decode())
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def bootstrap(node: str, ads_port: int, admin_port: int) -> dict[str, Any]:
    def addr(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    return {
        "node": {"id": node, "cluster": "bookinfo"},
        "admin": {"address": addr(admin_port)},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}]},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds_cluster", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "xds_cluster",
                                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(ads_port)}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS_URL, "explicit_http_config": {"http2_protocol_options": {}}}},
        }]},
    }


class Proxy:
    """``meshlet proxy`` on an ADS bootstrap, as a child process that ``stop()`` always ends."""

    def __init__(self, workdir: Path, node: str, ads_port: int) -> None:
        self.admin_port = free_port()
        self.config = workdir / f"{node.split('~')[2]}.yaml"
        self.log_path = self.config.with_suffix(".log")
        self.config.write_text(yaml.safe_dump(bootstrap(node, ads_port, self.admin_port)))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proxy:
        argv = [sys.executable, "-m", "meshlet.cli.main", "proxy", "--config", str(self.config)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    async def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"meshlet proxy exited with {self.proc.returncode}:\n{self.log()}")
            status, _ = await asyncio.to_thread(admin_get, self.admin_port, "/ready", 1.0)
            if status == 200:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"meshlet proxy not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


async def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await check()
            if last is True:
                return
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s (last: {last!r})")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "meshlet.db", poll_interval=0.02)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def apps() -> AsyncIterator[dict[str, App]]:
    started = {name: await App(name, host).start() for name, _app, _v, host in APPS}
    try:
        yield started
    finally:
        for app in started.values():
            app.close()


async def put(store: SqliteStore, resources: list[Resource]) -> None:
    for resource in resources:
        await store.put(resource)


def app_workloads(apps: dict[str, App]) -> list[str]:
    """The apps registered directly (no sidecar): the port they serve is their workload port."""
    return [workload_doc(name, app, version, host, port=apps[name].port)
            for name, app, version, host in APPS]


async def reviews_mix(http: httpx.AsyncClient, n: int, **headers: str) -> dict[str, int]:
    mix: dict[str, int] = {}
    for _ in range(n):
        response = await http.get(f"http://{OUTBOUND}:9080/reviews/0", headers={"host": "reviews", **headers})
        mix[response.text] = mix.get(response.text, 0) + 1
    return mix


async def test_bookinfo_scenarios_route_real_traffic(tmp_path: Path, store: SqliteStore,
                                                    apps: dict[str, App]) -> None:
    name, address = PRODUCTPAGE
    productpage = workload_doc(name, "productpage", "v1", address, port=free_port(),
                               annotations={"meshlet.dev/app-ports": "http=1",
                                            "meshlet.dev/outbound-address": OUTBOUND})
    await put(store, load(SERVICES, productpage, *app_workloads(apps), ALL_V1))
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    pusher = ConfigPusher(store, cache, debounce=0.02, max_delay=0.2)
    await pusher.start()
    server, ads_port = await start_ads_server(cache)
    proxy = Proxy(tmp_path, sidecar_id(name, address), ads_port).start()
    try:
        await proxy.wait_ready()
        async with httpx.AsyncClient(timeout=5.0) as http:

            async def only(version: str, **headers: str) -> bool:
                return await reviews_mix(http, 6, **headers) == {f"reviews-{version}": 6}

            await eventually(lambda: only("v1"), "all traffic to reviews v1")

            await put(store, load(JASON_V2))
            await eventually(lambda: only("v2", cookie="session=1;user=jason"), "jason to reviews v2")
            assert await reviews_mix(http, 4, cookie="user=alice") == {"reviews-v1": 4}

            await put(store, load(FIFTY_FIFTY))
            await eventually(lambda: only("v1", cookie="user=jason"), "jason's rule replaced", timeout=10)
            mix = await reviews_mix(http, 60)
            assert set(mix) == {"reviews-v1", "reviews-v3"} and min(mix.values()) >= 10, mix

            await put(store, load(MIRROR))
            await eventually(lambda: only("v1"), "back to v1 with a mirror")
            seen = len(apps["reviews-v2"].hosts_seen)
            await reviews_mix(http, 5)
            await eventually(_async(lambda: len(apps["reviews-v2"].hosts_seen) >= seen + 5),
                             "mirrored copies at reviews v2")
            mirrored = apps["reviews-v2"].hosts_seen[seen:]
            assert all(h.startswith("reviews") and "-shadow" in h for h in mirrored), mirrored

            await put(store, load(_short_delay()))
            await _delayed(http)
        status = cache.node_status(sidecar_id(name, address))
        assert status is not None and status.synced() and not any(
            t.last_nack for t in status.types.values())
    except BaseException:
        print(proxy.log())
        raise
    finally:
        proxy.stop()
        await server.stop(None)
        await pusher.stop()


def _async(check: Callable[[], bool]) -> Callable[[], Any]:
    async def run() -> bool:
        return check()
    return run


def _short_delay() -> str:
    """Bookinfo's ratings delay for jason, 0.4 s instead of 7 s to keep the test short."""
    return """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    fault:
      delay: {percentage: {value: 100.0}, fixedDelay: 400ms}
    route:
    - destination: {host: ratings, subset: v1}
  - route:
    - destination: {host: ratings, subset: v1}
"""


async def _delayed(http: httpx.AsyncClient) -> None:
    """Once the new routes arrive, jason's requests to ratings wait out the delay."""
    async def check() -> bool:
        started = time.monotonic()
        response = await http.get(f"http://{OUTBOUND}:9080/ratings/0",
                                  headers={"host": "ratings", "end-user": "jason"})
        return response.text == "ratings-v1" and time.monotonic() - started >= 0.39
    await eventually(check, "the ratings delay for jason")
    response = await http.get(f"http://{OUTBOUND}:9080/ratings/0", headers={"host": "ratings"})
    assert response.text == "ratings-v1"
