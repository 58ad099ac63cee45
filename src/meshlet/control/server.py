"""The control-plane process: the store, the registry, the resource API and
the gRPC server that the xDS and CA services mount into.

    plane = ControlPlane(ControlPlaneSettings(store_url="sqlite:.meshlet/meshlet.db"))
    await plane.open()                       # store, registry, gRPC server (not yet serving)
    add_AggregatedDiscoveryServiceServicer_to_server(ads, plane.grpc_server)
    await plane.start()                      # resource API and gRPC start listening
    ...
    await plane.stop()

Other parts attach with a mount: ``async def mount(plane: ControlPlane) -> None``
that adds its servicers to ``plane.grpc_server`` and may register
``plane.on_stop`` callbacks. ``meshlet control-plane run --mount module:function``
runs named mounts; ``DEFAULT_MOUNTS`` are run when importable.

Several replicas may share one etcd cluster: each serves the same config
because all state lives in the store and each reads it through watches.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import grpc

from meshlet.control.api import ResourceApi
from meshlet.control.registry import RegistrationTokens, Registry, TokenRedeemer
from meshlet.control.store import DEFAULT_STORE_URL, Store, open_store
from meshlet.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_API_PORT = 15080
DEFAULT_XDS_PORT = 15010
GRPC_GRACE = 2.0
STOP_TIMEOUT = 10.0

Mount = Callable[["ControlPlane"], Awaitable[None]]
StopHook = Callable[[], Awaitable[None]]

# Mounts run by ``meshlet control-plane run`` when their module imports:
# "package.module:function" of an async ``Mount``. xDS: ADS fed by the
# config pusher over the store.
DEFAULT_MOUNTS: tuple[str, ...] = ("meshlet.control.push:mount_xds",)


@dataclass(frozen=True, slots=True)
class ControlPlaneSettings:
    store_url: str = DEFAULT_STORE_URL
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    xds_host: str = "127.0.0.1"
    xds_port: int = DEFAULT_XDS_PORT
    # Workloads reported HEALTHY but silent this long are marked UNHEALTHY (0: never).
    health_timeout: float = 30.0
    # gRPC options for the xDS server (large snapshots need a large limit).
    grpc_options: tuple[tuple[str, int], ...] = field(default=(
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ))


class ControlPlane:
    def __init__(self, settings: ControlPlaneSettings, *, tokens: TokenRedeemer | None = None) -> None:
        self.settings = settings
        self.tokens = tokens if tokens is not None else RegistrationTokens.in_memory()
        self._store: Store | None = None
        self._registry: Registry | None = None
        self._api: ResourceApi | None = None
        self._grpc: grpc.aio.Server | None = None
        self.xds_port: int | None = None
        self.on_stop: list[StopHook] = []
        self._stopped = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    # -- what mounts use ------------------------------------------------------- #

    @property
    def store(self) -> Store:
        return _opened(self._store)

    @property
    def registry(self) -> Registry:
        return _opened(self._registry)

    @property
    def api(self) -> ResourceApi:
        return _opened(self._api)

    @property
    def grpc_server(self) -> grpc.aio.Server:
        return _opened(self._grpc)

    # -- life cycle --------------------------------------------------------------- #

    async def open(self) -> None:
        """Open the store and create (not start) the servers, so mounts can add services."""
        self._store = await open_store(self.settings.store_url)
        self._registry = Registry(self._store, self.tokens)
        self._api = ResourceApi(self._store, self._registry, host=self.settings.api_host,
                                port=self.settings.api_port)
        self._grpc = grpc.aio.server(options=list(self.settings.grpc_options))
        address = f"{self.settings.xds_host}:{self.settings.xds_port}"
        try:
            self.xds_port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            await self._store.close()
            raise ConfigError("xds.address", f"cannot listen on {address}: {exc}") from None

    async def mount(self, mounts: Sequence[Mount]) -> None:
        for attach in mounts:
            await attach(self)

    async def start(self) -> None:
        await self.api.start()
        await self.grpc_server.start()
        if self.settings.health_timeout > 0:
            self._sweeper = asyncio.create_task(self._sweep_silent_workloads(), name="health-sweeper")
        log.info("control plane: resource API on %s, xDS gRPC on %s:%s, store %s",
                 self.api.url, self.settings.xds_host, self.xds_port, self.settings.store_url)

    async def stop(self) -> None:
        """Stop serving and close the store; every step bounded in time."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for hook in reversed(self.on_stop):
            try:
                await asyncio.wait_for(hook(), STOP_TIMEOUT)
            except Exception:
                log.exception("control plane stop hook failed")
        if self._grpc is not None:
            await asyncio.wait_for(self._grpc.stop(GRPC_GRACE), STOP_TIMEOUT)
        if self._api is not None:
            await self._api.close()
        if self._store is not None:
            await self._store.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _sweep_silent_workloads(self) -> None:
        timeout = timedelta(seconds=self.settings.health_timeout)
        period = max(0.5, self.settings.health_timeout / 3)
        while True:
            await asyncio.sleep(period)
            try:
                marked = await asyncio.wait_for(self.registry.mark_silent_unhealthy(timeout), STOP_TIMEOUT)
            except Exception as exc:  # the store may be briefly unreachable: try next period
                log.warning("health sweep failed: %s", exc)
                continue
            for name in marked:
                log.info("workload %s: no health report for %ss, marked UNHEALTHY", name,
                         self.settings.health_timeout)


def load_mount(target: str) -> Mount:
    """The mount named ``package.module:function``."""
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ConfigError("mount", f"{target!r} is not module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("mount", f"cannot import {module_name}: {exc}") from None
    mount = getattr(module, attr, None)
    if not callable(mount):
        raise ConfigError("mount", f"{module_name} has no function {attr!r}")
    return mount  # type: ignore[no-any-return]


def available_default_mounts() -> list[Mount]:
    mounts: list[Mount] = []
    for target in DEFAULT_MOUNTS:
        try:
            mounts.append(load_mount(target))
        except ConfigError as exc:
            log.info("mount %s not available: %s", target, exc.message)
    return mounts


def _opened(value: T | None) -> T:
    if value is None:
        raise RuntimeError("the control plane is not open (call open() first)")
    return value
