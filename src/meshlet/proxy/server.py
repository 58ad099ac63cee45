"""The proxy process: config application, lifecycle, signals.

``Proxy.apply`` swaps a whole ``ProxyConfig`` atomically: everything the new
config needs (listener runtimes with their transport socket factories and
connection managers, new listening sockets, the cluster set) is built first;
if any of it fails the old config keeps serving and the ``ConfigError``
propagates. Only then is the new config swapped in.

Shutdown (SIGTERM, SIGINT, admin ``/quitquitquit``) is graceful: listeners
stop accepting, in-flight requests finish within ``drain_time``, connections
still open after that are closed, then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from meshlet.config.model import ProxyConfig, SocketAddress
from meshlet.proxy.admin import AdminServer
from meshlet.proxy.listeners.manager import AppBuilder, ListenerManager, build_network_app
from meshlet.proxy.observe.access_log import WRITERS
from meshlet.proxy.runtime import ProxyRuntime, ProxySettings
from meshlet.proxy.upstream.manager import ClusterManager

log = logging.getLogger(__name__)

PRE_INITIALIZING = "PRE_INITIALIZING"
LIVE = "LIVE"
DRAINING = "DRAINING"
TERMINATED = "TERMINATED"


class Proxy:
    """One proxy: listeners, clusters, admin. Create, ``apply`` a config, ``start``."""

    def __init__(
        self,
        settings: ProxySettings | None = None,
        *,
        admin_port: int | None = None,
        app_builder: AppBuilder = build_network_app,
    ) -> None:
        self.runtime = ProxyRuntime(settings)
        self.clusters = ClusterManager(self.runtime)
        self.runtime.clusters = self.clusters
        self.listeners = ListenerManager(self.runtime, app_builder=app_builder)
        self._admin_port = admin_port
        self._admin: AdminServer | None = None
        self._config: ProxyConfig | None = None
        self._applied_at = 0.0
        self._state = PRE_INITIALIZING
        self._apply_lock = asyncio.Lock()
        # One event for the proxy's whole life: start() must not replace it, or a
        # stop that happened while starting would be forgotten.
        self._stopped = asyncio.Event()
        self._shutdown: asyncio.Task[None] | None = None
        # A shutdown asked for before start() finished (a signal during apply):
        # carried out as soon as the listeners are up, so none is left serving.
        self._shutdown_pending = False
        self._drain_task: asyncio.Task[bool] | None = None
        stats = self.runtime.stats
        self._state_gauge = stats.gauge("server.state")
        self._live_gauge = stats.gauge("server.live")
        self._config_ok = stats.counter("server.config_update_success")
        self._config_rejected = stats.counter("server.config_update_rejected")
        self._uptime = stats.gauge("server.uptime")
        self._total_connections = stats.gauge("server.total_connections")

    # -- AdminTarget ------------------------------------------------------ #

    @property
    def state(self) -> str:
        return self._state

    @property
    def config(self) -> ProxyConfig | None:
        return self._config

    @property
    def config_applied_at(self) -> float:
        return self._applied_at

    def listener_info(self) -> list[dict[str, object]]:
        return self.listeners.describe()

    def cluster_info(self) -> dict[str, dict[str, object]]:
        return self.clusters.describe()

    def refresh_stats(self) -> None:
        self._uptime.set(int(time.time() - self.runtime.started_at))
        self._total_connections.set(self.listeners.active_connections)

    async def drain_listeners(self, *, graceful: bool) -> None:
        """Admin ``/drain_listeners``: stop accepting; with ``graceful`` also
        drain the open connections (in the background, bounded by drain_time)."""
        if not graceful:
            self.listeners.stop_accepting()
            return
        self._set_state(DRAINING)
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(
                self.listeners.drain(self.runtime.settings.drain_time)
            )

    def request_shutdown(self) -> None:
        """Graceful drain, then stop (signals and ``/quitquitquit``). Idempotent."""
        if self._state == PRE_INITIALIZING:
            self._shutdown_pending = True
            return
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self._drain_then_stop())

    # -- lifecycle -------------------------------------------------------- #

    async def apply(self, config: ProxyConfig) -> None:
        """Build everything for ``config``, then swap it in; on error nothing changes."""
        async with self._apply_lock:
            try:
                update = await self.listeners.prepare(config.listeners)
            except Exception:
                self._config_rejected.inc()
                raise
            try:
                self.clusters.update(config.clusters)
            except Exception:
                self.listeners.abort(update)
                self._config_rejected.inc()
                raise
            await self.listeners.commit(update)
            self._config = config
            self._applied_at = time.time()
            self._config_ok.inc()

    async def start(self) -> None:
        """Serve the applied config's listeners and the admin endpoint."""
        await self.listeners.start()
        await self._start_admin()
        self._set_state(LIVE)
        if self._shutdown_pending:
            self.request_shutdown()

    async def _start_admin(self) -> None:
        config = self._config
        address = config.admin.address if config is not None and config.admin is not None else None
        if self._admin_port is not None:
            address = SocketAddress(address.host if address else "127.0.0.1", self._admin_port)
        if address is None:
            return
        self._admin = AdminServer(self, address)
        host, port = await self._admin.start()
        log.info("admin endpoint on %s:%s", host, port)

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return self._admin.bound if self._admin is not None else None

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting and let in-flight requests finish, at most ``timeout``
        (default: the drain time). True when every connection ended in time."""
        self._set_state(DRAINING)
        self.runtime.draining = True
        bound = self.runtime.settings.drain_time if timeout is None else timeout
        return await self.listeners.drain(bound)

    async def stop(self) -> None:
        """Close everything now (after ``drain`` for a graceful stop)."""
        if self._drain_task is not None:
            self._drain_task.cancel()
            await asyncio.gather(self._drain_task, return_exceptions=True)
        await self.listeners.close()
        self.clusters.close()
        # Access-log lines are buffered; write out what the last requests logged.
        await WRITERS.flush()
        if self._admin is not None:
            await self._admin.close()
        self._set_state(TERMINATED)
        self._stopped.set()

    async def _drain_then_stop(self) -> None:
        try:
            clean = await self.drain()
            log.info("drain %s", "complete" if clean else "timed out; remaining connections closed")
        finally:
            await self.stop()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _set_state(self, state: str) -> None:
        self._state = state
        self._live_gauge.set(1 if state == LIVE else 0)
        # Envoy's server.state: 0 live, 1 draining, 2 pre-initializing, 3 initializing.
        self._state_gauge.set({LIVE: 0, DRAINING: 1, PRE_INITIALIZING: 2}.get(state, 1))

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s: draining, then exiting", sig.name)
        self.request_shutdown()


def _settings(
    config: ProxyConfig, overrides: Mapping[str, str | None], drain_time: float | None
) -> ProxySettings:
    base = ProxySettings()
    merged = {**config.settings, **{k: v for k, v in overrides.items() if v}}
    return ProxySettings(
        tls_engine=merged.get("tls_engine", base.tls_engine),
        regex_engine=merged.get("regex_engine", base.regex_engine),
        drain_time=drain_time if drain_time is not None else float(merged.get("drain_time", base.drain_time)),
    )


async def serve(
    config_path: str | Path,
    *,
    admin_port: int | None = None,
    tls_engine: str | None = None,
    regex_engine: str | None = None,
    drain_time: float | None = None,
) -> None:
    """Load the bootstrap, run the proxy until a signal or ``/quitquitquit``."""
    from meshlet.config.compiler import load_proxy_config

    overrides = {"tls_engine": tls_engine, "regex_engine": regex_engine}
    config = load_proxy_config(str(config_path), settings_overrides={k: v for k, v in overrides.items() if v})
    proxy = Proxy(_settings(config, overrides, drain_time), admin_port=admin_port)
    proxy.install_signal_handlers()
    xds: asyncio.Task[None] | None = None
    try:
        await proxy.apply(config)
        xds = await _start_xds(proxy, config)
        await proxy.start()
    except BaseException:
        await _stop_xds(xds)
        await proxy.stop()
        raise
    for name in config.listeners:
        log.info("listener %s on %s", name, proxy.listeners.address(name))
    try:
        await proxy.wait_stopped()
    finally:
        await _stop_xds(xds)


# How long a proxy with dynamic_resources waits for its first config over ADS before
# it starts anyway (Envoy's initial_fetch_timeout default).
INITIAL_FETCH_TIMEOUT = 15.0


async def _start_xds(proxy: Proxy, config: ProxyConfig) -> asyncio.Task[None] | None:
    """With ``dynamic_resources`` in the bootstrap: the ADS client in the background, and
    a (bounded) wait for its first complete config so the proxy is ready when it is live."""
    if config.ads is None:
        return None
    from meshlet.xds.client import AdsClient, run_client

    client = AdsClient(proxy, config)
    task = asyncio.get_running_loop().create_task(run_client(client))
    if not await client.wait_initialized(INITIAL_FETCH_TIMEOUT):
        log.warning("no complete config over ADS within %s s; starting with what there is",
                    INITIAL_FETCH_TIMEOUT)
    return task


async def _stop_xds(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run(
    config_path: str | Path,
    *,
    admin_port: int | None = None,
    log_level: str = "info",
    tls_engine: str | None = None,
    regex_engine: str | None = None,
    drain_time: float | None = None,
    event_loop: str = "uvloop",
) -> None:
    """The ``meshlet proxy`` entry point: uvloop, then ``serve`` until shut down.

    ``log_level`` is configured by the caller (the CLI); it is accepted here so
    the CLI can pass its options through unchanged. ``event_loop="asyncio"``
    runs on the stdlib loop (for comparison and debugging).
    """
    if event_loop == "uvloop":
        _install_uvloop()
    elif event_loop != "asyncio":
        raise ValueError(f"unknown event loop {event_loop!r} (uvloop, asyncio)")
    asyncio.run(serve(
        config_path, admin_port=admin_port, tls_engine=tls_engine, regex_engine=regex_engine,
        drain_time=drain_time,
    ))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # the stdlib loop works, only slower
        log.warning("uvloop is not installed; using the default asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    """``python -m meshlet.proxy.server --config FILE [--admin-port N] [--drain-time S]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m meshlet.proxy.server")
    parser.add_argument("--config", required=True)
    parser.add_argument("--admin-port", type=int)
    parser.add_argument("--drain-time", type=float)
    parser.add_argument("--tls-engine")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args.config, admin_port=args.admin_port, drain_time=args.drain_time, tls_engine=args.tls_engine,
        event_loop=args.loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
