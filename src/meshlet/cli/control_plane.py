"""``meshlet control-plane run``: the control-plane process.

Opens the store (``--store sqlite:PATH`` or ``etcd:http://h:2379,...``),
serves the resource API on loopback and the gRPC server that xDS and the CA
mount into (``--mount module:function``), until SIGINT/SIGTERM.
``meshlet control-plane token`` issues a workload registration token.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import click

from meshlet.cli.errors import EXIT_RUNTIME, CliError
from meshlet.cli.logs import DEFAULT_LEVEL, LEVEL_NAMES, configure_logging
from meshlet.control.server import DEFAULT_API_PORT, DEFAULT_XDS_PORT, ControlPlaneSettings
from meshlet.control.store import DEFAULT_STORE_URL


@click.group(name="control-plane")
def control_plane() -> None:
    """The control plane: resource API, workload registry, xDS."""


@control_plane.command()
@click.option("--store", "store_url", default=DEFAULT_STORE_URL, show_default=True,
              help="sqlite:PATH or etcd:http://HOST:PORT[,http://HOST:PORT...]")
@click.option("--api-host", default="127.0.0.1", show_default=True,
              help="Resource API address. The API has no authentication: keep it on loopback.")
@click.option("--api-port", type=click.IntRange(0, 65535), default=DEFAULT_API_PORT, show_default=True)
@click.option("--xds-host", default="127.0.0.1", show_default=True, help="xDS gRPC address.")
@click.option("--xds-port", type=click.IntRange(0, 65535), default=DEFAULT_XDS_PORT, show_default=True)
@click.option("--mount", "mounts", multiple=True, metavar="MODULE:FUNCTION",
              help="Attach a service to the control plane (repeatable).")
@click.option("--no-default-mounts", is_flag=True,
              help="Serve only the resource API and the --mount services (no xDS unless mounted).")
@click.option("--log-level", type=click.Choice(LEVEL_NAMES, case_sensitive=False), default=DEFAULT_LEVEL,
              show_default=True)
def run(store_url: str, api_host: str, api_port: int, xds_host: str, xds_port: int,
        mounts: tuple[str, ...], no_default_mounts: bool, log_level: str) -> None:
    """Serve until SIGINT/SIGTERM. Prints one line with the bound addresses when ready."""
    configure_logging(log_level)
    settings = ControlPlaneSettings(store_url=store_url, api_host=api_host, api_port=api_port,
                                    xds_host=xds_host, xds_port=xds_port)
    try:
        asyncio.run(_serve(settings, mounts, default_mounts=not no_default_mounts))
    except KeyboardInterrupt:
        pass


async def _serve(settings: ControlPlaneSettings, mount_targets: tuple[str, ...], *,
                 default_mounts: bool) -> None:
    from meshlet.control.server import ControlPlane, available_default_mounts, load_mount
    from meshlet.control.store import StoreError

    defaults = available_default_mounts() if default_mounts else []
    mounts = [*defaults, *(load_mount(t) for t in mount_targets)]
    plane = ControlPlane(settings)
    try:
        await plane.open()
    except StoreError as exc:
        raise CliError(f"cannot open the store {settings.store_url}: {exc}", EXIT_RUNTIME) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await plane.mount(mounts)
        await plane.start()
        # One machine-readable line so scripts and tests know where to connect.
        print(f"control plane ready: api={plane.api.url} xds={settings.xds_host}:{plane.xds_port} "
              f"store={settings.store_url}", flush=True)
        await stop.wait()
    finally:
        await plane.stop()
        sys.stdout.flush()


@control_plane.command()
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--service-account", required=True, help="The workload's service account.")
@click.option("--ttl", type=click.IntRange(1, 86400), default=3600, show_default=True, help="Seconds.")
@click.option("--server", envvar="MESHLET_SERVER", default="http://127.0.0.1:15080", show_default=True,
              help="The control plane's resource API (env MESHLET_SERVER).")
def token(namespace: str, service_account: str, ttl: int, server: str) -> None:
    """Issue a single-use token a workload registers with (printed on stdout)."""
    from meshlet.cli.resources import Api

    issued = Api(server).call("POST", "/registry/tokens", content=json.dumps(
        {"namespace": namespace, "serviceAccount": service_account, "ttl": ttl}))
    click.echo(issued["token"])
