"""Loopback traffic for the upstream tests: small named backends and a real
``Proxy`` built from a bootstrap written in the test."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterable

import httpx

from meshlet.config.compiler import compile_bootstrap
from meshlet.config.loader import parse_bootstrap_text
from meshlet.proxy.runtime import ProxySettings
from meshlet.proxy.server import Proxy

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class Backend:
    """A keep-alive HTTP/1.1 server that names itself in ``x-backend``.

    ``/healthz`` answers 200 while ``healthy`` (else 503); every other path
    answers ``status`` (200 unless a test changes it) after ``delay``
    seconds. ``hits`` counts non-health requests; ``health_hits`` the
    probes; ``active``/``peak`` the requests in progress."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.healthy = True
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.health_hits = 0
        self.active = 0
        self.peak = 0
        self.connections = 0
        self.release = asyncio.Event()
        self.release.set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                path = head.split(b" ", 2)[1].decode()
                echo = _header(head, b"x-key")
                if path == "/healthz":
                    self.health_hits += 1
                    status = 200 if self.healthy else 503
                else:
                    status = await self._work()
                body = self.name.encode()
                writer.write(
                    b"HTTP/1.1 %d X\r\nx-backend: %s\r\nx-key: %s\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, body, echo, len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _work(self) -> int:
        self.hits += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            await asyncio.wait_for(self.release.wait(), 10)
            return self.status
        finally:
            self.active -= 1


def _header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b"-"


@contextlib.asynccontextmanager
async def backends(n: int) -> AsyncIterator[list[Backend]]:
    started = [Backend(f"b{i}") for i in range(n)]
    try:
        for b in started:
            await b.start()
        yield started
    finally:
        for b in started:
            await b.stop()


def endpoints_yaml(items: Iterable[Backend], weights: Iterable[int] | None = None) -> str:
    """``lb_endpoints`` entries (one flow-style line each) for one locality."""
    out = []
    for b, w in zip(items, weights or [1] * 1000):
        address = f"{{ socket_address: {{ address: 127.0.0.1, port_value: {b.port} }} }}"
        out.append(f"{{ endpoint: {{ address: {address} }}, load_balancing_weight: {w} }}")
    return "[" + ", ".join(out) + "]"


def bootstrap(cluster: str, *, route: str = "") -> str:
    """A listener on an ephemeral port routing every path to cluster ``svc``
    (``route`` adds RouteAction fields, one per line), an admin endpoint,
    and ``cluster`` (the cluster's fields after ``name``/``connect_timeout``,
    as YAML indented by 4)."""
    extra = "".join(f"\n                  {line}" for line in route.strip().splitlines())
    return f"""
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: web
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM_TYPE}
          stat_prefix: web
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: / }}
                route:
                  cluster: svc
                  timeout: 5s{extra}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": {ROUTER_TYPE} }}
  clusters:
  - name: svc
    connect_timeout: 1s
{cluster}
"""


@contextlib.asynccontextmanager
async def running_proxy(config_yaml: str) -> AsyncIterator[Proxy]:
    config = compile_bootstrap(parse_bootstrap_text(config_yaml))
    proxy = Proxy(ProxySettings(drain_time=1.0), admin_port=0)
    try:
        await proxy.apply(config)
        await proxy.start()
        yield proxy
    finally:
        await proxy.stop()


def url(proxy: Proxy, path: str = "/") -> str:
    addr = proxy.listeners.address("web")
    assert addr is not None
    return f"http://127.0.0.1:{addr[1]}{path}"


def admin_url(proxy: Proxy, path: str) -> str:
    addr = proxy.admin_address
    assert addr is not None
    return f"http://127.0.0.1:{addr[1]}{path}"


async def curl(
    proxy: Proxy,
    n: int,
    *,
    keys: list[str] | None = None,
    headers: dict[str, str] | None = None,
    parallel: int = 8,
    path: str = "/",
    timeout: float = 30.0,
) -> list[tuple[str, str, str]]:
    """``n`` requests with curl (an independent client, ``parallel`` at a
    time over keep-alive connections); with ``keys``, request i carries
    header ``x-key: keys[i]``. Returns (status, x-backend, x-key) per
    response, in completion order."""
    lines = []
    write_out = 'write-out = "%{http_code} %header{x-backend} %header{x-key}\\n"'
    target = url(proxy, path)
    for i in range(n):
        if i:
            lines.append("next")
        lines += [f'url = "{target}"', 'output = "/dev/null"', write_out, "silent", "max-time = 10"]
        for name, value in (headers or {}).items():
            lines.append(f'header = "{name}: {value}"')
        if keys is not None:
            lines.append(f'header = "x-key: {keys[i]}"')
    cfg = "\n".join(lines) + "\n"
    proc = await asyncio.create_subprocess_exec(
        "curl", "--parallel", "--parallel-max", str(parallel), "-K", "-",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(cfg.encode()), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rows = []
    for line in out.decode().splitlines():
        status, _, rest = line.partition(" ")
        backend, _, key = rest.partition(" ")
        rows.append((status, backend, key))
    return rows


async def spread(
    proxy: Proxy,
    n: int,
    *,
    headers: dict[str, str] | None = None,
    concurrency: int = 8,
    path: str = "/",
) -> Counter[str]:
    """``n`` requests through the proxy with curl; answers counted by backend
    name ("<status>" for a response that names none)."""
    rows = await curl(proxy, n, headers=headers, parallel=concurrency, path=path)
    return Counter(backend or status for status, backend, _ in rows)


async def spread_httpx(
    proxy: Proxy,
    n: int,
    *,
    headers: dict[str, str] | None = None,
    concurrency: int = 8,
    path: str = "/",
) -> Counter[str]:
    """Send ``n`` requests (``concurrency`` at a time); count answers by backend
    name ("<status>" for a response without ``x-backend``)."""
    counts: Counter[str] = Counter()
    target = url(proxy, path)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        remaining = iter(range(n))

        async def worker() -> None:
            for _ in remaining:
                r = await client.get(target, headers=headers)
                counts[r.headers.get("x-backend", str(r.status_code))] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def stat(proxy: Proxy, name: str) -> int | None:
    return proxy.runtime.stats.value(name)


async def wait_for(predicate: object, timeout: float = 5.0, step: float = 0.02) -> None:
    """Poll ``predicate()`` until true, at most ``timeout`` seconds."""
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(step)


async def clusters_page(proxy: Proxy, fmt: str = "") -> str:
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(admin_url(proxy, "/clusters" + (f"?format={fmt}" if fmt else "")))
        r.raise_for_status()
        return r.text


async def clusters_json(proxy: Proxy) -> dict[str, object]:
    return dict(json.loads(await clusters_page(proxy, "json")))
