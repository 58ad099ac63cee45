"""``meshlet demo`` (``make demo``): bookinfo on the whole mesh, scenario by scenario.

By default: the mesh comes up in a fresh state directory (control plane on
SQLite, ingress gateway), bookinfo's six workloads run beside their sidecars,
and Istio's traffic-management scenarios are applied one by one (all v1,
jason to v2, a 7 s ratings delay for jason, 50/50 v1/v3, mirroring v1 to v2,
mTLS STRICT); after each, traffic goes through the ingress gateway and the
response mix per reviews version and the latencies are printed (see
``meshlet.mesh.demo``). ``--proxy``: the single-proxy demo below.

``--proxy`` starts ``examples/apps/upstream.py`` and ``meshlet proxy`` on
``examples/demo/proxy.yaml`` (ports that are taken are swapped for free ones),
sends a mix of requests (routed, direct_response, no route, delayed, upstream
503, route timeout), prints the status mix, latencies and headline stats from
the admin endpoint.

Either keeps running until Ctrl-C. ``--once`` (or no
terminal on stdin, or ``CI`` set) stops after one round. Every process it
starts is stopped before it returns.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click
import uvloop
import yaml
from rich.console import Console
from rich.table import Table

from meshlet.bench.admin import admin_get, parse_stats, wait_ready
from meshlet.bench.apps import example_path, start_upstream
from meshlet.bench.procs import LOOPBACK, Child, ChildError, free_port, port_is_free
from meshlet.bench.stats import percentile
from meshlet.cli.demo_traffic import ProbeStats, send_mix
from meshlet.cli.errors import EXIT_RUNTIME, CliError
from meshlet.cli.logs import LEVEL_NAMES

DEMO_CONFIG = "demo/proxy.yaml"
DEMO_CLUSTER = "demo_app"
READY_TIMEOUT = 20.0
WIDE_OUTPUT = 130
HEADLINE_STATS = (
    "http.demo.downstream_rq_total",
    "http.demo.downstream_rq_2xx",
    "http.demo.downstream_rq_4xx",
    "http.demo.downstream_rq_5xx",
    "http.demo.no_route",
    "http.demo.downstream_rq_timeout",
    "cluster.demo_app.upstream_rq_total",
    "cluster.demo_app.upstream_cx_total",
    "cluster.demo_app.upstream_rq_timeout",
    "http.demo.downstream_cx_total",
)


@dataclass(frozen=True, slots=True)
class DemoPorts:
    listener: int
    admin: int
    upstream: int


# --------------------------------------------------------------------------- #
# Config: the example file, with taken ports swapped for free ones
# --------------------------------------------------------------------------- #


def _port_fields(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("port_value"), int):
            yield node
        for value in node.values():
            yield from _port_fields(value)
    elif isinstance(node, list):
        for item in node:
            yield from _port_fields(item)


def remap_taken_ports(config: dict[str, Any]) -> dict[int, int]:
    """Point every port that is in use at a free one (the same way everywhere it appears)."""
    remapped: dict[int, int] = {}
    for field in _port_fields(config):
        port = field["port_value"]
        if port not in remapped:
            remapped[port] = port if port_is_free(port) else free_port()
        field["port_value"] = remapped[port]
    return {old: new for old, new in remapped.items() if old != new}


def demo_ports(config: dict[str, Any]) -> DemoPorts:
    try:
        listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        admin = config["admin"]["address"]["socket_address"]["port_value"]
        cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == DEMO_CLUSTER)
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        upstream = endpoint["address"]["socket_address"]["port_value"]
    except (KeyError, IndexError, StopIteration, TypeError) as exc:
        raise CliError(f"the demo config needs a listener, an admin address and a {DEMO_CLUSTER!r} "
                       f"cluster with one endpoint ({exc!r} is missing)") from exc
    return DemoPorts(int(listener), int(admin), int(upstream))


def prepare_config(source: Path, workdir: Path) -> tuple[Path, DemoPorts, dict[int, int]]:
    config = yaml.safe_load(source.read_text())
    if not isinstance(config, dict):
        raise CliError(f"{source}: not an Envoy bootstrap (expected a mapping at the top)")
    moved = remap_taken_ports(config)
    target = workdir / "proxy.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target, demo_ports(config), moved


# --------------------------------------------------------------------------- #
# Showing what happened
# --------------------------------------------------------------------------- #


def traffic_table(results: dict[str, ProbeStats]) -> Table:
    table = Table("kind", "request", "what happens", "n", "statuses", "p50 ms", "p90 ms", "p99 ms",
                  title="traffic through the proxy")
    for stats in results.values():
        statuses = " ".join(f"{code} x{n}" for code, n in sorted(stats.statuses.items()))
        if stats.failures:
            statuses += f" failed x{stats.failures}"
        table.add_row(
            stats.probe.label, f"GET {stats.probe.path}", stats.probe.what,
            str(len(stats.latencies_ms) + stats.failures), statuses,
            f"{stats.quantile(0.5):.2f}", f"{stats.quantile(0.9):.2f}", f"{stats.quantile(0.99):.2f}",
        )
    return table


def overall_line(results: dict[str, ProbeStats]) -> str:
    mix: dict[str, int] = {}
    latencies: list[float] = []
    for stats in results.values():
        latencies += stats.latencies_ms
        for code, n in stats.statuses.items():
            key = f"{code // 100}xx"
            mix[key] = mix.get(key, 0) + n
    latencies.sort()
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(mix.items()))
    return (f"status mix {shown}; latency p50 {percentile(latencies, 0.5):.2f} ms, "
            f"p90 {percentile(latencies, 0.9):.2f} ms, p99 {percentile(latencies, 0.99):.2f} ms")


def stats_table(admin_port: int) -> Table | str:
    status, body = admin_get(admin_port, "/stats")
    if status != 200:
        return f"(admin /stats answered {status or 'nothing'})"
    stats = parse_stats(body)
    table = Table("stat", "value", title=f"headline stats from http://{LOOPBACK}:{admin_port}/stats")
    for name in HEADLINE_STATS:
        if name in stats:
            table.add_row(name, stats[name])
    return table


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def interactive(once: bool) -> bool:
    return not once and sys.stdin.isatty() and not os.environ.get("CI")


def start_proxy(config: Path, workdir: Path, log_level: str) -> Child:
    argv = [sys.executable, "-m", "meshlet.cli.main", "proxy", "--config", str(config),
            "--log-level", log_level]
    return Child("meshlet proxy", argv, log_path=workdir / "proxy.log").start()


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_round(console: Console, ports: DemoPorts, total: int) -> None:
    results = uvloop.run(send_mix(LOOPBACK, ports.listener, total=total))
    console.print(traffic_table(results))
    console.print(overall_line(results))
    console.print(stats_table(ports.admin))


@click.command()
@click.option("--once", is_flag=True,
              help="Exit after one pass (implied without a terminal or with CI set).")
@click.option("--proxy", "proxy_only", is_flag=True,
              help="Only the proxy in front of a sample app (no control plane, static config).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --proxy: a bootstrap to run instead of examples/demo/proxy.yaml.")
@click.option("--requests", "total", type=click.IntRange(10, 100_000),
              help="Requests per round (--proxy) [300], or page views per user and scenario [60].")
@click.option("--log-level", type=click.Choice(LEVEL_NAMES, case_sensitive=False), default="warning",
              show_default=True, help="The proxy's log level (--proxy).")
def demo(once: bool, proxy_only: bool, config_path: Path | None, total: int | None, log_level: str) -> None:
    """Run bookinfo on the mesh and walk through traffic scenarios (--proxy: one proxy only)."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDE_OUTPUT)  # logs and CI: don't wrap the tables at 80 columns
    if proxy_only:
        proxy_demo(console, once, config_path, total or 300, log_level)
    else:
        from meshlet.mesh.demo import DemoError, mesh_demo

        try:
            mesh_demo(console, interactive(once), total or 60)
        except DemoError as exc:
            raise CliError(str(exc), EXIT_RUNTIME) from None


