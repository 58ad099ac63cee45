"""Fetch what an ADS server serves one node, as that node would see it (``meshlet xds dump``).

A state-of-the-world stream subscribes to every listener and cluster, then to
the routes, endpoints and secrets they name, ACKs every response, and stops
once each subscribed type has answered and the server has been quiet for a
moment (or at the deadline). Nothing is compiled: the resources come back as
served, so config meant for other clients (a gRPC API listener) shows too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from meshlet.config.compiler import redact
from meshlet.config.loader import new_message
from meshlet.xds.assembly import REFERENCED_TYPES
from meshlet.xds.deps import cluster_refs, listener_refs
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, FULL_STATE_TYPES, LISTENER, ROUTE, SECRET, resource_name

KINDS = {
    LISTENER: "listeners", ROUTE: "routes", CLUSTER: "clusters", ENDPOINT: "endpoints", SECRET: "secrets",
}


class DumpError(Exception):
    """The server could not be reached or broke the stream."""


async def fetch_resources(
    address: str, node_id: str, *, node_cluster: str = "", timeout: float = 10.0, quiet: float = 0.5
) -> dict[str, dict[str, Message]]:
    """Resources by type URL and name that ``address`` serves to ``node_id``."""
    fetcher = _Fetcher(base_pb2.Node(id=node_id, cluster=node_cluster, user_agent_name="meshlet-xds-dump"))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout)
            await asyncio.wait_for(fetcher.run(channel, quiet), timeout)
    except TimeoutError:
        if not fetcher.answered:
            raise DumpError(f"no answer from {address} within {timeout} s") from None
    except grpc.aio.AioRpcError as exc:
        raise DumpError(f"{address}: {exc.code().name}: {exc.details()}") from None
    return fetcher.resources


def as_documents(resources: dict[str, dict[str, Message]]) -> dict[str, Any]:
    """JSON/YAML-ready: ``{kind: {name: resource}}``, private keys redacted."""
    return {
        KINDS[type_url]: {
            name: redact(json_format.MessageToDict(msg, preserving_proto_field_name=True))
            for name, msg in sorted(resources.get(type_url, {}).items())
        }
        for type_url in KINDS
    }


class _Fetcher:
    def __init__(self, node: base_pb2.Node) -> None:
        self._node = node
        self._outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self._names: dict[str, frozenset[str]] = {}
        self._nonces: dict[str, str] = {}
        self._versions: dict[str, str] = {}
        self.resources: dict[str, dict[str, Message]] = {}
        self.answered: set[str] = set()

    async def run(self, channel: grpc.aio.Channel, quiet: float) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources(self._requests())
        for type_url in (CLUSTER, LISTENER):
            self._request(type_url, frozenset())
        try:
            while not self._complete():
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                self._on_response(response)
            # Everything subscribed has answered: wait a moment for stragglers.
            with contextlib.suppress(TimeoutError):
                while True:
                    response = await asyncio.wait_for(call.read(), quiet)
                    if response is grpc.aio.EOF:
                        return
                    self._on_response(response)
        finally:
            call.cancel()

    def _complete(self) -> bool:
        return set(self._names) <= self.answered

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        first = True
        while True:
            request = await self._outbox.get()
            if first:
                request.node.CopyFrom(self._node)
                first = False
            yield request

    def _request(self, type_url: str, names: frozenset[str]) -> None:
        self._names[type_url] = names
        self._outbox.put_nowait(discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=sorted(names), version_info=self._versions.get(type_url, ""),
            response_nonce=self._nonces.get(type_url, ""),
        ))

    def _on_response(self, response: discovery_pb2.DiscoveryResponse) -> None:
        type_url = response.type_url
        decoded = {}
        for body in response.resources:
            message = new_message(body.type_url)
            body.Unpack(message)
            decoded[resource_name(message)] = message
        if type_url in FULL_STATE_TYPES:
            self.resources[type_url] = decoded
        else:
            self.resources.setdefault(type_url, {}).update(decoded)
        self.answered.add(type_url)
        self._nonces[type_url] = response.nonce
        self._versions[type_url] = response.version_info
        self._request(type_url, self._names.get(type_url, frozenset()))  # the ACK
        self._follow_references()

    def _follow_references(self) -> None:
        refs = [listener_refs(m) for m in self.resources.get(LISTENER, {}).values()]
        refs += [cluster_refs(m) for m in self.resources.get(CLUSTER, {}).values()]
        wanted = {
            ROUTE: frozenset().union(*(r.routes for r in refs)),
            ENDPOINT: frozenset().union(*(r.endpoints for r in refs)),
            SECRET: frozenset().union(*(r.secrets for r in refs)),
        }
        for type_url in REFERENCED_TYPES:
            names = wanted[type_url]
            if names and names != self._names.get(type_url):
                self.answered.discard(type_url)
                self._request(type_url, names)
