"""Traffic management tests: a programmable HTTP/1.1 upstream and a real
proxy compiled from bootstrap YAML, both on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from meshlet.config.compiler import compile_bootstrap
from meshlet.config.loader import parse_bootstrap_text
from meshlet.proxy.runtime import ProxySettings
from meshlet.proxy.server import Proxy

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


@dataclass
class Seen:
    """One request as an upstream received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def host(self) -> str:
        return self.headers.get("host", "")


Reply = tuple[int, list[tuple[str, str]], bytes]
Handler = Callable[["App", Seen], Awaitable[Reply | None]]


async def default_handler(app: App, seen: Seen) -> Reply:
    return 200, [], f"{app.name} saw {seen.path}".encode()


class App:
    """HTTP/1.1 keep-alive upstream. ``handler`` answers each request; a
    handler returning None closes the connection without a response."""

    def __init__(self, name: str = "app", handler: Handler = default_handler) -> None:
        self.name = name
        self.handler = handler
        self.seen: list[Seen] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> App:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                seen = await asyncio.wait_for(_read_request(reader), 30)
                self.seen.append(seen)
                reply = await self.handler(self, seen)
                if reply is None:
                    break
                status, headers, body = reply
                lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}"]
                lines += [f"{k}: {v}" for k, v in headers]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Seen:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return Seen(method, path, headers, body)


def cluster(
    name: str, ports: list[int], weights: list[int] | None = None, **extra: object
) -> dict[str, object]:
    weights = weights or [1] * len(ports)
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                            },
                            "load_balancing_weight": w,
                        }
                        for p, w in zip(ports, weights, strict=True)
                    ]
                }
            ],
        },
        **extra,
    }


def bootstrap(
    routes: list[dict[str, object]],
    clusters: list[dict[str, object]],
    *,
    http_filters: list[dict[str, object]] | None = None,
    vhost: dict[str, object] | None = None,
) -> str:
    """A bootstrap (JSON is YAML) with one listener on an ephemeral port."""
    hcm = {
        "stat_prefix": "web",
        "route_config": {
            "name": "routes",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes, **(vhost or {})}],
        },
        "http_filters": [*(http_filters or []), ROUTER],
    }
    data = {
        "static_resources": {
            "listeners": [
                {
                    "name": "web",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {"@type": HCM_TYPE, **hcm},
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        }
    }
    return json.dumps(data)


@asynccontextmanager
async def running_proxy(config_text: str, *, seed: int = 7) -> AsyncIterator[tuple[Proxy, str]]:
    """A started proxy and its base URL; stopped on exit."""
    proxy = Proxy(ProxySettings(drain_time=1.0))
    proxy.runtime.random.seed(seed)
    try:
        await proxy.apply(compile_bootstrap(parse_bootstrap_text(config_text)))
        await proxy.start()
        addr = proxy.listeners.address("web")
        assert addr is not None
        yield proxy, f"http://127.0.0.1:{addr[1]}"
    finally:
        await proxy.stop()


def stat(proxy: Proxy, name: str) -> int:
    return proxy.runtime.stats.value(name) or 0


async def get_many(
    port: int, path: str, count: int, *, connections: int = 8, headers: dict[str, str] | None = None
) -> list[tuple[int, bytes]]:
    """``count`` GETs over keep-alive connections with a bare-bones HTTP/1.1
    client (httpx is too slow for thousands of requests in a test):
    (status, body) per request."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    request = f"GET {path} HTTP/1.1\r\nhost: test\r\n{extra}\r\n".encode()
    results: list[tuple[int, bytes]] = []

    async def worker(share: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(share):
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                length = next(
                    int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
                )
                results.append((status, await reader.readexactly(length)))
        finally:
            writer.close()

    shares = [count // connections + (1 if i < count % connections else 0) for i in range(connections)]
    await asyncio.gather(*(worker(n) for n in shares if n))
    return results


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
