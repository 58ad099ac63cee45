"""The connection manager behind TLS: ALPN picks the codec, and a TLS upstream
cluster. curl is the client; Python's ssl module serves the upstream."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from test_conn_manager import SAMPLE, cluster, hcm_config, route

from certs import Pki, make_pki
from meshlet.config.model import (
    CertificateValidation,
    ClusterAction,
    TlsCertificate,
    TlsContext,
    TransportSocketConfig,
    UpstreamProtocol,
)
from meshlet.proxy.http.conn_manager import HttpConnectionManager
from meshlet.proxy.listeners.transport_sockets import make_factory
from meshlet.proxy.runtime import ProxyRuntime
from meshlet.proxy.transport import ConnectionInfo, SecurityInfo, TransportSocketFactory
from meshlet.proxy.upstream.manager import ClusterManager

TLS = "envoy.transport_sockets.tls"


class _TlsAccept:
    """Listener glue: the transport socket's handshake, then the HCM's protocol."""

    def __init__(self, factory: TransportSocketFactory, hcm: HttpConnectionManager) -> None:
        self._factory = factory
        self._hcm = hcm

    def __call__(self) -> asyncio.Protocol:
        return _Raw(self)


class _Raw(asyncio.Protocol):
    def __init__(self, accept: _TlsAccept) -> None:
        self._accept = accept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        peer, local = raw.get_extra_info("peername")[:2], raw.get_extra_info("sockname")[:2]

        def app(security: SecurityInfo) -> asyncio.BaseProtocol:
            return self._accept._hcm.protocol_for(ConnectionInfo(peer=peer, local=local, security=security))

        self._accept._factory.create().start(raw, app)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
async def tls_upstream(pki: Pki) -> AsyncIterator[int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    app = SAMPLE.App("tls")
    server = await asyncio.get_running_loop().create_server(
        lambda: SAMPLE.UpstreamProtocol(app), "127.0.0.1", 0, ssl=ctx
    )
    yield server.sockets[0].getsockname()[1]
    server.close()


async def _curl(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "--max-time", "5", *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out


async def test_alpn_selects_codec_and_tls_upstream(pki: Pki, tls_upstream: int) -> None:
    runtime = ProxyRuntime()
    runtime.clusters = ClusterManager(runtime)
    upstream_tls = TransportSocketConfig(
        name=TLS,
        tls=TlsContext(
            server_side=False,
            validation=CertificateValidation(trusted_ca_pem=pki.ca_pem),
            sni="localhost",
            alpn_protocols=("http/1.1",),
        ),
    )
    secure = cluster("secure", [tls_upstream], transport_socket=upstream_tls, protocol=UpstreamProtocol.AUTO)
    runtime.clusters.update({"secure": secure})
    hcm = HttpConnectionManager(hcm_config(route("all", "/", ClusterAction("secure"))), runtime)
    server_tls = TlsContext(
        server_side=True,
        certificates=(TlsCertificate(pki.server_cert.read_bytes(), pki.server_key.read_bytes()),),
        alpn_protocols=("h2", "http/1.1"),
    )
    factory = make_factory(TransportSocketConfig(name=TLS, tls=server_tls), default_engine="openssl")
    server = await asyncio.get_running_loop().create_server(_TlsAccept(factory, hcm), "127.0.0.1", 0)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}/headers"
    try:
        out = await _curl("--cacert", str(pki.ca_cert), "--http2", "-w", "\n%{http_version}", url)
        body, _, version = out.rpartition(b"\n")
        assert version == b"2"
        doc: dict[str, Any] = json.loads(body)
        seen = dict(doc["headers"])
        assert seen["x-forwarded-proto"] == "https"
        out = await _curl("--cacert", str(pki.ca_cert), "--http1.1", "-w", "\n%{http_version}", url)
        assert out.rpartition(b"\n")[2] == b"1.1"
        assert runtime.stats.value("http.ingress.downstream_cx_http2_total") == 1
        assert runtime.stats.value("http.ingress.downstream_cx_http1_total") == 1
        assert runtime.stats.value("cluster.secure.upstream_rq_200") == 2
    finally:
        server.close()
        runtime.cluster_manager().close()
