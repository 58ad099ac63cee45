"""gRPC's own xDS client (proxyless) against meshlet's ADS server.

grpcio resolves ``xds:///greeter`` through an API listener, RDS, an EDS
cluster and its endpoints served by meshlet; its calls spread over three real
grpcio servers, and CSDS (``grpc_csds``) shows every resource ACKED. The same
resources compile with meshlet's config compiler (no meshlet-only fields).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ads_helpers import cluster, endpoints, route
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from meshlet.config.compiler import compile_resource
from meshlet.config.context import CompileContext, DynamicResources, compiling
from meshlet.proxy.routing.regex import regex_engine
from meshlet.xds.cache import SnapshotCache
from meshlet.xds.server import start_ads_server
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot

CLIENT = Path(__file__).with_name("grpc_xds_client.py")
NODE = "grpc-proxyless-1"
CALLS = 30


def api_listener(name: str, route_name: str) -> listener_pb2.Listener:
    manager = hcm.HttpConnectionManager()
    manager.rds.route_config_name = route_name
    manager.rds.config_source.ads.SetInParent()
    manager.rds.config_source.resource_api_version = 2  # V3
    manager.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(router_pb2.Router())
    ln = listener_pb2.Listener(name=name)
    ln.api_listener.api_listener.Pack(manager)
    return ln


def greeter_snapshot(ports: list[int]) -> Snapshot:
    routes = route("greeter-route", "greeter-cluster", prefix="")
    routes.virtual_hosts[0].domains[:] = ["greeter"]
    return Snapshot.build({
        LISTENER: [api_listener("greeter", "greeter-route")],
        ROUTE: [routes],
        CLUSTER: [cluster("greeter-cluster")],
        ENDPOINT: [endpoints("greeter-cluster", *ports)],
    })


class Greeters:
    """Three grpcio servers answering /greeter.Greeter/SayHello with their own name."""

    def __init__(self) -> None:
        self.servers: list[grpc.aio.Server] = []
        self.ports: list[int] = []

    async def start(self, count: int) -> None:
        for i in range(count):
            name = f"greeter-{i}".encode()
            handler = grpc.method_handlers_generic_handler("greeter.Greeter", {
                "SayHello": grpc.unary_unary_rpc_method_handler(_answer(name)),
            })
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((handler,))
            self.ports.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            self.servers.append(server)

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop(None) for s in self.servers))


def _answer(name: bytes) -> Any:
    async def say_hello(_request: bytes, _context: object) -> bytes:
        return name
    return say_hello


@pytest.fixture
async def greeters() -> AsyncIterator[Greeters]:
    g = Greeters()
    try:
        await g.start(3)
        yield g
    finally:
        await g.stop()


def write_bootstrap(path: Path, ads_port: int) -> None:
    path.write_text(json.dumps({
        "xds_servers": [{
            "server_uri": f"127.0.0.1:{ads_port}",
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": NODE, "cluster": "greeter-clients"},
    }))


async def test_grpc_proxyless_client_resolves_balances_and_acks(tmp_path: Path, greeters: Greeters) -> None:
    cache = SnapshotCache(debounce=0.01, max_delay=0.05)
    snapshot = greeter_snapshot(greeters.ports)
    cache.set_snapshot(NODE, snapshot)
    server, ads_port = await start_ads_server(cache)
    bootstrap = tmp_path / "xds-bootstrap.json"
    write_bootstrap(bootstrap, ads_port)
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)}
    errors = tmp_path / "client.err"
    with errors.open("wb") as stderr:
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENT), "xds:///greeter", str(CALLS),
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )
    try:
        assert child.stdout is not None and child.stdin is not None
        try:
            async with asyncio.timeout(30):
                line = await child.stdout.readline()
        except TimeoutError:
            line = b""
        if not line:
            child.kill()
            await child.wait()
            raise AssertionError(f"the gRPC xDS client printed nothing:\n{errors.read_text()[-3000:]}")
        result = json.loads(line)
        counts = result["counts"]
        # Calls succeeded, and round robin spread them over every endpoint.
        assert sum(counts.values()) == CALLS
        assert sorted(counts) == ["greeter-0", "greeter-1", "greeter-2"]
        assert min(counts.values()) >= CALLS // 3 - 1

        statuses = await csds_statuses(result["csds_port"])
        assert {t.rsplit(".", 1)[-1] for t, _, _ in statuses} == {
            "Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment"}
        assert all(status == "ACKED" for _, _, status in statuses), statuses

        node = cache.node_status(NODE)
        assert node is not None and node.connected and node.synced()
        for type_url in (LISTENER, ROUTE, CLUSTER, ENDPOINT):
            assert node.types[type_url].acked_version == snapshot.version(type_url)
            assert node.types[type_url].last_nack is None

        # An endpoint leaves (EDS push): once gRPC ACKs it, calls go to the other two only.
        fewer = greeter_snapshot(greeters.ports[:2])
        cache.set_snapshot(NODE, fewer)
        assert await cache.wait_acked(NODE, ENDPOINT, fewer.version(ENDPOINT), 10)
        child.stdin.write(b"again\n")
        async with asyncio.timeout(30):
            again = json.loads(await child.stdout.readline())
        assert sorted(again["counts"]) == ["greeter-0", "greeter-1"]
        child.stdin.close()
        async with asyncio.timeout(10):
            assert await child.wait() == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await server.stop(None)


async def csds_statuses(port: int) -> list[tuple[str, str, str]]:
    """(type URL, name, client_status) of every xDS resource in the client's CSDS dump."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        response = await stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=5)
    out = []
    for config in response.config:
        for generic in config.generic_xds_configs:
            status = config_dump_shared_pb2.ClientResourceStatus.Name(generic.client_status)
            out.append((generic.type_url, generic.name, status))
    return out


def test_resources_compile_with_meshlets_compiler() -> None:
    """What the proxyless client gets is plain Envoy config that meshlet compiles too
    (except the API listener, which only gRPC clients use)."""
    snapshot = greeter_snapshot([5001, 5002])
    messages = {t: {n: _unpack(r.body) for n, r in snapshot.resources(t).items()} for t in (ROUTE, ENDPOINT)}
    with compiling(CompileContext(regex=regex_engine())):
        assignment = compile_resource(ENDPOINT, messages[ENDPOINT]["greeter-cluster"], "eds")
        routes = compile_resource(ROUTE, messages[ROUTE]["greeter-route"], "rds")
    dynamic = DynamicResources(load_assignments={"greeter-cluster": assignment})  # type: ignore[dict-item]
    with compiling(CompileContext(regex=regex_engine(), dynamic=dynamic)):
        cluster_message = _unpack(snapshot.resources(CLUSTER)["greeter-cluster"].body)
        compiled = compile_resource(CLUSTER, cluster_message, "cds")
    assert compiled.load_assignment is assignment
    assert routes.name == "greeter-route"


def _unpack(body: Any) -> Any:
    from meshlet.config.loader import new_message

    message = new_message(body.type_url)
    assert body.Unpack(message)
    return message
