"""The proxy's ADS client: one gRPC stream to the management server, SotW or delta.

It subscribes to listeners and clusters (wildcard) and to the routes,
endpoints and secrets they name; each response is compiled with the rest of
the accepted resources into a whole ``ProxyConfig`` (``ConfigAssembler``) and
applied to the running proxy atomically. Success is ACKed; a compile or apply
failure is NACKed with the ``ConfigError`` text and the old config keeps
serving. When the stream fails (the control plane restarts) the proxy keeps
its last good config and reconnects with jittered exponential back-off; on
reconnect it tells the server what it has (SotW ``version_info``, delta
``initial_resource_versions``) so nothing is resent needlessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import DecodeError, Message

from meshlet.config.fields import key
from meshlet.config.loader import new_message
from meshlet.config.model import ProxyConfig
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.xds.assembly import REFERENCED_TYPES, ConfigAssembler, Received, short
from meshlet.xds.snapshot import CLUSTER, FULL_STATE_TYPES, LISTENER, resource_name

log = logging.getLogger(__name__)

# google.rpc.Code INVALID_ARGUMENT, the code of a NACK's error_detail.
_INVALID_ARGUMENT = 3
_MAX_ERROR = 4096
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


class ConfigTarget(Protocol):
    """What the client drives: ``meshlet.proxy.server.Proxy``."""

    async def apply(self, config: ProxyConfig) -> None: ...


@dataclass
class Backoff:
    """Jittered exponential back-off between reconnect attempts."""

    base: float = 0.25
    cap: float = 10.0
    rand: Callable[[], float] = random.random
    _attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        jitter: float = self.rand()
        return ceiling / 2 + ceiling / 2 * jitter

    def reset(self) -> None:
        self._attempt = 0


@dataclass
class _TypeState:
    version: str = ""  # SotW: the last accepted version_info
    nonce: str = ""  # the last response's nonce
    names: frozenset[str] = field(default_factory=frozenset)


def server_target(config: ProxyConfig) -> str:
    """``host:port`` of the management server: the first endpoint of the ADS cluster."""
    if config.ads is None:
        raise ConfigError("dynamic_resources", "is not set")
    cluster = config.clusters[config.ads.cluster]
    path = key("static_resources.clusters", cluster.name)
    if cluster.transport_socket.name != "envoy.transport_sockets.raw_buffer":
        raise UnsupportedConfig(
            f"{path}.transport_socket", "TLS to the management server is not supported yet"
        )
    endpoints = cluster.load_assignment.all_endpoints() if cluster.load_assignment else ()
    if not endpoints:
        raise ConfigError(f"{path}.load_assignment", "the ADS cluster has no endpoint")
    address = endpoints[0].address
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"


class AdsClient:
    """Keeps ``target`` (the proxy) configured from the ADS server of ``static.ads``."""

    def __init__(
        self,
        target: ConfigTarget,
        static: ProxyConfig,
        *,
        backoff: Backoff | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        if static.ads is None:
            raise ConfigError("dynamic_resources", "is not set")
        self._target = target
        self._ads = static.ads
        self._address = server_target(static)
        self._node = base_pb2.Node(id=static.node_id, cluster=static.node_cluster, user_agent_name="meshlet")
        self.assembler = ConfigAssembler(static)
        self._backoff = backoff or Backoff()
        self._connect_timeout = connect_timeout
        self._types: dict[str, _TypeState] = {}
        # SotW version_info last accepted per type; kept across reconnects.
        self._accepted_versions: dict[str, str] = {}
        self._outbox: asyncio.Queue[Any] | None = None
        self.connected = asyncio.Event()
        # Set once the first listeners and clusters, and all they name, are applied.
        self.initialized = asyncio.Event()
        self._received_types: set[str] = set()
        self.responses_handled = 0

    # -- lifecycle ------------------------------------------------------------ #

    async def run(self) -> None:
        """Stream, and reconnect after every failure, until cancelled."""
        while True:
            try:
                await self._session()
                log.warning("ADS stream to %s ended; reconnecting", self._address)
            except (grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                log.warning("ADS stream to %s failed: %s", self._address, _describe(exc))
            except Exception:  # a bug must not leave the proxy without updates for ever
                log.exception("ADS stream to %s broke; reconnecting", self._address)
            finally:
                self.connected.clear()
            await asyncio.sleep(self._backoff.next_delay())

    async def _session(self) -> None:
        async with grpc.aio.insecure_channel(self._address, options=_CHANNEL_OPTIONS) as channel:
            await asyncio.wait_for(channel.channel_ready(), self._connect_timeout)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            self._outbox = asyncio.Queue()
            self._types = {}
            method = stub.DeltaAggregatedResources if self._ads.delta else stub.StreamAggregatedResources
            call = method(self._requests(self._outbox))
            self._subscribe_all()
            self.connected.set()
            log.info("ADS stream to %s open (%s)", self._address, "delta" if self._ads.delta else "sotw")
            try:
                async for response in call:
                    self._backoff.reset()
                    if self._ads.delta:
                        await self._on_delta(response)
                    else:
                        await self._on_sotw(response)
                    self.responses_handled += 1
            finally:
                call.cancel()

    async def _requests(self, outbox: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        first = True
        while True:
            request = await outbox.get()
            if first:
                request.node.CopyFrom(self._node)
                first = False
            yield request

    def _send(self, request: Message) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(request)

    # -- subscriptions ---------------------------------------------------------- #

    def _subscribe_all(self) -> None:
        """The opening requests: wildcard LDS/CDS, then the names they refer to."""
        wildcard = [t for t, on in ((CLUSTER, self._ads.cds), (LISTENER, self._ads.lds)) if on]
        for type_url in wildcard:
            self._subscribe(type_url, frozenset())
        wanted = self.assembler.wanted(self.assembler.accepted)
        for type_url in REFERENCED_TYPES:
            if wanted[type_url]:
                self._subscribe(type_url, wanted[type_url])

    def _subscribe(self, type_url: str, names: frozenset[str]) -> None:
        state = self._types.get(type_url)
        have = self.assembler.accepted.get(type_url, {})
        if state is None:
            # Resume at the accepted version only when it holds every name wanted now:
            # the server sends nothing for a version the proxy says it has.
            complete = not names or names <= have.keys()
            resume = self._accepted_versions.get(type_url, "") if complete else ""
            state = self._types[type_url] = _TypeState(version=resume)
            if self._ads.delta:
                self._send(discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url,
                    resource_names_subscribe=sorted(names),
                    initial_resource_versions={n: r.version for n, r in have.items()},
                ))
                state.names = names
                return
        elif self._ads.delta:
            self._send(discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                resource_names_subscribe=sorted(names - state.names),
                resource_names_unsubscribe=sorted(state.names - names),
            ))
            state.names = names
            return
        state.names = names
        self._send(discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=sorted(names), version_info=state.version,
            response_nonce=state.nonce,
        ))

    def _follow_references(self) -> None:
        """Subscribe to the RDS/EDS/SDS names the accepted listeners and clusters use now."""
        wanted = self.assembler.wanted(self.assembler.accepted)
        for type_url in REFERENCED_TYPES:
            state = self._types.get(type_url)
            names = wanted[type_url]
            if (state is None and names) or (state is not None and state.names != names):
                self._subscribe(type_url, names)
        self.assembler.prune(wanted)

    # -- responses --------------------------------------------------------------- #

    async def _on_sotw(self, response: discovery_pb2.DiscoveryResponse) -> None:
        type_url = response.type_url
        state = self._types.setdefault(type_url, _TypeState())
        state.nonce = response.nonce
        try:
            updated = _decode(type_url, [(None, r) for r in response.resources])
            full_state = type_url in FULL_STATE_TYPES
            candidate = self.assembler.with_update(
                type_url, updated, lambda _name: response.version_info, full_state=full_state
            )
            await self._apply(candidate)
        except ConfigError as exc:
            self._nack_sotw(type_url, state, exc)
            return
        state.version = self._accepted_versions[type_url] = response.version_info
        self._send(discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=sorted(state.names), version_info=state.version,
            response_nonce=state.nonce,
        ))
        self._follow_references()
        self._note_applied(type_url)

    def _nack_sotw(self, type_url: str, state: _TypeState, exc: ConfigError) -> None:
        log.warning("rejected %s from %s: %s", short(type_url), self._address, exc)
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=sorted(state.names), version_info=state.version,
            response_nonce=state.nonce,
        )
        request.error_detail.code = _INVALID_ARGUMENT
        request.error_detail.message = str(exc)[:_MAX_ERROR]
        self._send(request)

    async def _on_delta(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        type_url = response.type_url
        state = self._types.setdefault(type_url, _TypeState())
        state.nonce = response.nonce
        versions = {r.name: r.version for r in response.resources}
        try:
            updated = _decode(type_url, [(r.name, r.resource) for r in response.resources])
            candidate = self.assembler.with_update(
                type_url, updated, lambda name: versions.get(name, ""), removed=response.removed_resources
            )
            await self._apply(candidate)
        except ConfigError as exc:
            log.warning("rejected %s from %s: %s", short(type_url), self._address, exc)
            request = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
            request.error_detail.code = _INVALID_ARGUMENT
            request.error_detail.message = str(exc)[:_MAX_ERROR]
            self._send(request)
            return
        self._send(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce))
        self._follow_references()
        self._note_applied(type_url)

    async def _apply(self, candidate: dict[str, dict[str, Received]]) -> None:
        """Build and apply; any failure becomes a ConfigError (a NACK) and changes nothing."""
        try:
            config = self.assembler.build(candidate)
        except ConfigError:
            raise
        except Exception as exc:  # the compiler failing otherwise is still this config's rejection
            log.exception("compiling the config from %s failed", self._address)
            raise ConfigError("", f"cannot compile: {exc}") from exc
        try:
            await self._target.apply(config)
        except ConfigError:
            raise
        except Exception as exc:  # a listener that cannot bind, a socket error: the proxy's reason
            raise ConfigError("", f"cannot apply: {exc}") from exc
        self.assembler.commit(candidate, config)

    def _note_applied(self, type_url: str) -> None:
        self._received_types.add(type_url)
        if self.initialized.is_set():
            return
        needed = [t for t, on in ((LISTENER, self._ads.lds), (CLUSTER, self._ads.cds)) if on]
        if not all(t in self._received_types for t in needed):
            return
        wanted = self.assembler.wanted(self.assembler.accepted)
        if all(wanted[t] <= self.assembler.accepted.get(t, {}).keys() for t in REFERENCED_TYPES):
            self.initialized.set()

    async def wait_initialized(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for the first complete config; False if it did not come."""
        try:
            async with asyncio.timeout(timeout):
                await self.initialized.wait()
        except TimeoutError:
            return False
        return True


def _decode(type_url: str, items: list[tuple[str | None, Any]]) -> dict[str, Message]:
    """Unpack ``Any``-packed resources of ``type_url`` by name."""
    out: dict[str, Message] = {}
    for i, (name, body) in enumerate(items):
        where = f"resources[{i}]" if name is None else key("resources", name)
        if body.type_url != type_url:
            raise ConfigError(where, f"is a {body.type_url}, not a {type_url}")
        message = new_message(type_url, where)
        try:
            message.ParseFromString(body.value)
        except DecodeError as exc:
            raise ConfigError(where, f"cannot decode: {exc}") from None
        try:
            resource_key = name or resource_name(message)
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None
        if resource_key in out:
            raise ConfigError(where, f"duplicate resource {resource_key!r}")
        out[resource_key] = message
    return out


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


async def run_client(client: AdsClient) -> None:
    """``client.run()`` until cancelled, logging (never raising) an unexpected crash."""
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await client.run()
        except Exception:
            log.exception("the ADS client stopped")
