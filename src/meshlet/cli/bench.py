"""``meshlet bench <experiment>``: benchmark experiments.

Each experiment prints exactly one JSON object on stdout with ``--json``
(progress goes to stderr) and a table otherwise. Further experiments (tls,
handshake, regex, controlplane) slot into ``EXPERIMENTS``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import click

from meshlet.cli.errors import EXIT_RUNTIME, CliError
from meshlet.cli.lazy import LazyCommand, LazyGroup

WIDE_OUTPUT = 200

EXPERIMENTS: dict[str, LazyCommand] = {
    "regex": LazyCommand("meshlet.cli.bench_regex:regex_bench",
                         "Regex route matching per engine: selection ns and proxy req/s."),
    "tls": LazyCommand("meshlet.cli.bench_tls:tls_bench",
                       "TLS engines side by side: handshakes/s, CPU per handshake, bulk MB/s."),
    "handshake": LazyCommand("meshlet.cli.bench_handshake:handshake_bench",
                             "Key providers: a new TLS 1.3 connection per request, beside HAProxy, nginx."),
    "controlplane": LazyCommand("meshlet.cli.bench_controlplane:controlplane_bench",
                                "Control plane RSS, CPU and push latency: 1000 services, 2000 proxies."),
}


@click.group(cls=LazyGroup, lazy_commands=EXPERIMENTS)
def bench() -> None:
    """Run a benchmark experiment; --json prints one JSON object on stdout."""


def progress(message: str) -> None:
    click.echo(f"bench: {message}", err=True)


def emit(result: dict[str, Any], as_json: bool, columns: tuple[str, ...]) -> None:
    if as_json:
        click.echo(json.dumps(result, sort_keys=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, "error")
    for row in result["rows"]:
        table.add_row(*(str(row.get(col, "")) for col in columns), row.get("error", ""))
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDE_OUTPUT)  # logs and pipes: don't wrap the table at 80 columns
    console.print(table)


PROXY_COLUMNS = ("name", "rps_max", "p50_ms", "p90_ms", "p99_ms", "cpu_s_per_1000_req", "rss_mb")


@bench.command("proxy")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {\"rows\": [...]} on stdout.")
@click.option("--quick", is_flag=True, help="A short smoke run (about 10 s) instead of the full one.")
@click.option("--duration", type=click.FloatRange(min=1), help="Saturation phase length, seconds [10].")
@click.option("--connections", type=click.IntRange(min=1, max=10000), help="wrk connections [32].")
@click.option("--rate", type=click.FloatRange(min=1), help="Fixed-rate phase, requests/s [1000].")
@click.option("--rate-duration", type=click.FloatRange(min=1), help="Fixed-rate phase length, seconds [10].")
@click.option("--system", "systems", multiple=True, type=click.Choice(("meshlet", "haproxy")),
              help="Only these proxies (repeatable); default: all.")
@click.option("--rounds", type=click.IntRange(min=1, max=20),
              help="Measure each proxy this many times, alternating; report medians [1].")
def proxy_bench(as_json: bool, quick: bool, duration: float | None, connections: int | None,
                rate: float | None, rate_duration: float | None, systems: tuple[str, ...],
                rounds: int | None) -> None:
    """Throughput, latency at a fixed rate, CPU and memory: meshlet beside HAProxy."""
    from meshlet.bench.procs import ChildError
    from meshlet.bench.proxy import QUICK, ProxyBenchOptions, run_proxy_bench

    opts = QUICK if quick else ProxyBenchOptions()
    overrides: dict[str, Any] = {
        "saturation_s": duration, "connections": connections, "fixed_rate": rate,
        "fixed_rate_s": rate_duration, "systems": systems or None, "rounds": rounds,
    }
    opts = replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    try:
        result = run_proxy_bench(opts, progress)
    except ChildError as exc:
        # Even a harness that cannot start (no upstream) answers with the promised JSON shape.
        progress(f"failed: {exc}")
        result = {"rows": [{"name": name, "error": str(exc)} for name in opts.systems]}
    emit(result, as_json, PROXY_COLUMNS)
    failed = [row["name"] for row in result["rows"] if "error" in row]
    if failed:
        raise CliError(f"benchmark failed for: {', '.join(failed)}", EXIT_RUNTIME)
