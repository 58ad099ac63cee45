"""The ``meshlet`` command: ``meshlet --help`` lists what it can do.

Every subcommand lives in its own module and is imported on use (see
``LazyGroup``); failures become one line on stderr with exit code 2 for
anything the user can fix (see ``meshlet.cli.errors``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from meshlet import __version__
from meshlet.cli.errors import run_command
from meshlet.cli.lazy import LazyCommand, LazyGroup

COMMANDS: dict[str, LazyCommand] = {
    "version": LazyCommand("meshlet.cli.version:version", "Show the meshlet version and its components."),
    "proxy": LazyCommand("meshlet.cli.proxy:proxy", "Run the proxy on an Envoy v3 bootstrap file."),
    "demo": LazyCommand("meshlet.cli.demo:demo", "Bookinfo on the mesh, scenario by scenario (make demo)."),
    "bench": LazyCommand("meshlet.cli.bench:bench", "Run a benchmark experiment (meshlet bench --help)."),
    "doctor": LazyCommand("meshlet.cli.doctor:doctor", "Check Python, event loop, regex engines, crypto_mb."),
    "keyserver": LazyCommand("meshlet.cli.keyserver:keyserver", "Run the key server; manage its keys."),
    "control-plane": LazyCommand("meshlet.cli.control_plane:control_plane",
                                 "Run the control plane (resource API, registry, xDS)."),
    "apply": LazyCommand("meshlet.cli.resources:apply", "Create or update mesh config from YAML files."),
    "get": LazyCommand("meshlet.cli.resources:get", "List or show mesh config resources."),
    "delete": LazyCommand("meshlet.cli.resources:delete", "Delete mesh config resources."),
    "describe": LazyCommand("meshlet.cli.resources:describe", "Show one resource with its findings."),
    "analyze": LazyCommand("meshlet.cli.resources:analyze_command",
                           "Report mesh config mistakes (files or the control plane)."),
    "ca": LazyCommand("meshlet.cli.ca:ca", "The mesh CA: SVIDs, bootstrap tokens, root rotation."),
    "xds": LazyCommand("meshlet.cli.xds:xds", "Debug xDS: dump what a control plane serves a node."),
    "up": LazyCommand("meshlet.cli.mesh:up", "Start the mesh here: control plane and ingress gateway."),
    "run": LazyCommand("meshlet.cli.mesh:run", "Run an app as a mesh workload beside its sidecar."),
    "status": LazyCommand("meshlet.cli.mesh:status", "Mesh services, workloads, proxies and their sync."),
    "down": LazyCommand("meshlet.cli.mesh:down", "Stop everything meshlet up and run started."),
}


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="meshlet", message="%(prog)s %(version)s")
def cli() -> None:
    """meshlet: a service mesh you can read.

    A sidecar/gateway proxy configured with Envoy v3 YAML, a TLS 1.3 engine
    with pluggable private-key providers, mesh identity and an xDS control
    plane.
    """


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_command(cli, argv))


if __name__ == "__main__":
    main()
