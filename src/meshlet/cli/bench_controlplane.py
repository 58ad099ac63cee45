"""``meshlet bench controlplane``: peak RSS, CPU and config push latency of the control
plane with 1000 services and 2000 simulated proxies on real ADS streams."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import click

from meshlet.cli.bench import emit, progress
from meshlet.cli.errors import EXIT_RUNTIME, CliError

COLUMNS = ("name", "services", "proxies", "rss_mb", "push_p50_ms", "push_p99_ms", "cpu_s", "initial_sync_s")


@click.command("controlplane")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {\"rows\": [...]} on stdout.")
@click.option("--quick", is_flag=True, help="A smoke run: 20 services, 40 proxies, one worker.")
@click.option("--services", type=click.IntRange(min=1, max=100_000), help="Services [1000].")
@click.option("--proxies", type=click.IntRange(min=1, max=100_000), help="Simulated sidecars [2000].")
@click.option("--workers", type=click.IntRange(min=1, max=64), help="Worker processes for the proxies [2].")
@click.option("--changes", type=click.IntRange(min=1, max=100), help="Config changes timed [5].")
@click.option("--delta", is_flag=True, help="Delta xDS streams instead of state of the world.")
def controlplane_bench(as_json: bool, quick: bool, services: int | None, proxies: int | None,
                       workers: int | None, changes: int | None, delta: bool) -> None:
    """Control plane RSS, CPU and push latency (one change to every proxy, ACK observed)."""
    from meshlet.bench.controlplane import QUICK, ControlPlaneBenchOptions, run_controlplane_bench

    opts = QUICK if quick else ControlPlaneBenchOptions()
    overrides: dict[str, Any] = {"services": services, "proxies": proxies, "workers": workers,
                                 "changes": changes, "delta": delta or None}
    opts = replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    result = run_controlplane_bench(opts, progress)
    emit(result, as_json, COLUMNS)
    failed = [row["name"] for row in result["rows"] if "error" in row]
    if failed:
        raise CliError(f"benchmark failed: {result['rows'][0]['error']}", EXIT_RUNTIME)
