"""The admin endpoint, over loopback, with a running proxy behind it."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_harness import Upstream, write_bootstrap

from certs import make_pki
from meshlet.config.compiler import load_proxy_config
from meshlet.proxy.runtime import ProxySettings
from meshlet.proxy.server import Proxy


class Running:
    def __init__(self, proxy: Proxy, upstream: Upstream, ca: Path) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.ca = ca
        addr = proxy.admin_address
        assert addr is not None
        self.admin = f"http://127.0.0.1:{addr[1]}"
        web = proxy.listeners.address("web")
        assert web is not None
        self.web = f"https://localhost:{web[1]}"


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    pki = make_pki(tmp_path / "pki")
    async with Upstream() as upstream:
        path = write_bootstrap(
            tmp_path, listener_port=0, upstream_port=upstream.port, admin_port=0,
            tls_cert_pem=pki.server.cert_pem.decode(), tls_key_pem=pki.server.key_pem.decode(),
        )
        proxy = Proxy(ProxySettings(drain_time=2.0), admin_port=0)
        try:
            await proxy.apply(load_proxy_config(str(path)))
            await proxy.start()
            yield Running(proxy, upstream, pki.ca_cert)
        finally:
            await proxy.stop()


async def traffic(r: Running) -> None:
    ctx = ssl.create_default_context(cafile=str(r.ca))
    async with httpx.AsyncClient(verify=ctx, timeout=5) as client:
        assert (await client.get(r.web + "/hello")).text == "v1"
        assert (await client.get(r.web + "/x")).status_code == 200


async def get(r: Running, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.request(method, r.admin + path)


async def test_ready_live_then_draining(running: Running) -> None:
    resp = await get(running, "/ready")
    assert (resp.status_code, resp.text) == (200, "LIVE\n")
    resp = await get(running, "/drain_listeners?graceful", "POST")
    assert resp.status_code == 200
    resp = await get(running, "/ready")
    assert (resp.status_code, resp.text) == (503, "DRAINING\n")


async def test_stats_text_filter_and_json(running: Running) -> None:
    await traffic(running)
    text = (await get(running, "/stats")).text
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert lines["listener.127.0.0.1_0.downstream_cx_total"] == "1"
    assert lines["listener.127.0.0.1_0.ssl.handshake"] == "1"
    assert int(lines["cluster.backend.upstream_rq_total"]) >= 1
    assert lines["server.live"] == "1"
    assert int(lines["server.uptime"]) >= 0
    assert int(lines["server.total_connections"]) >= 0
    filtered = (await get(running, "/stats?filter=^listener\\.")).text.splitlines()
    assert filtered and all(line.startswith("listener.") for line in filtered)
    data = (await get(running, "/stats?format=json")).json()
    names = {s["name"]: s["value"] for s in data["stats"] if "name" in s}
    assert names["listener.127.0.0.1_0.downstream_cx_total"] == 1
    assert data["stats"][-1]["histograms"]["supported_quantiles"] == [50, 90, 99]
    assert (await get(running, "/stats?filter=(")).status_code == 400


async def test_stats_histogram_summary(running: Running) -> None:
    await traffic(running)
    text = (await get(running, "/stats")).text
    hist = [line for line in text.splitlines() if re.search(r": P50\(", line)]
    assert hist, text


async def test_prometheus(running: Running) -> None:
    await traffic(running)
    for path in ("/stats/prometheus", "/stats?format=prometheus"):
        resp = await get(running, path)
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(resp.text)}
        cx = families["envoy_listener_downstream_cx"]
        assert cx.type == "counter"
        sample = next(s for s in cx.samples if s.labels == {"envoy_listener_address": "127.0.0.1_0"})
        assert sample.value == 1
        histograms = [f for f in families.values() if f.type == "histogram"]
        assert histograms
        base = histograms[0].name
        assert {base + "_bucket", base + "_sum", base + "_count"} <= {s.name for s in histograms[0].samples}


async def test_config_dump_redacts_private_keys(running: Running) -> None:
    resp = await get(running, "/config_dump")
    assert resp.status_code == 200
    assert "PRIVATE KEY" not in resp.text
    types = [c["@type"].rsplit(".", 1)[1] for c in resp.json()["configs"]]
    assert types[:4] == [
        "BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump", "RoutesConfigDump",
    ]
    configs = {c["@type"].rsplit(".", 1)[1]: c for c in resp.json()["configs"]}
    assert configs["ClustersConfigDump"]["static_clusters"][0]["cluster"]["name"] == "backend"
    assert configs["ListenersConfigDump"]["static_listeners"][0]["listener"]["name"] == "web"
    assert configs["RoutesConfigDump"]["static_route_configs"][0]["route_config"]["name"] == "web_routes"
    assert "[redacted]" in resp.text


async def test_clusters_text_and_json(running: Running) -> None:
    await traffic(running)
    port = running.upstream.port
    text = (await get(running, "/clusters")).text
    assert f"backend::127.0.0.1:{port}::health_flags::healthy" in text
    assert re.search(rf"backend::127\.0\.0\.1:{port}::rq_total::[1-9]", text)
    data = (await get(running, "/clusters?format=json")).json()
    status = data["cluster_statuses"][0]
    assert status["name"] == "backend"
    assert status["host_statuses"][0]["address"]["socket_address"]["port_value"] == port


async def test_listeners_and_server_info(running: Running) -> None:
    web = running.proxy.listeners.address("web")
    assert web is not None
    assert (await get(running, "/listeners")).text == f"web::127.0.0.1:{web[1]}\n"
    data = (await get(running, "/listeners?format=json")).json()
    assert data["listener_statuses"][0]["local_address"]["socket_address"]["port_value"] == web[1]
    info = (await get(running, "/server_info")).json()
    assert info["state"] == "LIVE"
    assert info["node"] == {"id": "test-node", "cluster": "test-cluster"}
    assert info["version"].startswith("meshlet/")


async def test_help_404_and_405(running: Running) -> None:
    for path in ("/help", "/"):
        resp = await get(running, path)
        assert resp.status_code == 200 and "/config_dump" in resp.text
    resp = await get(running, "/nope")
    assert resp.status_code == 404 and "/stats/prometheus" in resp.text
    for path in ("/quitquitquit", "/drain_listeners"):
        resp = await get(running, path)
        assert resp.status_code == 405
        assert resp.headers["allow"] == "POST"
    assert running.proxy.state == "LIVE"


async def test_drain_listeners_stops_accepting(running: Running) -> None:
    await traffic(running)
    assert (await get(running, "/drain_listeners", "POST")).status_code == 200
    ctx = ssl.create_default_context(cafile=str(running.ca))
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(verify=ctx, timeout=2) as client:
            await client.get(running.web + "/hello")
    # Not a graceful drain: the server still reports itself live.
    assert (await get(running, "/ready")).status_code == 200


async def test_quitquitquit_stops_the_proxy(running: Running) -> None:
    resp = await get(running, "/quitquitquit", "POST")
    assert (resp.status_code, resp.text) == (200, "OK\n")
    await asyncio.wait_for(running.proxy.wait_stopped(), 5)
    assert running.proxy.state == "TERMINATED"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_ready(running: Running) -> None:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "5", "-w", " %{http_code}", running.admin + "/ready",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert out == b"LIVE\n 200", err
