"""``meshlet version``: the meshlet version and the versions of the engines it runs on."""

from __future__ import annotations

import platform
import ssl
from importlib import metadata

import click

from meshlet import __version__

# Libraries whose version changes behaviour or performance on the data path.
COMPONENTS = ("uvloop", "httptools", "h2", "cryptography", "grpcio", "protobuf", "xds-protos")


def component_versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in COMPONENTS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


@click.command()
@click.option("--short", is_flag=True, help="Print only the meshlet version.")
def version(short: bool) -> None:
    """Show the meshlet version (and, unless --short, its runtime components)."""
    click.echo(f"meshlet {__version__}")
    if short:
        return
    click.echo(f"python {platform.python_version()} ({platform.python_implementation()})")
    click.echo(f"openssl {ssl.OPENSSL_VERSION}")
    for name, ver in component_versions().items():
        click.echo(f"{name} {ver}")
