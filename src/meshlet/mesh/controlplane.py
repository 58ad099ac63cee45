"""The mesh's control-plane process, as ``meshlet up`` starts it::

    python -m meshlet.mesh.controlplane --store URL --api-port N --xds-port N

The control plane of ``meshlet control-plane run`` (store, registry, resource
API, ADS fed by the config pusher) plus ``meshlet.mesh.plane:mount_mesh``
(SVIDs from the mesh CA, the sync status endpoint). Workload health comes
from each workload's supervisor, which reports only when it changes, so the
registry's silence sweep is off here: a workload whose supervisor ends
deregisters it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from meshlet.cli.logs import configure_logging
from meshlet.control.push import mount_xds
from meshlet.control.server import ControlPlane, ControlPlaneSettings
from meshlet.mesh.plane import mount_mesh

READY_LINE = "control plane ready"


async def serve(settings: ControlPlaneSettings) -> None:
    plane = ControlPlane(settings)
    await plane.open()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await plane.mount([mount_xds, mount_mesh])
        await plane.start()
        print(f"{READY_LINE}: api={plane.api.url} xds={settings.xds_host}:{plane.xds_port} "
              f"store={settings.store_url}", flush=True)
        await stop.wait()
    finally:
        await plane.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlet.mesh.controlplane")
    parser.add_argument("--store", required=True)
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument("--xds-port", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    # Supervisors re-send a steady health every few seconds (mesh.workload), so the
    # default silence sweep marks only workloads whose supervisor has died.
    settings = ControlPlaneSettings(store_url=args.store, api_port=args.api_port, xds_port=args.xds_port)
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # start-up failures: one line in the log, a failing exit code
        print(f"control plane failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
