"""``meshlet bench tls``: meshlet's TLS 1.3 engine beside the stdlib ``ssl``
transport (handshakes per second, server CPU per handshake, bulk MB/s)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import click

from meshlet.cli.bench import emit, progress
from meshlet.cli.errors import EXIT_RUNTIME, CliError

ENGINES = ("meshlet", "stdlib-ssl")
KEYS = ("rsa2048", "p256")
# The table shows the headline figures; --json carries every field.
COLUMNS = ("engine", "key", "full_handshakes_per_s", "resumed_handshakes_per_s", "cpu_us_per_handshake",
           "bulk_cpu_mb_per_s", "bulk_send_cpu_mb_per_s")


@click.command("tls")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {\"rows\": [...]} on stdout.")
@click.option("--quick", is_flag=True, help="A short smoke run (about 20 s) instead of the full one.")
@click.option("--engine", "engines", multiple=True, type=click.Choice(ENGINES),
              help="Only these engines (repeatable); default: both.")
@click.option("--key", "keys", multiple=True, type=click.Choice(KEYS),
              help="Only these server keys (repeatable); default: both.")
@click.option("--duration", type=click.FloatRange(min=1),
              help="Length of each handshake phase (full, resumed), seconds [5].")
@click.option("--clients", type=click.IntRange(min=1, max=64),
              help="Concurrent openssl s_time processes in the handshake phases [4].")
@click.option("--bulk-mb", type=click.IntRange(min=1, max=100_000),
              help="MB (10^6 bytes) each way through one connection in the bulk phases [256].")
@click.option("--rounds", type=click.IntRange(min=1, max=20),
              help="Measure each engine and key this many times, alternating; report medians [1].")
def tls_bench(as_json: bool, quick: bool, engines: tuple[str, ...], keys: tuple[str, ...],
              duration: float | None, clients: int | None, bulk_mb: int | None, rounds: int | None) -> None:
    """TLS engines side by side: handshakes/s, server CPU per handshake, bulk MB/s."""
    from meshlet.bench.procs import ChildError
    from meshlet.bench.tls import QUICK, TlsBenchOptions, run_tls_bench

    opts = QUICK if quick else TlsBenchOptions()
    overrides: dict[str, Any] = {
        "engines": engines or None, "keys": keys or None, "handshake_s": duration,
        "handshake_clients": clients, "bulk_mb": bulk_mb, "rounds": rounds,
    }
    opts = replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    try:
        result = run_tls_bench(opts, progress)
    except ChildError as exc:
        raise CliError(str(exc), EXIT_RUNTIME) from exc
    emit(result, as_json, COLUMNS)
    failed = [f"{row['engine']}/{row['key']}" for row in result["rows"] if "error" in row]
    if failed:
        raise CliError(f"benchmark failed for: {', '.join(failed)}", EXIT_RUNTIME)
