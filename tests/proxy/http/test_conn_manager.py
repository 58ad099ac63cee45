"""HTTP connection manager + router over real loopback sockets.

The upstream is the sample app (``examples/apps/upstream.py``, httptools,
independent of meshlet's codecs) or a purpose-built asyncio server; the
clients are httpx (h11/h2) and curl.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import httpx
import pytest
import uvloop

from meshlet.config.model import (
    AccessLogConfig,
    AppendAction,
    Cluster,
    ClusterAction,
    ClusterLoadAssignment,
    DirectResponseAction,
    DiscoveryType,
    Endpoint,
    HeaderMutation,
    HeaderValueOption,
    HttpConnectionManagerConfig,
    LocalityEndpoints,
    PathMatchKind,
    RedirectAction,
    Route,
    RouteActionT,
    RouteConfiguration,
    RouteMatch,
    SocketAddress,
    VirtualHost,
)
from meshlet.proxy.http.conn_manager import HttpConnectionManager
from meshlet.proxy.observe.access_log import WRITERS
from meshlet.proxy.runtime import ProxyRuntime
from meshlet.proxy.transport import ConnectionInfo
from meshlet.proxy.upstream.manager import ClusterManager

ROOT = Path(__file__).resolve().parents[3]
CONNECT_FAILURE = (
    b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
)


# Both event loops the proxy runs on: uvloop transports are not asyncio.Transport
# subclasses and differ in EOF and flow-control details.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture')


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


def _load_sample_app() -> ModuleType:
    path = ROOT / "examples/apps/upstream.py"
    spec = importlib.util.spec_from_file_location("meshlet_sample_upstream", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SAMPLE = _load_sample_app()


# --------------------------------------------------------------------------- #
# Wiring
# --------------------------------------------------------------------------- #


class _Accept(asyncio.Protocol):
    """Minimal listener glue: ConnectionInfo from the socket, then the HCM's protocol."""

    def __init__(self, hcm: HttpConnectionManager) -> None:
        self._hcm = hcm

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        info = ConnectionInfo(
            peer=transport.get_extra_info("peername")[:2], local=transport.get_extra_info("sockname")[:2]
        )
        proto = self._hcm.protocol_for(info)
        transport.set_protocol(proto)
        proto.connection_made(transport)


class Sample:
    def __init__(self, server: asyncio.Server, app: Any) -> None:
        self.server = server
        self.app = app
        self.port: int = server.sockets[0].getsockname()[1]


async def start_sample(name: str = "") -> Sample:
    app = SAMPLE.App(name)
    server = await asyncio.get_running_loop().create_server(
        lambda: SAMPLE.UpstreamProtocol(app), "127.0.0.1", 0
    )
    return Sample(server, app)


def cluster(name: str, ports: list[int], weights: list[int] | None = None, **kw: Any) -> Cluster:
    weights = weights or [1] * len(ports)
    eps = tuple(Endpoint(SocketAddress("127.0.0.1", p), weight=w) for p, w in zip(ports, weights))
    return Cluster(
        name=name,
        discovery=DiscoveryType.STATIC,
        load_assignment=ClusterLoadAssignment(name, (LocalityEndpoints(eps),)),
        connect_timeout=kw.pop("connect_timeout", 1.0),
        **kw,
    )


def route(name: str, prefix: str, action: RouteActionT, **kw: Any) -> Route:
    return Route(name=name, match=RouteMatch(PathMatchKind.PREFIX, prefix), action=action, **kw)


def hcm_config(*routes: Route, **kw: Any) -> HttpConnectionManagerConfig:
    vhost = VirtualHost(
        name="local",
        domains=("*",),
        routes=routes,
        request_headers=kw.pop("vhost_request_headers", HeaderMutation()),
        response_headers=kw.pop("vhost_response_headers", HeaderMutation()),
    )
    rc = RouteConfiguration(name="rc", virtual_hosts=(vhost,))
    return HttpConnectionManagerConfig(stat_prefix="ingress", route_config=rc, **kw)


class Proxy:
    def __init__(self, runtime: ProxyRuntime, hcm: HttpConnectionManager, server: asyncio.Server) -> None:
        self.runtime = runtime
        self.hcm = hcm
        self.server = server
        self.port: int = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stat(self, name: str) -> int | None:
        return self.runtime.stats.value(name)


ProxyFactory = Callable[..., "asyncio.Future[Proxy] | Any"]


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[..., Any]]:
    servers: list[asyncio.Server] = []
    runtimes: list[ProxyRuntime] = []

    async def make(config: HttpConnectionManagerConfig, clusters: dict[str, Cluster]) -> Proxy:
        runtime = ProxyRuntime()
        runtime.clusters = ClusterManager(runtime)
        runtime.clusters.update(clusters)
        hcm = HttpConnectionManager(config, runtime)
        server = await asyncio.get_running_loop().create_server(lambda: _Accept(hcm), "127.0.0.1", 0)
        servers.append(server)
        runtimes.append(runtime)
        return Proxy(runtime, hcm, server)

    yield make
    for server in servers:
        server.close()
    for runtime in runtimes:
        runtime.cluster_manager().close()


