"""The ADS gRPC service (``envoy.service.discovery.v3.AggregatedDiscoveryService``) on ``grpc.aio``.

A thin adapter: each stream reads requests and watches its node's snapshot in
the cache, and hands both to the sans-IO ``SotwStream`` / ``DeltaStream``,
writing whatever responses they produce. Add it to a ``grpc.aio.Server`` with
``add_ads_servicer(server, cache)``; ``start_ads_server`` runs a standalone one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshlet.xds.cache import DELTA, SOTW, NodeStatus, SnapshotCache
from meshlet.xds.snapshot import Snapshot
from meshlet.xds.streams import DeltaStream, Outgoing, SotwStream, StreamError

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

# Responses being handed to gRPC at once, over all streams (see ``_write``).
MAX_CONCURRENT_WRITES = 64
# A proxy that sends nothing for this long after opening its stream is dropped.
FIRST_REQUEST_TIMEOUT = 30.0
# Keepalive for the server: ADS streams live for hours, and a peer that vanished
# without closing its TCP connection must not keep its stream (and watch) forever.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)


class _Stream(Protocol):
    status: NodeStatus

    def on_request(self, request: Any, snapshot: Snapshot | None) -> list[Outgoing]: ...

    def on_snapshot(self, snapshot: Snapshot | None) -> list[Outgoing]: ...


class AggregatedDiscoveryService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """SotW and delta ADS over one ``SnapshotCache``."""

    def __init__(self, cache: SnapshotCache, *, max_concurrent_writes: int = MAX_CONCURRENT_WRITES) -> None:
        self.cache = cache
        self._writes = asyncio.Semaphore(max_concurrent_writes)

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await self._serve(SOTW, lambda status: SotwStream(self.cache, status), request_iterator, context)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await self._serve(DELTA, lambda status: DeltaStream(self.cache, status), request_iterator, context)

    async def _serve(
        self,
        protocol: str,
        make_stream: Callable[[NodeStatus], _Stream],
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        try:
            async with asyncio.timeout(FIRST_REQUEST_TIMEOUT):
                first = await anext(requests)
        except (StopAsyncIteration, TimeoutError):
            return
        if not first.HasField("node") or not first.node.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
        status = self.cache.stream_opened(first.node, protocol)
        log.info("node %s connected (%s, %s)", status.node_id, protocol, context.peer())
        try:
            await self._pump(make_stream(status), status.group, first, requests, context)
        except StreamError as exc:
            log.warning("node %s: %s", status.node_id, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            self.cache.stream_closed(status)
            log.info("node %s disconnected", status.node_id)

    async def _pump(
        self,
        stream: _Stream,
        group: str,
        first: Any,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        watch = self.cache.watch(group)
        next_request: asyncio.Future[Any] = asyncio.ensure_future(anext(requests))
        changed = asyncio.ensure_future(watch.changed.wait())
        try:
            for response in stream.on_request(first, self.cache.snapshot(group)):
                await self._write(context, response)
            while True:
                await asyncio.wait((next_request, changed), return_when=asyncio.FIRST_COMPLETED)
                responses: list[Outgoing] = []
                if next_request.done():
                    try:
                        request = next_request.result()
                    except StopAsyncIteration:
                        return
                    responses += stream.on_request(request, self.cache.snapshot(group))
                    next_request = asyncio.ensure_future(anext(requests))
                if changed.done():
                    watch.changed.clear()
                    responses += stream.on_snapshot(self.cache.snapshot(group))
                    changed = asyncio.ensure_future(watch.changed.wait())
                for response in responses:
                    await self._write(context, response)
        finally:
            watch.close()
            for task in (next_request, changed):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


    async def _write(self, context: grpc.aio.ServicerContext[Any, Any], response: Outgoing) -> None:
        # A push reaches thousands of streams at once; bounding the writes in flight
        # bounds the response copies alive at once, and so the control plane's memory.
        async with self._writes:
            await context.write(response.encode())


def add_ads_servicer(server: grpc.aio.Server, cache: SnapshotCache) -> AggregatedDiscoveryService:
    """Serve ADS from ``cache`` on ``server`` (before ``server.start()``)."""
    servicer = AggregatedDiscoveryService(cache)
    server.add_generic_rpc_handlers((_handlers(servicer),))
    return servicer


def _handlers(servicer: AggregatedDiscoveryService) -> grpc.GenericRpcHandler:
    """The ADS methods with requests parsed as usual and responses written as the bytes the
    streams produce: a snapshot's serialized responses are shared by its streams, never
    re-encoded per proxy."""
    return grpc.method_handlers_generic_handler(SERVICE, {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.StreamAggregatedResources,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=bytes,
        ),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.DeltaAggregatedResources,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=bytes,
        ),
    })


async def start_ads_server(cache: SnapshotCache, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """A started ``grpc.aio`` server with only ADS on it, and its bound port."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_ads_servicer(server, cache)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port
