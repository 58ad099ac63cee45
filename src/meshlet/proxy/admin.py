"""The admin endpoint: an HTTP/1.1 server on the project's own codec.

Endpoints (Envoy's names and formats): ``/ready``, ``/stats``
(``?filter=regex``, ``?format=json|prometheus``), ``/stats/prometheus``,
``/config_dump``, ``/clusters`` (``?format=json``), ``/listeners``
(``?format=json``), ``/certs``, ``/server_info``, ``/help``; POST-only
``/drain_listeners`` (``?graceful``) and ``/quitquitquit``.

The admin server is given an ``AdminTarget`` (the ``Proxy``) and only reads
from it, except for the two POST actions.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs

from meshlet import __version__
from meshlet.config.model import ProxyConfig, SocketAddress
from meshlet.errors import ConfigError
from meshlet.proxy import admin_pages as pages
from meshlet.proxy.http.h1_server import H1ServerProtocol
from meshlet.proxy.http.stream import CodecSettings, DownstreamStream, ResponseHead
from meshlet.proxy.observe import prometheus
from meshlet.proxy.runtime import ProxyRuntime
from meshlet.proxy.transport import ConnectionInfo

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 64 * 1024
BODY_TIMEOUT = 10.0
TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"


class AdminTarget(Protocol):
    """What the admin endpoint reads from and acts on (the ``Proxy``)."""

    runtime: ProxyRuntime

    @property
    def state(self) -> str:
        """"LIVE", "DRAINING", "PRE_INITIALIZING" or "INITIALIZING"."""
        ...

    @property
    def config(self) -> ProxyConfig | None: ...

    @property
    def config_applied_at(self) -> float: ...

    def listener_info(self) -> list[dict[str, object]]: ...

    def cluster_info(self) -> dict[str, dict[str, object]]: ...

    def refresh_stats(self) -> None:
        """Bring point-in-time gauges (uptime, connections) up to date before a read."""
        ...

    async def drain_listeners(self, *, graceful: bool) -> None: ...

    def request_shutdown(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = TEXT
    extra_headers: tuple[tuple[str, str], ...] = ()


Params = dict[str, list[str]]
Page = Callable[["AdminServer", Params], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    help: str
    page: Page
    post_only: bool = False


def _text(status: int, text: str) -> Reply:
    return Reply(status, text.encode())


def _json(data: object, status: int = 200) -> Reply:
    return Reply(status, pages.dumps(data), JSON)


def _filter(params: Params) -> re.Pattern[str] | None:
    value = params.get("filter", [""])[0]
    return re.compile(value) if value else None


# -- pages ------------------------------------------------------------------ #


async def _ready(admin: AdminServer, params: Params) -> Reply:
    state = admin.target.state
    return _text(200 if state == "LIVE" else 503, state + "\n")


async def _stats(admin: AdminServer, params: Params) -> Reply:
    try:
        name_filter = _filter(params)
    except re.error as exc:
        return _text(400, f"invalid regex in filter: {exc}\n")
    fmt = params.get("format", ["text"])[0]
    admin.target.refresh_stats()
    store = admin.target.runtime.stats
    if fmt == "json":
        return _json(pages.stats_json(store, name_filter))
    if fmt == "prometheus":
        return Reply(200, prometheus.render(store, name_filter), prometheus.CONTENT_TYPE)
    if fmt != "text":
        return _text(400, f"unsupported format {fmt!r} (text, json, prometheus)\n")
    return _text(200, pages.stats_text(store, name_filter))


async def _stats_prometheus(admin: AdminServer, params: Params) -> Reply:
    try:
        name_filter = _filter(params)
    except re.error as exc:
        return _text(400, f"invalid regex in filter: {exc}\n")
    admin.target.refresh_stats()
    return Reply(200, prometheus.render(admin.target.runtime.stats, name_filter), prometheus.CONTENT_TYPE)


async def _config_dump(admin: AdminServer, params: Params) -> Reply:
    config = admin.target.config
    if config is None:
        return _json({"configs": []})
    applied = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(admin.target.config_applied_at))
    return _json(pages.config_dump(config.source, applied))


async def _clusters(admin: AdminServer, params: Params) -> Reply:
    described = admin.target.cluster_info()
    if params.get("format", [""])[0] == "json":
        return _json(pages.clusters_json(described))
    return _text(200, pages.clusters_text(described))


async def _listeners(admin: AdminServer, params: Params) -> Reply:
    described = admin.target.listener_info()
    if params.get("format", [""])[0] == "json":
        return _json(pages.listeners_json(described))
    return _text(200, pages.listeners_text(described))


async def _server_info(admin: AdminServer, params: Params) -> Reply:
    target = admin.target
    runtime = target.runtime
    config = target.config
    uptime = f"{int(time.time() - runtime.started_at)}s"
    return _json({
        "version": f"meshlet/{__version__}",
        "state": target.state,
        "hot_restart_version": "disabled",
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
        "node": {"id": config.node_id if config else "", "cluster": config.node_cluster if config else ""},
        "command_line_options": {
            "tls_engine": runtime.settings.tls_engine,
            "regex_engine": runtime.settings.regex_engine,
            "drain_time": f"{runtime.settings.drain_time:g}s",
        },
    })


async def _drain_listeners(admin: AdminServer, params: Params) -> Reply:
    await admin.target.drain_listeners(graceful="graceful" in params)
    return _text(200, "OK\n")


async def _certs(admin: AdminServer, params: Params) -> Reply:
    from meshlet.identity.targets import live_targets

    contexts = [(target.trusted_ca_pem, target.certificate_chain) for target in live_targets()]
    return _json(pages.certs_json(contexts, time.time()))


async def _quit(admin: AdminServer, params: Params) -> Reply:
    # Answer first: the shutdown closes this very server.
    asyncio.get_running_loop().call_soon(admin.target.request_shutdown)
    return _text(200, "OK\n")


async def _help(admin: AdminServer, params: Params) -> Reply:
    return _text(200, help_text())


ENDPOINTS: dict[str, Endpoint] = {
    "/ready": Endpoint("print server state, return 200 if LIVE, otherwise return 503", _ready),
    "/stats": Endpoint("print server stats (?filter=regex, ?format=json|prometheus)", _stats),
    "/stats/prometheus": Endpoint("print server stats in prometheus format", _stats_prometheus),
    "/config_dump": Endpoint("dump current Envoy configs (private keys redacted)", _config_dump),
    "/clusters": Endpoint("upstream cluster status (?format=json)", _clusters),
    "/listeners": Endpoint("print listener info (?format=json)", _listeners),
    "/certs": Endpoint("print certs on machine (trusted CAs and chains of every TLS context)", _certs),
    "/server_info": Endpoint("print server version/status information", _server_info),
    "/drain_listeners": Endpoint("drain listeners (?graceful: drain connections first)", _drain_listeners,
                                 post_only=True),
    "/quitquitquit": Endpoint("exit the server (after a graceful drain)", _quit, post_only=True),
    "/help": Endpoint("print out list of admin commands", _help),
}


def help_text() -> str:
    lines = ["admin commands are:"]
    for path, ep in ENDPOINTS.items():
        lines.append(f"  {path}{' (POST)' if ep.post_only else ''}: {ep.help}")
    return "\n".join(lines) + "\n"


# -- server ----------------------------------------------------------------- #


class AdminServer:
    def __init__(self, target: AdminTarget, address: SocketAddress) -> None:
        self.target = target
        self.address = address
        self._server: asyncio.Server | None = None
        self._connections: weakref.WeakSet[H1ServerProtocol] = weakref.WeakSet()
        self._settings = CodecSettings(request_headers_timeout=10.0, idle_timeout=60.0, server_name="meshlet")
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._protocol, self.address.host, self.address.port, reuse_address=True
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ConfigError("admin.address", f"cannot listen on {self.address}: {why}") from None
        return self.bound

    @property
    def bound(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def _protocol(self) -> H1ServerProtocol:
        info = ConnectionInfo(peer=("", 0), local=(self.address.host, self.address.port), listener="admin")
        proto = H1ServerProtocol(self._handle, info, self._settings)
        self._connections.add(proto)
        return proto

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for proto in list(self._connections):
            proto.close()
        await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None

    async def _handle(self, stream: DownstreamStream) -> None:
        reply = await self._reply(stream)
        headers = [("content-type", reply.content_type), ("content-length", str(len(reply.body))),
                   ("cache-control", "no-cache, max-age=0"), ("x-content-type-options", "nosniff"),
                   *reply.extra_headers]
        await stream.send_head(ResponseHead(reply.status, headers), end_stream=not reply.body)
        if reply.body:
            await stream.send_data(reply.body, end_stream=True)

    async def _reply(self, stream: DownstreamStream) -> Reply:
        head = stream.head
        try:
            await asyncio.wait_for(stream.body.read_all(MAX_REQUEST_BODY), BODY_TIMEOUT)
        except ValueError:
            return _text(413, "request body too large\n")
        except TimeoutError:
            return _text(408, "request body timed out\n")
        path, _, query = head.path.partition("?")
        endpoint = ENDPOINTS.get(path) or (ENDPOINTS["/help"] if path == "/" else None)
        if endpoint is None:
            return _text(404, f"invalid path {path!r}\n" + help_text())
        if endpoint.post_only and head.method != "POST":
            return Reply(405, f"{path} requires POST\n".encode(), TEXT, (("allow", "POST"),))
        if not endpoint.post_only and head.method not in ("GET", "HEAD", "POST"):
            return Reply(405, f"{path} does not support {head.method}\n".encode(), TEXT, (("allow", "GET"),))
        params = parse_qs(query, keep_blank_values=True)
        try:
            return await endpoint.page(self, params)
        except Exception:
            log.exception("admin %s failed", path)
            return _text(500, "internal error\n")