async def simple_proxy(proxy_factory: Any, port: int) -> Proxy:
    """One catch-all route to cluster "app" with one host."""
    config = hcm_config(route("all", "/", ClusterAction("app")))
    proxy: Proxy = await proxy_factory(config, {"app": cluster("app", [port])})
    return proxy


@pytest.fixture
async def sample() -> AsyncIterator[Sample]:
    s = await start_sample("a")
    yield s
    s.server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- #
# Forwarding
# --------------------------------------------------------------------------- #


async def test_proxies_and_sets_forwarding_headers(proxy_factory: Any, sample: Sample) -> None:
    config = hcm_config(route("all", "/", ClusterAction("app")), use_remote_address=True)
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        headers = {"x-forwarded-for": "203.0.113.9", "x-envoy-retry-on": "5xx"}
        resp = await client.get("/headers", headers=headers)
    assert resp.status_code == 200
    assert resp.headers["server"] == "meshlet"
    assert int(resp.headers["x-envoy-upstream-service-time"]) >= 0
    seen = {k: v for k, v in resp.json()["headers"]}
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert len(seen["x-request-id"]) == 36
    # The trusted client (the peer, loopback) is internal: its x-envoy-* headers stay.
    assert seen["x-envoy-internal"] == "true"
    assert seen["x-envoy-retry-on"] == "5xx"
    assert proxy.stat("http.ingress.downstream_rq_2xx") == 1
    assert proxy.stat("cluster.app.upstream_rq_200") == 1
    assert proxy.stat("cluster.app.upstream_rq_2xx") == 1
    assert proxy.stat("vhost.local.route.all.upstream_rq_total") == 1


async def test_external_client_cannot_set_envoy_headers(proxy_factory: Any, sample: Sample) -> None:
    config = hcm_config(route("all", "/", ClusterAction("app")), xff_num_trusted_hops=0)
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.get(
            "/headers",
            headers={"x-forwarded-for": "198.51.100.7", "x-envoy-retry-on": "5xx", "x-request-id": "keep-me"},
        )
    seen = {k: v for k, v in resp.json()["headers"]}
    assert "x-envoy-retry-on" not in seen
    # Not the edge (use_remote_address off): the caller's request id is kept.
    assert seen["x-request-id"] == "keep-me"
    assert seen["x-forwarded-for"] == "198.51.100.7"


async def test_keep_alive_reuses_one_upstream_connection(proxy_factory: Any, sample: Sample) -> None:
    proxy = await simple_proxy(proxy_factory, sample.port)
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for _ in range(100):
            resp = await client.get("/")
            assert resp.status_code == 200
            assert len(resp.content) == 1024
    assert proxy.stat("cluster.app.upstream_cx_total") == 1
    assert proxy.stat("cluster.app.upstream_rq_total") == 100
    assert len(sample.app.connections) == 1


async def test_request_body_streams_up_and_response_down(proxy_factory: Any, sample: Sample) -> None:
    proxy = await simple_proxy(proxy_factory, sample.port)
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.post("/echo", content=chunks())
        big = await client.get("/bytes/3000000")
    assert resp.status_code == 200
    assert resp.content == payload
    assert len(big.content) == 3000000


# --------------------------------------------------------------------------- #
# Route actions and header mutation
# --------------------------------------------------------------------------- #


async def test_direct_response_redirect_and_rewrites(proxy_factory: Any, sample: Sample) -> None:
    add = HeaderMutation(add=(HeaderValueOption("x-route", "r1"),), remove=("x-drop",))
    overwrite = AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
    resp_add = HeaderMutation(add=(HeaderValueOption("x-resp", "yes", overwrite),))
    config = hcm_config(
        route("direct", "/health", DirectResponseAction(200, b"healthy\n")),
        route("moved", "/old", RedirectAction(prefix_rewrite="/new", response_code=302)),
        route(
            "api",
            "/api/",
            ClusterAction("app", prefix_rewrite="/", host_rewrite_literal="backend.internal"),
            request_headers=add,
            response_headers=resp_add,
        ),
        vhost_request_headers=HeaderMutation(add=(HeaderValueOption("x-vhost", "v"),)),
    )
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        direct = await client.get("/health")
        moved = await client.get("/old/page?q=1")
        api = await client.get("/api/headers?x=1", headers={"x-drop": "1"})
    assert (direct.status_code, direct.text) == (200, "healthy\n")
    assert moved.status_code == 302
    assert moved.headers["location"] == f"http://127.0.0.1:{proxy.port}/new/page?q=1"
    doc = api.json()
    seen = {k: v for k, v in doc["headers"]}
    assert doc["path"] == "/headers?x=1"
    assert seen["host"] == "backend.internal"
    assert seen["x-envoy-original-path"] == "/api/headers?x=1"
    assert seen["x-route"] == "r1" and seen["x-vhost"] == "v"
    assert "x-drop" not in seen
    assert api.headers["x-resp"] == "yes"
    assert proxy.stat("http.ingress.rq_direct_response") == 1
    assert proxy.stat("http.ingress.rq_redirect") == 1


