"""Test helpers: Envoy resources and a raw ADS client stream over a real grpc.aio channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

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
