"""Test helpers: Envoy resources and a raw ADS client stream over a real grpc.aio channel."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshlet.bench.admin import admin_get

STEP_TIMEOUT = 5.0


def cluster(name: str, eds: bool = True) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name)
    c.connect_timeout.FromSeconds(1)
    if eds:
        c.type = cluster_pb2.Cluster.EDS
        c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def endpoints(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    group = cla.endpoints.add()
    # gRPC's xDS client ignores localities without a weight.
    group.locality.zone = "local"
    group.load_balancing_weight.value = 1
    for port in ports:
        addr = group.lb_endpoints.add().endpoint.address.socket_address
        addr.address, addr.port_value = "127.0.0.1", port
    return cla


def route(name: str, cluster_name: str, prefix: str = "/") -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vh = rc.virtual_hosts.add(name="all", domains=["*"])
    r = vh.routes.add()
    r.match.prefix = prefix
    r.route.cluster = cluster_name
    return rc


def listener(name: str) -> listener_pb2.Listener:
    ln = listener_pb2.Listener(name=name)
    ln.address.socket_address.address = "127.0.0.1"
    return ln


class RawAdsStream:
    """One ADS stream driven request by request (``send``), responses read with ``recv``."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, *, delta: bool = False) -> None:
        self.node = base_pb2.Node(id=node_id, cluster="test")
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        method = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self._call = method(self._iterate())
        self._first = True
        self._responses: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read_all())

    async def _read_all(self) -> None:
        try:
            async for response in self._call:
                self._responses.put_nowait(response)
        except grpc.aio.AioRpcError as exc:
            self._responses.put_nowait(exc)
        self._responses.put_nowait(None)

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            item = await self._requests.get()
            if item is None:
                return
            yield item

    def send(self, request: Any) -> None:
        if self._first:
            request.node.CopyFrom(self.node)
            self._first = False
        self._requests.put_nowait(request)

    def sotw(self, type_url: str, names: list[str] | None = None, version: str = "", nonce: str = "",
             error: str | None = None) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=names or [], version_info=version, response_nonce=nonce
        )
        if error is not None:
            req.error_detail.code = 3
            req.error_detail.message = error
        self.send(req)

    async def recv(self, timeout: float = STEP_TIMEOUT) -> Any:
        async with asyncio.timeout(timeout):
            response = await self._responses.get()
        if isinstance(response, Exception):
            raise response
        return response

    async def expect_silence(self, seconds: float = 0.3) -> None:
        try:
            response = await self.recv(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected response: {response}")

    def close(self) -> None:
        self._requests.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()


# --------------------------------------------------------------------------- #
# A meshlet proxy process on a dynamic (ADS) bootstrap
# --------------------------------------------------------------------------- #

HTTP_OPTIONS_URL = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def http_listener(name: str, port: int, route_name: str) -> listener_pb2.Listener:
    """A listener whose HCM takes its routes from RDS over ADS."""
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    manager = hcm.HttpConnectionManager(stat_prefix=name)
    manager.rds.route_config_name = route_name
    manager.rds.config_source.ads.SetInParent()
    manager.rds.config_source.resource_api_version = 2  # V3
    http_filter = manager.http_filters.add(name="envoy.filters.http.router")
    http_filter.typed_config.Pack(router_pb2.Router())
    ln = listener_pb2.Listener(name=name)
    ln.address.socket_address.address = "127.0.0.1"
    ln.address.socket_address.port_value = port
    chain_filter = ln.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager")
    chain_filter.typed_config.Pack(manager)
    return ln


def dynamic_bootstrap(node_id: str, ads_port: int, admin_port: int, *, delta: bool = False) -> dict[str, Any]:
    def addr(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    return {
        "node": {"id": node_id, "cluster": "test"},
        "admin": {"address": addr(admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [{
                "name": "xds_cluster",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "xds_cluster",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(ads_port)}}]}],
                },
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": HTTP_OPTIONS_URL, "explicit_http_config": {"http2_protocol_options": {}},
                    },
                },
            }],
        },
    }


class ProxyProcess:
    """``meshlet proxy --config BOOTSTRAP`` as a child process; ``stop()`` always ends it."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.config_path = workdir / "bootstrap.yaml"
        self.log_path = workdir / "proxy.log"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.admin_port = int(config["admin"]["address"]["socket_address"]["port_value"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ProxyProcess:
        argv = [sys.executable, "-m", "meshlet.cli.main", "proxy", "--config", str(self.config_path),
                "--log-level", "info"]
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

    async def admin(self, path: str) -> tuple[int, str]:
        return await asyncio.to_thread(admin_get, self.admin_port, path)

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


class NamedUpstream:
    """An HTTP/1.1 server on loopback answering every request with its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> NamedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = self.name.encode()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def tls_listener(name: str, port: int, route_name: str, secret_name: str) -> listener_pb2.Listener:
    """``http_listener`` behind TLS with its certificate from SDS over ADS."""
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    listener = http_listener(name, port, route_name)
    context = tls_pb2.DownstreamTlsContext()
    sds = context.common_tls_context.tls_certificate_sds_secret_configs.add(name=secret_name)
    sds.sds_config.ads.SetInParent()
    socket = listener.filter_chains[0].transport_socket
    socket.name = "envoy.transport_sockets.tls"
    socket.typed_config.Pack(context)
    return listener
