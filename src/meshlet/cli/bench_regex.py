"""``meshlet bench regex``: route selection and proxy throughput for each regex engine."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import click

from meshlet.cli.bench import emit, progress
from meshlet.cli.errors import EXIT_RUNTIME, CliError

ENGINES = ("re", "re2", "hyperscan")
# The terminal table (the JSON has every field).
COLUMNS = ("engine", "routes", "match_ns", "match_x_re", "proxy_rps", "rps_x_re", "cpu_us_req")


@click.command("regex")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {\"rows\": [...]} on stdout.")
@click.option("--quick", is_flag=True, help="A short smoke run (100 routes, 1 s of load per engine).")
@click.option("--engine", "engines", multiple=True, type=click.Choice(ENGINES),
              help="Only these engines (repeatable); default: all.")
@click.option("--routes", "route_counts", multiple=True, type=click.IntRange(min=1, max=100_000),
              help="Regex route counts (repeatable) [10, 100, 1000].")
@click.option("--duration", type=click.FloatRange(min=1),
              help="wrk phase length per round and engine, seconds [3].")
@click.option("--rounds", type=click.IntRange(min=1, max=100), help="wrk rounds, alternating engines [3].")
@click.option("--connections", type=click.IntRange(min=1, max=10000), help="wrk connections [16].")
def regex_bench(as_json: bool, quick: bool, engines: tuple[str, ...], route_counts: tuple[int, ...],
                duration: float | None, rounds: int | None, connections: int | None) -> None:
    """Regex route matching: in-process selection time and proxy req/s per engine."""
    from meshlet.bench.regex import QUICK, RegexBenchOptions, run_regex_bench

    opts = QUICK if quick else RegexBenchOptions()
    overrides: dict[str, Any] = {
        "engines": engines or None, "route_counts": route_counts or None,
        "rps_duration_s": duration, "rps_rounds": rounds, "connections": connections,
    }
    opts = replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    result = run_regex_bench(opts, progress)
    emit(result if as_json else {"rows": [table_row(row) for row in result["rows"]]}, as_json, COLUMNS)
    failed = [f"{row['engine']}/{row['routes']}" for row in result["rows"] if "error" in row]
    if failed:
        raise CliError(f"benchmark failed for: {', '.join(failed)}", EXIT_RUNTIME)


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    speedup = row.get("speedup_vs_re", {})
    return {
        **row,
        "match_x_re": speedup.get("match", ""),
        "rps_x_re": speedup.get("proxy_rps", ""),
        "cpu_us_req": row.get("proxy_cpu_us_per_request", ""),
    }
