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
    MTLS_STRICT,
    SERVICES,
    SvidIssuer,
    load,
    mesh_identity,
    sidecar_id,
    workload_doc,
)

from meshlet.bench.admin import admin_get
from meshlet.bench.procs import free_port
from meshlet.control.push import ConfigPusher
from meshlet.control.resources import Resource
from meshlet.control.store.sqlite import SqliteStore
from meshlet.control.translate import ProxyNode, node_id
from meshlet.xds.cache import SnapshotCache
from meshlet.xds.server import start_ads_server

HTTP_OPTIONS_URL = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
OUTBOUND = "127.0.31.1"
# The service port bookinfo's services share; not 9080, which a bookinfo run elsewhere
# on the machine may hold on every address.
PORT = free_port()
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


def services() -> str:
    return SERVICES.replace("9080", str(PORT))


def app_workloads(apps: dict[str, App]) -> list[str]:
    """The apps registered directly (no sidecar): the port they serve is their workload port."""
    return [workload_doc(name, app, version, host, port=apps[name].port)
            for name, app, version, host in APPS]


async def reviews_mix(http: httpx.AsyncClient, n: int, **headers: str) -> dict[str, int]:
    mix: dict[str, int] = {}
    for _ in range(n):
        response = await http.get(f"http://{OUTBOUND}:{PORT}/reviews/0",
                                  headers={"host": "reviews", **headers})
        mix[response.text] = mix.get(response.text, 0) + 1
    return mix


async def test_bookinfo_scenarios_route_real_traffic(tmp_path: Path, store: SqliteStore,
                                                    apps: dict[str, App]) -> None:
    name, address = PRODUCTPAGE
    productpage = workload_doc(name, "productpage", "v1", address, port=free_port(),
                               annotations={"meshlet.dev/app-ports": "http=1",
                                            "meshlet.dev/outbound-address": OUTBOUND})
    await put(store, load(services(), productpage, *app_workloads(apps), ALL_V1))
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

            async def jason_split() -> bool:
                # Jason's requests follow the 50/50 split now: none reaches v2. (All six at v1,
                # as this once asked, comes by chance once in 64 tries: the check was flaky.)
                mix = await reviews_mix(http, 6, cookie="user=jason")
                return set(mix) <= {"reviews-v1", "reviews-v3"}

            await eventually(jason_split, "jason's rule replaced", timeout=10)
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
        response = await http.get(f"http://{OUTBOUND}:{PORT}/ratings/0",
                                  headers={"host": "ratings", "end-user": "jason"})
        return response.text == "ratings-v1" and time.monotonic() - started >= 0.39
    await eventually(check, "the ratings delay for jason")
    response = await http.get(f"http://{OUTBOUND}:{PORT}/ratings/0", headers={"host": "ratings"})
    assert response.text == "ratings-v1"