# --------------------------------------------------------------------------- #
# Error mapping
# --------------------------------------------------------------------------- #


async def test_no_route_is_404(proxy_factory: Any, sample: Sample) -> None:
    config = hcm_config(route("api", "/api", ClusterAction("app")))
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.get("/other")
    assert resp.status_code == 404
    assert proxy.stat("http.ingress.no_route") == 1
    assert proxy.stat("http.ingress.downstream_rq_4xx") == 1


async def test_unknown_cluster_is_503(proxy_factory: Any) -> None:
    proxy = await proxy_factory(hcm_config(route("all", "/", ClusterAction("missing"))), {})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.get("/")
    assert resp.status_code == 503
    assert proxy.stat("http.ingress.no_cluster") == 1


async def test_connect_failure_is_503_with_envoy_text(proxy_factory: Any) -> None:
    config = hcm_config(route("all", "/", ClusterAction("dead")))
    proxy = await proxy_factory(config, {"dead": cluster("dead", [_free_port()])})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.get("/")
    assert resp.status_code == 503
    assert resp.content == CONNECT_FAILURE
    assert proxy.stat("cluster.dead.upstream_cx_connect_fail") == 1


async def test_route_timeout_is_504(proxy_factory: Any, sample: Sample) -> None:
    config = hcm_config(route("slow", "/", ClusterAction("app", timeout=0.2)))
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.get("/delay/3000")
        after = await client.get("/")
    assert resp.status_code == 504
    assert resp.text == "upstream request timeout"
    assert after.status_code == 200
    assert proxy.stat("cluster.app.upstream_rq_timeout") == 1


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]


