"""What the mesh adds to its control-plane process (``--mount meshlet.mesh.plane:mount_mesh``,
after the default xDS mount):

* identity: with ``MESHLET_CA_DIR`` set, every proxy's SVID is signed by that
  mesh CA (``CaIdentity``) and travels over SDS, so mesh mTLS works as soon as a
  PeerAuthentication asks for it;
* sync status: with ``MESHLET_STATUS_PORT`` set, ``GET /status`` on loopback
  answers what the xDS cache knows of each proxy (versions sent and ACKed,
  NACKs with the proxy's error) with the translator's notes for it (what is
  stored but not enforced, unknown hosts) and the store revision the current
  snapshots were built from. ``meshlet status`` reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from meshlet.control.push import ConfigPusher, pusher_of
from meshlet.control.translate.identity import CaIdentity
from meshlet.errors import ConfigError
from meshlet.identity.cadir import CaDirectory, CaDirectoryError
from meshlet.proxy.http.h1_server import H1ServerProtocol
from meshlet.proxy.http.stream import CodecSettings, DownstreamStream, ResponseHead
from meshlet.proxy.transport import ConnectionInfo

if TYPE_CHECKING:
    from meshlet.control.server import ControlPlane

log = logging.getLogger(__name__)

CA_DIR_ENV = "MESHLET_CA_DIR"
STATUS_PORT_ENV = "MESHLET_STATUS_PORT"
STATUS_HOST = "127.0.0.1"
STATUS_PATH = "/status"
MAX_BODY = 64 * 1024
CLOSE_TIMEOUT = 5.0

_SERVERS: weakref.WeakKeyDictionary[ControlPlane, StatusServer] = weakref.WeakKeyDictionary()


def sync_status(pusher: ConfigPusher) -> dict[str, object]:
    """Every proxy's sync state with its translation notes, JSON-ready. ``current``: the
    proxy has ACKed, for every type, the version of the snapshot the cache now holds
    for it (``synced`` only says it ACKed what was last sent)."""
    notes = pusher.statuses()
    nodes = []
    for status in sorted(pusher.cache.status(), key=lambda s: s.node_id):
        entry = status.as_dict()
        entry["notes"] = notes.get(status.node_id, {}).get("notes", [])
        snapshot = pusher.cache.snapshot(status.group)
        entry["current"] = snapshot is not None and all(
            status.types.get(t) is not None and status.types[t].acked_version == snapshot.version(t)
            for t in snapshot.type_urls())
        nodes.append(entry)
    return {"revision": pusher.resources.revision, "rebuilds": pusher.rebuilds, "nodes": nodes}


class StatusServer:
    """``GET /status`` over HTTP/1.1 on loopback (the project's own codec)."""

    def __init__(self, pusher: ConfigPusher, port: int, host: str = STATUS_HOST) -> None:
        self.pusher = pusher
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self._settings = CodecSettings(request_headers_timeout=10.0, idle_timeout=30.0,
                                       server_name="meshlet-status")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._protocol, self.host, self.port, reuse_address=True)
        except OSError as exc:
            raise ConfigError("status.address", f"cannot listen on {self.host}:{self.port}: "
                                                f"{exc.strerror or exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT)
            self._server = None

    def _protocol(self) -> H1ServerProtocol:
        info = ConnectionInfo(peer=("", 0), local=(self.host, self.port), listener="mesh-status")
        return H1ServerProtocol(self._handle, info, self._settings)

    async def _handle(self, stream: DownstreamStream) -> None:
        try:
            await asyncio.wait_for(stream.body.read_all(MAX_BODY), 10.0)
        except (ValueError, TimeoutError):
            await _reply(stream, 413, {"error": "request body too large or too slow"})
            return
        path = stream.head.path.partition("?")[0]
        if stream.head.method != "GET" or path != STATUS_PATH:
            await _reply(stream, 404, {"error": f"only GET {STATUS_PATH} is served here"})
            return
        await _reply(stream, 200, sync_status(self.pusher))


async def _reply(stream: DownstreamStream, status: int, body: object) -> None:
    data = json.dumps(body).encode() + b"\n"
    await stream.send_head(ResponseHead(status, [("content-type", "application/json"),
                                                 ("content-length", str(len(data))),
                                                 ("cache-control", "no-store")]))
    await stream.send_data(data, end_stream=True)


async def mount_mesh(plane: ControlPlane) -> None:
    """Mesh identity and the status endpoint, on the pusher ``mount_xds`` attached."""
    pusher = pusher_of(plane)
    if pusher is None:
        raise ConfigError("mount", "meshlet.mesh.plane:mount_mesh needs the xDS mount "
                                   "(meshlet.control.push:mount_xds) before it")
    ca_dir = os.environ.get(CA_DIR_ENV)
    if ca_dir:
        pusher.set_identity(await _ca_identity(Path(ca_dir)))
        log.info("mesh identity: SVIDs signed by the CA in %s", ca_dir)
    port = os.environ.get(STATUS_PORT_ENV)
    if port:
        if not port.isdigit():
            raise ConfigError(STATUS_PORT_ENV, f"{port!r} is not a port number")
        server = StatusServer(pusher, int(port))
        await server.start()
        _SERVERS[plane] = server
        plane.on_stop.append(server.close)
        log.info("mesh status on http://%s:%s%s", server.host, server.port, STATUS_PATH)


async def _ca_identity(path: Path) -> CaIdentity:
    directory = CaDirectory(path)
    if not directory.exists:
        raise ConfigError(CA_DIR_ENV, f"{path} holds no mesh CA (meshlet ca init --dir {path})")
    try:
        return CaIdentity(directory.authority())
    except CaDirectoryError as exc:
        raise ConfigError(CA_DIR_ENV, str(exc)) from None