async def test_mtls_strict_between_two_sidecars(tmp_path: Path, store: SqliteStore) -> None:
    """productpage's sidecar -> (mesh mTLS, certificates over SDS) -> reviews' sidecar -> reviews.
    STRICT: reviews' inbound port refuses plaintext, and a client without a mesh certificate."""
    app = await App("reviews-v1", "127.0.0.1").start()
    client_name, client_address = PRODUCTPAGE
    server_name, server_address = "reviews-v1", "127.0.30.3"
    inbound_port = free_port()
    client_node = sidecar_id(client_name, client_address)
    server_node = sidecar_id(server_name, server_address)
    docs = [
        workload_doc(client_name, "productpage", "v1", client_address, port=free_port(),
                     annotations={"meshlet.dev/app-ports": "http=1",
                                  "meshlet.dev/outbound-address": OUTBOUND}),
        workload_doc(server_name, "reviews", "v1", server_address, port=inbound_port,
                     annotations={"meshlet.dev/app-ports": f"http={app.port}",
                                  "meshlet.dev/outbound-address": "127.0.31.3"}),
    ]
    await put(store, load(services(), *docs, ALL_V1, MTLS_STRICT))
    issuer = SvidIssuer()
    identity = mesh_identity(issuer, [ProxyNode.parse(client_node), ProxyNode.parse(server_node)])
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    pusher = ConfigPusher(store, cache, identity=identity, debounce=0.02, max_delay=0.2)
    await pusher.start()
    server, ads_port = await start_ads_server(cache)
    proxies = [Proxy(tmp_path, node, ads_port).start() for node in (client_node, server_node)]
    try:
        for proxy in proxies:
            await proxy.wait_ready()
        async with httpx.AsyncClient(timeout=5.0) as http:

            async def through_mesh() -> bool:
                return await reviews_mix(http, 3) == {"reviews-v1": 3}

            await eventually(through_mesh, "reviews through two sidecars over mTLS")
            with pytest.raises(httpx.HTTPError):
                await http.get(f"http://{server_address}:{inbound_port}/", headers={"host": "reviews"})
        # An independent TLS client (curl): with a mesh certificate it gets through, without one not.
        svid = identity.certificates[client_node]
        (tmp_path / "root.pem").write_bytes(issuer.pem)
        (tmp_path / "svid.pem").write_bytes(svid.chain_pem)
        (tmp_path / "svid-key.pem").write_bytes(svid.private_key_pem or b"")
        url = f"https://{server_address}:{inbound_port}/"
        base = ["curl", "-sS", "--max-time", "5", "-k", "--cacert", str(tmp_path / "root.pem"), url]
        with_cert = await asyncio.to_thread(subprocess.run, [*base, "--cert", str(tmp_path / "svid.pem"),
                                                             "--key", str(tmp_path / "svid-key.pem")],
                                            capture_output=True, timeout=10)
        assert with_cert.stdout == b"reviews-v1", with_cert.stderr
        without = await asyncio.to_thread(subprocess.run, base, capture_output=True, timeout=10)
        assert without.returncode != 0 and without.stdout != b"reviews-v1"
    except BaseException:
        for proxy in proxies:
            print(proxy.log())
        raise
    finally:
        for proxy in proxies:
            proxy.stop()
        await server.stop(None)
        await pusher.stop()
        app.close()


async def test_ingress_gateway_routes_to_productpage(tmp_path: Path, store: SqliteStore) -> None:
    """Gateway + VirtualService bound to it -> the gateway proxy's listener; curl as the client."""
    app = await App("productpage-v1", "127.0.30.1").start()
    gateway_port = free_port()
    gateway = f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bookinfo-gateway}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {gateway_port}, name: http, protocol: HTTP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bookinfo}}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - match:
    - uri: {{exact: /productpage}}
    route:
    - destination: {{host: productpage, port: {{number: {PORT}}}}}
"""
    productpage = workload_doc("productpage-v1", "productpage", "v1", "127.0.30.1", port=app.port)
    await put(store, load(services(), productpage, gateway))
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    pusher = ConfigPusher(store, cache, debounce=0.02, max_delay=0.2)
    await pusher.start()
    server, ads_port = await start_ads_server(cache)
    node = node_id("router", "127.0.32.1", "ingressgateway", "istio-system")
    proxy = Proxy(tmp_path, node, ads_port).start()
    try:
        await proxy.wait_ready()

        async def curl(path: str) -> tuple[str, str]:
            done = await asyncio.to_thread(
                subprocess.run, ["curl", "-sS", "--max-time", "3", "-o", "-", "-w", " %{http_code}",
                                 f"http://127.0.32.1:{gateway_port}{path}"], capture_output=True, timeout=10)
            body, _, code = done.stdout.decode().rpartition(" ")
            return body, code

        async def served() -> bool:
            return await curl("/productpage") == ("productpage-v1", "200")

        await eventually(served, "productpage through the ingress gateway")
        assert (await curl("/admin"))[1] == "404"
    except BaseException:
        print(proxy.log())
        raise
    finally:
        proxy.stop()
        await server.stop(None)
        await pusher.stop()
        app.close()
