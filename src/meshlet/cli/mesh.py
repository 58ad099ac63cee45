"""``meshlet up`` / ``run`` / ``status`` / ``down``: the mesh on one machine.

    meshlet up                                   # control plane (SQLite) + ingress gateway
    meshlet apply -f examples/bookinfo/services.yaml
    meshlet run --service reviews --version v1 -- python examples/bookinfo/app.py reviews
    meshlet status                               # services, workloads, proxies and their sync
    meshlet down                                 # stops everything up and run started

Everything lives under the state directory (``--dir``, default ``.meshlet``):
pid files, logs, the mesh CA, proxy bootstraps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from meshlet.cli.errors import EXIT_RUNTIME, CliError

DIR_OPTION = click.option("--dir", "state_dir", type=click.Path(file_okay=False, path_type=Path),
                          default=".meshlet", show_default=True, envvar="MESHLET_DIR",
                          help="The mesh's state directory (env MESHLET_DIR).")


@contextmanager
def _mesh_errors() -> Iterator[None]:
    from meshlet.mesh.client import ControlPlaneError
    from meshlet.mesh.lifecycle import MeshError
    from meshlet.mesh.procs import ProcessError
    from meshlet.mesh.state import StateError

    try:
        yield
    except StateError as exc:
        raise CliError(str(exc)) from None
    except (MeshError, ControlPlaneError, ProcessError) as exc:
        raise CliError(str(exc), EXIT_RUNTIME) from None


def _echo(message: str) -> None:
    click.echo(message)


@click.command()
@DIR_OPTION
@click.option("--store", "store_url", help="sqlite:PATH or etcd:http://HOST:PORT[,...] "
                                           "[default: sqlite:<dir>/meshlet.db]")
@click.option("--api-port", type=click.IntRange(1, 65535), help="Resource API port [15080, or a free one].")
@click.option("--xds-port", type=click.IntRange(1, 65535), help="xDS port [15010, or a free one].")
@click.option("--loopback-block", type=click.IntRange(1, 254), default=10, show_default=True,
              help="Workloads take addresses in 127.<B>.0.0/16.")
@click.option("--no-gateway", is_flag=True, help="Start the control plane only.")
def up(state_dir: Path, store_url: str | None, api_port: int | None, xds_port: int | None,
       loopback_block: int, no_gateway: bool) -> None:
    """Start the control plane and the ingress gateway in the background."""
    from meshlet.mesh.lifecycle import UpOptions, mesh_up
    from meshlet.mesh.state import MeshState

    options = UpOptions(store_url=store_url, api_port=api_port, xds_port=xds_port,
                        loopback_block=loopback_block, gateway=not no_gateway)
    with _mesh_errors():
        info = mesh_up(MeshState(state_dir), options, _echo)
    click.echo(f"mesh up in {state_dir}: meshlet apply --server {info.api_url} -f ... ; "
               f"meshlet run --dir {state_dir} --service NAME -- CMD")


@click.command(context_settings={"allow_interspersed_args": False})
@DIR_OPTION
@click.option("--service", required=True, help="The meshlet.dev/v1 Service this workload backs.")
@click.option("--version", "version", help="Its version label (subsets select on it).")
@click.option("--port", "app_port", type=click.IntRange(1, 65535),
              help="The port the app listens on, 127.0.0.1 [a free one, passed as PORT].")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--service-account", help="Its identity's service account [the service name].")
@click.option("--ready-timeout", type=click.FloatRange(1, 600), default=30.0, show_default=True,
              help="Seconds to wait for the sidecar's config and the app's port.")
@click.argument("command", nargs=-1, required=True)
def run(state_dir: Path, service: str, version: str | None, app_port: int | None, namespace: str,
        service_account: str | None, ready_timeout: float, command: tuple[str, ...]) -> None:
    """Run COMMAND as a workload of SERVICE beside its sidecar (after --).

    The app is told PORT (where to listen) and, for each service of its
    namespace, <NAME>_SERVICE_HOST / <NAME>_SERVICE_PORT: its sidecar's
    outbound listener for that service.
    """
    from meshlet.mesh.lifecycle import RunRequest, run_workload
    from meshlet.mesh.state import MeshState

    request = RunRequest(service=service, command=list(command), version=version, app_port=app_port,
                         namespace=namespace, service_account=service_account, ready_timeout=ready_timeout)
    with _mesh_errors():
        run_workload(MeshState(state_dir), request, _echo)


@click.command()
@DIR_OPTION
def down(state_dir: Path) -> None:
    """Stop every process up and run started (workloads deregister first)."""
    from meshlet.mesh.lifecycle import mesh_down
    from meshlet.mesh.state import MeshState

    with _mesh_errors():
        outcomes = mesh_down(MeshState(state_dir), _echo)
    if not outcomes:
        click.echo(f"nothing was running in {state_dir}")


@click.command()
@DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--wait-synced", type=click.FloatRange(0, 600), default=0.0,
              help="Wait up to this many seconds for every proxy to ACK its config.")
def status(state_dir: Path, as_json: bool, wait_synced: float) -> None:
    """Services, workloads, proxies and their config sync state."""
    from meshlet.mesh.status import collect, render

    with _mesh_errors():
        report = collect(state_dir)
        deadline = time.monotonic() + wait_synced
        while not report.synced() and time.monotonic() < deadline:
            time.sleep(0.2)
            report = collect(state_dir)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1))
    else:
        render(report)
    if wait_synced and not report.synced():
        raise CliError(f"proxies not synced after {wait_synced:g} s", EXIT_RUNTIME)


