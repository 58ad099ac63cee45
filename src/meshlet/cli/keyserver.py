"""``meshlet keyserver``: run the isolated key server and manage its keys.

``run`` serves; ``generate``, ``import`` and ``list`` talk to a running server
over its socket (``generate`` and ``import`` need an admin uid). No command
ever prints or writes private key bytes: ``generate`` gives the handle and the
public key (PEM, ready for a CSR or a certificate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from cryptography.hazmat.primitives import serialization

from meshlet.cli.errors import EXIT_RUNTIME, CliError

if TYPE_CHECKING:
    from meshlet.keys.keyserver.protocol import Request

DEFAULT_KEY_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "meshlet" / "keys"

socket_option = click.option(
    "--socket", "socket_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The key server's Unix socket.",
)


@click.group()
def keyserver() -> None:
    """The key server: holds private keys in its own process and signs by handle."""


@keyserver.command()
@socket_option
@click.option("--key-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_KEY_DIR,
              show_default=True, help="Directory of the keys (created 0700; files 0600).")
@click.option("--allow-uid", "allow_uids", type=int, multiple=True,
              help="A uid that may sign (repeatable; default: this process's uid).")
@click.option("--admin-uid", "admin_uids", type=int, multiple=True,
              help="A uid that may generate and import keys (repeatable; default: this process's uid).")
@click.option("--rate", type=float, default=20000.0, show_default=True, help="Requests per second, overall.")
@click.option("--connection-rate", type=float, default=5000.0, show_default=True,
              help="Requests per second, per connection.")
@click.option("--max-in-flight", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Operations in progress at once; beyond it requests are answered BUSY.")
def run(socket_path: Path, key_dir: Path, allow_uids: tuple[int, ...], admin_uids: tuple[int, ...],
        rate: float, connection_rate: float, max_in_flight: int) -> None:
    """Serve signing requests on --socket until SIGINT/SIGTERM."""
    from meshlet.keys.keyserver.server import ServerPolicy, run_key_server
    from meshlet.keys.keyserver.store import KeyStoreError

    me = os.geteuid()
    policy = ServerPolicy(
        allowed_uids=frozenset(allow_uids or (me,)) | frozenset(admin_uids or (me,)),
        admin_uids=frozenset(admin_uids or (me,)),
        rate=rate,
        burst=max(1.0, rate / 10),
        connection_rate=connection_rate,
        connection_burst=max(1.0, connection_rate / 10),
        max_in_flight=max_in_flight,
    )
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(_: object) -> None:
        click.echo(f"key server ready on {socket_path}", err=True)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await run_key_server(socket_path, key_dir, policy, ready)
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(main())
    except KeyStoreError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot serve on {socket_path}: {exc.strerror or exc}", EXIT_RUNTIME) from None


def _call(socket_path: Path, request: Request) -> bytes:
    from meshlet.keys.keyserver.client import KeyServerError, call, checked
    from meshlet.keys.keyserver.protocol import ProtocolError

    try:
        return checked(call(str(socket_path), request, timeout=30.0))
    except KeyServerError as exc:
        raise CliError(str(exc), EXIT_RUNTIME) from None
    except (OSError, ProtocolError) as exc:
        raise CliError(f"cannot reach the key server at {socket_path}: {exc}", EXIT_RUNTIME) from None


def _public_pem(spki: bytes) -> bytes:
    key = serialization.load_der_public_key(spki)
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _emit(name: str, spki: bytes, public_out: Path | None) -> None:
    pem = _public_pem(spki)
    click.echo(name)
    if public_out is None:
        sys.stdout.write(pem.decode())
    else:
        public_out.write_bytes(pem)


public_out_option = click.option(
    "--public-out", type=click.Path(dir_okay=False, path_type=Path),
    help="Write the public key (PEM) here instead of to stdout.",
)


@keyserver.command()
@socket_option
@click.option("--type", "key_type", required=True,
              type=click.Choice(["rsa2048", "rsa3072", "rsa4096", "p256", "p384", "ed25519"]))
@click.option("--name", required=True, help="The key's handle (1-64 of A-Z a-z 0-9 _ . -).")
@public_out_option
def generate(socket_path: Path, key_type: str, name: str, public_out: Path | None) -> None:
    """Generate a key inside the server; print its handle and public key."""
    from meshlet.keys.keyserver.protocol import GenerateRequest

    _emit(name, _call(socket_path, GenerateRequest(1, key_type, name)), public_out)


@keyserver.command(name="import")
@socket_option
@click.option("--key", "key_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM private key (unencrypted PKCS#8 or traditional) to hand over to the server.")
@click.option("--name", required=True, help="The key's handle (1-64 of A-Z a-z 0-9 _ . -).")
@public_out_option
def import_key(socket_path: Path, key_file: Path, name: str, public_out: Path | None) -> None:
    """Hand a PEM key over to the server; print its handle and public key."""
    from meshlet.keys.keyserver.protocol import ImportRequest

    _emit(name, _call(socket_path, ImportRequest(1, name, key_file.read_bytes())), public_out)


@keyserver.command(name="list")
@socket_option
def list_keys(socket_path: Path) -> None:
    """List the handles the server holds."""
    from meshlet.keys.keyserver.protocol import ListRequest

    names = _call(socket_path, ListRequest(1)).decode()
    if names:
        click.echo(names)
