"""Simulated proxies on real ADS streams, for control-plane benchmarks.

Each ``SimulatedProxy`` opens one ADS stream (SotW or delta) as its own node,
subscribes to every type by wildcard, and ACKs every response without
compiling it (the cost measured is the control plane's, not the proxies').
It records when each version of each type arrived, so a benchmark can set a
snapshot and time how long it takes to reach every proxy.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshlet.xds.snapshot import RESOURCE_TYPES

# Seconds before a failed stream is opened again (doubled at most, with jitter).
RECONNECT_DELAY = 0.2
# Subscriptions every simulated proxy holds.
DEFAULT_TYPES: tuple[str, ...] = RESOURCE_TYPES
# HTTP/2 stream window each simulated proxy asks for.
STREAM_WINDOW = 16 * 1024 * 1024


class SimulatedProxy:
    """One node on one ADS stream, ACKing everything; ``arrivals[(type_url, version)]`` is
    when that version arrived (``clock`` time)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        node_id: str,
        *,
        node_cluster: str = "",
        delta: bool = False,
        types: Sequence[str] = DEFAULT_TYPES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = base_pb2.Node(id=node_id, cluster=node_cluster, user_agent_name="meshlet-loadgen")
        self._channel = channel
        self._delta = delta
        self._types = tuple(types)
        self._clock = clock
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.arrivals: dict[tuple[str, str], float] = {}
        self.latest: dict[str, str] = {}
        self.error: BaseException | None = None
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def has(self, type_url: str, version: str) -> bool:
        return self.latest.get(type_url) == version

    async def _run(self) -> None:
        """Stream until stopped; a failed stream is opened again, as a real proxy would."""
        while True:
            await self._stream()
            self.reconnects += 1
            await asyncio.sleep(RECONNECT_DELAY * (1 + random.random()))

    async def _stream(self) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        method = stub.DeltaAggregatedResources if self._delta else stub.StreamAggregatedResources
        self._outbox = asyncio.Queue()
        call = method(self._requests(self._outbox))
        for type_url in self._types:
            self._outbox.put_nowait(self._subscription(type_url))
        try:
            async for response in call:
                self._on_response(response)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            call.cancel()

    def _subscription(self, type_url: str) -> Any:
        if self._delta:
            return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
        return discovery_pb2.DiscoveryRequest(type_url=type_url)

    def _on_response(self, response: Any) -> None:
        now = self._clock()
        type_url = response.type_url
        if self._delta:
            version = response.system_version_info
            ack: Any = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
        else:
            version = response.version_info
            ack = discovery_pb2.DiscoveryRequest(
                type_url=type_url, version_info=version, response_nonce=response.nonce
            )
        self.arrivals.setdefault((type_url, version), now)
        self.latest[type_url] = version
        self._outbox.put_nowait(ack)

    async def _requests(self, outbox: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        first = True
        while True:
            request = await outbox.get()
            if first:
                request.node.CopyFrom(self.node)
                first = False
            yield request


class Fleet:
    """Many simulated proxies sharing a few gRPC channels (as many hosts would not,
    but one process cannot open thousands of channels cheaply)."""

    def __init__(self, address: str, *, channels: int = 16) -> None:
        options = (
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            # Envoy grants its xDS streams large HTTP/2 windows (256 MiB by default), so a
            # large response is not held back by window updates; the simulated proxies too.
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW),
        )
        # Distinct channel args keep gRPC from sharing one subchannel between them.
        self._channels = [
            grpc.aio.insecure_channel(address, options=(*options, ("grpc.channel_id", i)))
            for i in range(channels)
        ]
        self.proxies: list[SimulatedProxy] = []

    def add(self, node_id: str, **kw: Any) -> SimulatedProxy:
        proxy = SimulatedProxy(self._channels[len(self.proxies) % len(self._channels)], node_id, **kw)
        self.proxies.append(proxy)
        proxy.start()
        return proxy

    async def wait_all(self, type_url: str, version: str, timeout: float) -> bool:
        """True once every proxy has ``version`` of ``type_url`` (False at the deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.has(type_url, version) for p in self.proxies):
                return True
            await asyncio.sleep(0.01)
        return all(p.has(type_url, version) for p in self.proxies)

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.proxies))
        await asyncio.gather(*(c.close() for c in self._channels))
