"""``meshlet xds dump --server ADDR --node ID``: what an ADS server serves one node, as YAML."""

from __future__ import annotations

import asyncio
import json

import click
import yaml

from meshlet.cli.errors import EXIT_RUNTIME, CliError


@click.group()
def xds() -> None:
    """Debug xDS: look at what a control plane serves."""


@xds.command()
@click.option("--server", "address", required=True, metavar="HOST:PORT",
              help="The ADS server (gRPC, plaintext).")
@click.option("--node", "node_id", required=True, help="Node id to connect as.")
@click.option("--cluster", "node_cluster", default="", help="Node cluster to connect as.")
@click.option("--timeout", type=click.FloatRange(min=0.1, max=600), default=10.0, show_default=True,
              help="Seconds to wait for the server.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def dump(address: str, node_id: str, node_cluster: str, timeout: float, as_json: bool) -> None:
    """Connect as a node (state of the world), follow every reference, print the resources.

    Listeners and clusters are fetched by wildcard, then the routes, endpoints
    and secrets they name. Private keys are redacted.
    """
    from meshlet.xds.dump import DumpError, as_documents, fetch_resources

    try:
        resources = asyncio.run(fetch_resources(address, node_id, node_cluster=node_cluster, timeout=timeout))
    except DumpError as exc:
        raise CliError(str(exc), exit_code=EXIT_RUNTIME) from None
    documents = as_documents(resources)
    if as_json:
        click.echo(json.dumps(documents, indent=2))
    else:
        click.echo(yaml.safe_dump(documents, sort_keys=False), nl=False)