async def _start_raw_upstream(behaviour: RawHandler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(behaviour, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_upstream_close_before_headers_is_503(proxy_factory: Any) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server, port = await _start_raw_upstream(hang_up)
    try:
        proxy = await simple_proxy(proxy_factory, port)
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            resp = await client.get("/")
        assert resp.status_code == 503
        assert resp.text == (
            "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
        )
    finally:
        server.close()


async def test_upstream_reset_after_headers_resets_downstream(proxy_factory: Any) -> None:
    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    server, port = await _start_raw_upstream(half_answer)
    try:
        proxy = await simple_proxy(proxy_factory, port)
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")
        assert proxy.stat("http.ingress.rq_reset_after_downstream_response_started") == 1
    finally:
        server.close()


async def test_downstream_disconnect_cancels_upstream_request(proxy_factory: Any) -> None:
    upstream_saw_close = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # returns when the proxy closes the upstream connection
        upstream_saw_close.set()
        writer.close()

    server, port = await _start_raw_upstream(slow)
    try:
        proxy = await simple_proxy(proxy_factory, port)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        # SO_LINGER 0: close with a TCP reset, as a crashed client would.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await asyncio.wait_for(upstream_saw_close.wait(), 5)
        app = proxy.runtime.cluster_manager().get("app")
        assert app is not None and app.hosts[0].counters.rq_active == 0
    finally:
        server.close()


async def test_upgrade_refused_unless_allowed(proxy_factory: Any, sample: Sample) -> None:
    config = hcm_config(
        route("ws", "/ws", ClusterAction("app", upgrades=frozenset({"websocket"}))),
        route("plain", "/", ClusterAction("app")),
    )
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})
    request = "GET {} HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(request.format("/nows").encode())
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 403")
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(request.format("/ws").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    writer.write(b"ping through the tunnel")
    echoed = await asyncio.wait_for(reader.readexactly(len(b"ping through the tunnel")), 5)
    assert echoed == b"ping through the tunnel"
    writer.close()


# --------------------------------------------------------------------------- #
# Load balancing, DNS, access log, HTTP/2 downstream
# --------------------------------------------------------------------------- #


async def test_weighted_round_robin_distribution(proxy_factory: Any) -> None:
    a, b = await start_sample("a"), await start_sample("b")
    try:
        clusters = {"app": cluster("app", [a.port, b.port], weights=[3, 1])}
        proxy = await proxy_factory(hcm_config(route("all", "/", ClusterAction("app"))), clusters)
        served: dict[str, int] = {}
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            for _ in range(100):
                resp = await client.get("/")
                served[resp.headers["x-served-by"]] = served.get(resp.headers["x-served-by"], 0) + 1
        assert served == {"a": 75, "b": 25}
    finally:
        a.server.close()
        b.server.close()


async def test_strict_dns_localhost(proxy_factory: Any, sample: Sample) -> None:
    dns_cluster = Cluster(
        name="dns",
        discovery=DiscoveryType.STRICT_DNS,
        dns_lookup_family="V4_ONLY",
        load_assignment=ClusterLoadAssignment(
            "dns", (LocalityEndpoints((Endpoint(SocketAddress("localhost", sample.port)),)),)
        ),
    )
    proxy = await proxy_factory(hcm_config(route("all", "/", ClusterAction("dns"))), {"dns": dns_cluster})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.get("/")
    assert resp.status_code == 200
    assert (proxy.stat("cluster.dns.update_success") or 0) >= 1
    described = proxy.runtime.cluster_manager().describe()["dns"]
    assert described["hosts"][0]["address"] == f"127.0.0.1:{sample.port}"  # type: ignore[index]


async def test_access_log_default_format(proxy_factory: Any, sample: Sample, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    json_log = tmp_path / "access.json"
    config = hcm_config(
        route("all", "/", ClusterAction("app")),
        access_logs=(
            AccessLogConfig(path=str(log)),
            AccessLogConfig(
                path=str(json_log), json_format={"code": "%RESPONSE_CODE%", "host": "%UPSTREAM_HOST%"}
            ),
        ),
    )
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        await client.get("/status/201", headers={"user-agent": "tester", "x-request-id": "rid-1"})
    await WRITERS.flush()
    line = log.read_text()
    assert '"GET /status/201 HTTP/1.1" 201 - 0 11 ' in line
    assert line.endswith(f'"-" "tester" "rid-1" "127.0.0.1:{proxy.port}" "127.0.0.1:{sample.port}"\n')
    assert json.loads(json_log.read_text()) == {"code": 201, "host": f"127.0.0.1:{sample.port}"}


async def test_http2_prior_knowledge_is_sniffed(proxy_factory: Any, sample: Sample) -> None:
    proxy = await simple_proxy(proxy_factory, sample.port)
    async with httpx.AsyncClient(base_url=proxy.url, http1=False, http2=True) as client:
        responses = await asyncio.gather(*(client.get("/") for _ in range(10)))
    assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in responses)
    assert proxy.stat("http.ingress.downstream_cx_http2_total") == 1
    assert proxy.stat("http.ingress.downstream_rq_http2_total") == 10


async def test_curl_interop(proxy_factory: Any, sample: Sample) -> None:
    proxy = await simple_proxy(proxy_factory, sample.port)
    for flags in (["--http1.1"], ["--http2-prior-knowledge"]):
        proc = await asyncio.create_subprocess_exec(
            "curl", "-s", "--max-time", "5", *flags, "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
            f"{proxy.url}/bytes/5000",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert out == b"200 5000", flags


async def test_route_timeout_starts_after_a_slow_upload(proxy_factory: Any, sample: Sample) -> None:
    config = hcm_config(route("all", "/", ClusterAction("app", timeout=0.5)))
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})

    async def slow_body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 1000
            await asyncio.sleep(0.35)

    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.post("/echo", content=slow_body())
    assert resp.status_code == 200
    assert len(resp.content) == 4000


async def test_stream_idle_timeout_is_408(proxy_factory: Any, sample: Sample) -> None:
    config = hcm_config(route("all", "/", ClusterAction("app")), stream_idle_timeout=0.2)
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.get("/delay/3000")
    assert (resp.status_code, resp.text) == (408, "stream timeout")


async def test_codec_errors_are_counted_and_logged(proxy_factory: Any, tmp_path: Path) -> None:
    log = tmp_path / "codec.log"
    config = hcm_config(
        route("all", "/", ClusterAction("app")),
        access_logs=(AccessLogConfig(path=str(log), text_format="%RESPONSE_CODE% %RESPONSE_FLAGS%\n"),),
    )
    proxy = await proxy_factory(config, {})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GARBAGE\r\n\r\n")
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 400")
    assert proxy.stat("http.ingress.downstream_rq_4xx") == 1
    await WRITERS.flush()
    assert log.read_text() == "400 DPE\n"


async def test_request_timeout_is_408(proxy_factory: Any, sample: Sample) -> None:
    config = hcm_config(route("all", "/", ClusterAction("app")), request_timeout=0.2)
    proxy = await proxy_factory(config, {"app": cluster("app", [sample.port])})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.get("/delay/3000")
    assert (resp.status_code, resp.text) == (408, "request timeout")
    assert proxy.stat("http.ingress.downstream_rq_timeout") == 1
