"""``meshlet bench handshake``: full TLS 1.3 handshakes per request through each
key provider, beside the stdlib ``ssl`` engine, HAProxy and nginx."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from meshlet.bench.handshake_servers import SYSTEMS
from meshlet.bench.tls import KEYS
from meshlet.cli.bench import emit, progress
from meshlet.cli.errors import EXIT_RUNTIME, EXIT_USAGE, CliError

COLUMNS = ("name", "key", "handshakes_per_s", "cpu_us_per_handshake", "p50_ms", "p99_ms",
           "keyserver_cpu_us_per_handshake", "server_handshakes", "client_connections", "server_cpu_share")


@click.command("handshake")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {\"rows\": [...]} on stdout.")
@click.option("--quick", is_flag=True, help="A short smoke run (about a minute) instead of the full one.")
@click.option("--system", "systems", multiple=True, type=click.Choice(SYSTEMS),
              help="Only these systems (repeatable); default: all.")
@click.option("--key", "keys", multiple=True, type=click.Choice(KEYS),
              help="Only these certificate keys (repeatable); default: both.")
@click.option("--duration", type=click.FloatRange(min=1), help="Measured window per row, seconds [10].")
@click.option("--warmup", type=click.FloatRange(min=0), help="Warm-up before each window, seconds [2].")
@click.option("--connections", type=click.IntRange(min=1, max=1024),
              help="Concurrent connections of the load generator [32].")
@click.option("--rounds", type=click.IntRange(min=1, max=20),
              help="Measure each row this many times, alternating; report medians [1].")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path),
              help="py-spy each Python server over its window into this directory (needs py-spy); "
                   "rows get profile_us_per_handshake.")
@click.option("--batch-poll-delay", metavar="DURATION",
              help="poll_delay of the meshlet-batch rows, e.g. 5ms [the provider's default, 0.2ms].")
@click.option("--skip-missing", is_flag=True, help="Leave out haproxy/nginx rows when not installed.")
def handshake_bench(as_json: bool, quick: bool, systems: tuple[str, ...], keys: tuple[str, ...],
                    duration: float | None, warmup: float | None, connections: int | None,
                    rounds: int | None, profile_dir: Path | None, batch_poll_delay: str | None,
                    skip_missing: bool) -> None:
    """A new TLS 1.3 connection per request: handshakes/s, server CPU per handshake, p50/p99."""
    from meshlet.bench.handshake import QUICK, HandshakeBenchOptions, run_handshake_bench
    from meshlet.bench.procs import ChildError

    opts = QUICK if quick else HandshakeBenchOptions()
    overrides: dict[str, Any] = {
        "systems": systems or None, "keys": keys or None, "duration_s": duration, "warmup_s": warmup,
        "connections": connections, "rounds": rounds,
        "batch_poll_delay": batch_poll_delay,
        "skip_missing": skip_missing or None,
    }
    opts = replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    if batch_poll_delay is not None:
        from meshlet.errors import ConfigError
        from meshlet.keys.batch import parse_duration

        try:
            parse_duration(batch_poll_delay, "--batch-poll-delay")
        except ConfigError as exc:
            raise CliError(f"--batch-poll-delay: {exc.message}", EXIT_USAGE) from exc
    if profile_dir is not None:
        from meshlet.bench.handshake_profile import py_spy_binary

        if py_spy_binary() is None:
            raise CliError("--profile needs py-spy (pip install py-spy)", EXIT_USAGE)
        profile_dir.mkdir(parents=True, exist_ok=True)
        opts = replace(opts, profile_dir=profile_dir)
    try:
        result = run_handshake_bench(opts, progress)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    except ChildError as exc:
        raise CliError(str(exc), EXIT_RUNTIME) from exc
    emit(result, as_json, COLUMNS)
    failed = [f"{row['name']}/{row['key']}" for row in result["rows"] if "error" in row]
    if failed:
        raise CliError(f"benchmark failed for: {', '.join(failed)}", EXIT_RUNTIME)
