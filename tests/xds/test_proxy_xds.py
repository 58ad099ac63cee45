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
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Snapshot

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



async def test_sds_certificates_and_their_rotation(tmp_path: Path, upstreams: dict[str, int]) -> None:
    """A TLS listener whose certificate comes over SDS serves curl, and a new certificate
    pushed later is the one the next handshake presents."""
    import shutil
    import subprocess

    from ads_helpers import tls_listener
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    from certs import make_pki

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    pki = make_pki(tmp_path / "pki")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca_pem)

    def secret(dns: str) -> secret_pb2.Secret:
        issued = pki.issue(dns.replace(".", "-"), dns=[dns])
        s = secret_pb2.Secret(name="server-cert")
        s.tls_certificate.certificate_chain.inline_bytes = issued.cert_pem
        s.tls_certificate.private_key.inline_bytes = issued.key_pem
        return s

    ads_port, admin_port, listen_port = free_port(), free_port(), free_port()

    def tls_snapshot(dns: str) -> Snapshot:
        return Snapshot.build({
            LISTENER: [tls_listener("https", listen_port, "routes", "server-cert")],
            ROUTE: [route("routes", "svc-a")],
            CLUSTER: [cluster("svc-a")],
            ENDPOINT: [endpoints("svc-a", upstreams["svc-a"])],
            SECRET: [secret(dns)],
        })

    def curl(host: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "3", "--cacert", str(ca),
             "--resolve", f"{host}:{listen_port}:127.0.0.1", f"https://{host}:{listen_port}/"],
            capture_output=True, text=True, timeout=10, check=False,
        )

    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    cache.set_snapshot(NODE, tls_snapshot("one.mesh"))
    server, _ = await start_ads_server(cache, f"127.0.0.1:{ads_port}")
    proxy = ProxyProcess(tmp_path, dynamic_bootstrap(NODE, ads_port, admin_port)).start()
    try:
        await proxy.wait_ready()
        first = await asyncio.to_thread(curl, "one.mesh")
        assert first.returncode == 0 and first.stdout == "A", first.stderr
        cache.set_snapshot(NODE, tls_snapshot("two.mesh"))

        async def rotated() -> bool:
            result = await asyncio.to_thread(curl, "two.mesh")
            return result.returncode == 0 and result.stdout == "A"

        await eventually(rotated, "certificate rotation over SDS")
        assert (await asyncio.to_thread(curl, "one.mesh")).returncode != 0  # the old name is gone
        code, dump = await proxy.admin("/config_dump")
        assert code == 200 and "dynamic_active_secrets" in dump and "BEGIN EC PRIVATE KEY" not in dump
    except BaseException:
        print(proxy.log())
        raise
    finally:
        proxy.stop()
        await server.stop(None)