def proxy_demo(console: Console, once: bool, config_path: Path | None, total: int, log_level: str) -> None:
    try:
        source = config_path or example_path(DEMO_CONFIG)
    except ChildError as exc:
        raise CliError(str(exc), EXIT_RUNTIME) from exc
    with tempfile.TemporaryDirectory(prefix="meshlet-demo-") as tmp:
        workdir = Path(tmp)
        config, ports, moved = prepare_config(source, workdir)
        for old, new in moved.items():
            console.print(f"port {old} is taken; using {new} instead")
        upstream: Child | None = None
        proxy: Child | None = None
        # SIGTERM (e.g. from a CI timeout) stops the demo the way Ctrl-C does.
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            upstream, _ = start_upstream(ports.upstream)
            console.print(f"sample app on http://{LOOPBACK}:{ports.upstream}")
            proxy = start_proxy(config, workdir, log_level)
            wait_ready(ports.admin, READY_TIMEOUT, child=proxy)
            console.print(f"meshlet proxy on http://{LOOPBACK}:{ports.listener} "
                          f"(admin: http://{LOOPBACK}:{ports.admin}/)")
            run_round(console, ports, total)
            if interactive(once):
                console.print(f"\nrunning: try  curl -i http://{LOOPBACK}:{ports.listener}/app/  "
                              f"and  http://{LOOPBACK}:{ports.admin}/stats ; Ctrl-C stops everything")
                while True:
                    time.sleep(0.5)
                    proxy.check_alive()
                    upstream.check_alive()
        except KeyboardInterrupt:
            console.print("\nstopping")
        except ChildError as exc:
            raise CliError(str(exc), EXIT_RUNTIME) from exc
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            for child in (proxy, upstream):
                if child is not None:
                    child.stop()
