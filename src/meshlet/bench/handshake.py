"""The key-provider handshake benchmark: a new TLS 1.3 connection per request.

For each key (``rsa2048``, ``p256``; one certificate per key, the same for
every system) and each system (``handshake_servers.SYSTEMS``: meshlet with each
key provider, the stdlib ``ssl`` engine, HAProxy, nginx), the server runs
pinned to one core and ``meshlet.bench.handshake_load`` (a full handshake,
``GET /``, ``Connection: close``, per connection) on the other. Each row:

- ``handshakes_per_s``: connections completed per second of the window;
- ``cpu_us_per_handshake``: the server's utime+stime (from /proc; with its
  descendants: offload workers, nginx's worker; plus the key server for
  ``meshlet-keyserver``, which is also given alone as
  ``keyserver_cpu_us_per_handshake``) over the window, per handshake the
  server counted; ``handshakes_per_cpu_s`` is its inverse;
- ``p50_ms`` / ``p99_ms``: connect + handshake + request + response, from
  the generator;
- ``server_handshakes`` (the server's own counter: meshlet's
  ``listener.*.ssl.handshake``, HAProxy's ``CumSslConns``, nginx's accepts)
  beside ``client_connections``, and ``client_resumed`` (always 0: every
  handshake is a full one);
- ``server_cpu_share``: how busy the server core was (near 1.0: the server,
  not the generator, set the rate).

``ratios`` compares ``meshlet-batch`` with ``stdlib-ssl`` in handshakes per
CPU-second and each meshlet row's RSA-2048 CPU per handshake with HAProxy's.
Everything started here is stopped here; every phase is bounded in time.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.bench.handshake_profile import (
    free_path,
    per_handshake,
    py_spy_binary,
    split_samples,
    start_py_spy,
)
from meshlet.bench.handshake_servers import (
    STARTERS,
    SYSTEMS,
    RunningServer,
    external_available,
    start_meshlet,
)
from meshlet.bench.procs import Child, ChildError
from meshlet.bench.proxy import CpuPlan, plan_cpus
from meshlet.bench.tls import KEYS, KeyFiles, write_key_files

Progress = Callable[[str], None]
EXTERNAL = ("haproxy", "nginx")


@dataclass(frozen=True, slots=True)
class HandshakeBenchOptions:
    duration_s: float = 10.0
    warmup_s: float = 2.0
    connections: int = 32  # concurrent handshakes the generator keeps going
    systems: tuple[str, ...] = SYSTEMS
    keys: tuple[str, ...] = KEYS
    skip_missing: bool = False  # leave out haproxy/nginx rows whose binary is not installed
    rounds: int = 1  # each (system, key) this many times, alternating; medians reported
    profile_dir: Path | None = None  # py-spy the Python servers into this directory
    batch_poll_delay: str | None = None  # meshlet.batch's poll_delay ("0.2ms", "5ms"); None: its default


# A smoke run (about a minute for all rows): shapes and sanity, not figures to quote.
QUICK = HandshakeBenchOptions(duration_s=1.0, warmup_s=0.5, connections=8)


@dataclass(frozen=True, slots=True)
class Window:
    """The server's side of the measured window."""

    handshakes: int
    server_cpu_s: float
    keyserver_cpu_s: float
    profile: Path | None = None  # py-spy's raw samples of the server over the window


def generator_argv(port: int, opts: HandshakeBenchOptions) -> list[str]:
    return [sys.executable, "-m", "meshlet.bench.handshake_load", "--port", str(port),
            "--connections", str(opts.connections), "--duration", str(opts.duration_s),
            "--warmup", str(opts.warmup_s)]


class LineReader:
    """Lines of a child's stdout, each within a deadline; what arrived after a
    line stays buffered for the next read (the generator's last lines come together)."""

    def __init__(self, child: Child) -> None:
        if child.proc is None or child.proc.stdout is None:
            raise ChildError(f"{child.name}: stdout is not captured")
        self._child = child
        self._fd = child.proc.stdout.fileno()
        self._pending = b""

    def next_line(self, timeout: float, limit: int = 1 << 20) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self._child.name} printed nothing for {timeout:.0f} s")
            ready, _, _ = select.select([self._fd], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise ChildError(f"{self._child.name} ended its output early{self._child_log()}")
            self._pending += chunk
            if len(self._pending) > limit:
                raise ChildError(f"{self._child.name} printed a line longer than {limit} bytes")
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace")

    def expect(self, wanted: str, timeout: float) -> None:
        line = self.next_line(timeout)
        if line != wanted:
            raise ChildError(f"{self._child.name} printed {line[:200]!r}, expected {wanted!r}")

    def _child_log(self) -> str:
        path = self._child.log_path
        if path is None or not path.exists():
            return ""
        return ": " + " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:])


def run_load(server: RunningServer, opts: HandshakeBenchOptions, plan: CpuPlan,
             workdir: Path, label: str) -> tuple[dict[str, Any], Window]:
    """The generator against ``server``; the server is read when the window opens and closes."""
    generator = Child("handshake load generator", generator_argv(server.port, opts), cpus=plan.load,
                      capture_stdout=True, log_path=workdir / f"load-{label}.log").start()
    profiler: Child | None = None
    profile: Path | None = None
    try:
        lines = LineReader(generator)
        lines.expect("measuring", opts.warmup_s + 30)
        handshakes_before, (cpu_before, ks_before) = server.count_handshakes(), server.cpu_s()
        py_spy = py_spy_binary() if opts.profile_dir is not None and server.python else None
        if py_spy is not None and opts.profile_dir is not None:
            profile = free_path(opts.profile_dir, label)
            profiler = start_py_spy(py_spy, server.main.pid, opts.duration_s - 0.5, profile, plan.load)
        lines.expect("stopped", opts.duration_s + 30)
        cpu_after, ks_after = server.cpu_s()
        handshakes_after = server.count_handshakes()
        summary = json.loads(lines.next_line(60))
        if profiler is not None and profiler.proc is not None:
            profiler.proc.wait(timeout=30)  # py-spy writes its file when its duration is up
    finally:
        generator.stop()
        if profiler is not None:
            profiler.stop()
    server.check_alive()
    window = Window(handshakes_after - handshakes_before, cpu_after - cpu_before, ks_after - ks_before,
                    profile)
    return summary, window


def to_row(name: str, key: str, server: RunningServer, load: dict[str, Any], window: Window,
           opts: HandshakeBenchOptions, plan: CpuPlan, load_avg: float) -> dict[str, Any]:
    handshakes = max(window.handshakes, 1)
    total_cpu = window.server_cpu_s + window.keyserver_cpu_s
    wall = load["wall_s"] or opts.duration_s
    row: dict[str, Any] = {
        "name": name,
        "key": key,
        "handshakes_per_s": load["per_s"],
        "cpu_us_per_handshake": round(total_cpu / handshakes * 1e6, 1),
        "p50_ms": load["p50_ms"],
        "p99_ms": load["p99_ms"],
        "handshakes_per_cpu_s": round(handshakes / total_cpu, 1) if total_cpu > 0 else 0.0,
        "p90_ms": load["p90_ms"],
        "server_handshakes": window.handshakes,
        "client_connections": load["completed"],
        "client_resumed": load["resumed"],
        "client_errors": load["errors"],
        "client_error_kinds": load["error_kinds"],
        "tls_versions": load["tls_versions"],
        "server_cpu_s": round(window.server_cpu_s, 3),
        "server_cpu_share": round(total_cpu / wall, 2) if wall > 0 else 0.0,
        "generator_cpu_share": round(load["generator_cpu_s"] / wall, 2) if wall > 0 else 0.0,
        "key_path": server.key_path,
        "version": server.version,
        "duration_s": opts.duration_s,
        "connections": opts.connections,
        "server_cores": sorted(plan.proxy),
        "load_cores": sorted(plan.load),
        "shared_core": plan.shared,
        "load_avg_1m": round(load_avg, 2),
    }
    if window.profile is not None and window.profile.exists():
        # The server process's own CPU (without the key server's), split by where its samples fell.
        own_us = window.server_cpu_s / handshakes * 1e6
        row["profile_us_per_handshake"] = per_handshake(split_samples(window.profile.read_text()), own_us)
        row["profile_file"] = str(window.profile)
    if server.keyserver is not None:
        row["keyserver_cpu_us_per_handshake"] = round(window.keyserver_cpu_s / handshakes * 1e6, 1)
        row["keyserver_cpu_s"] = round(window.keyserver_cpu_s, 3)
    return row


def bench_one(name: str, key: str, files: KeyFiles, opts: HandshakeBenchOptions, plan: CpuPlan,
              workdir: Path, progress: Progress) -> dict[str, Any]:
    progress(f"{name}/{key}: starting on core {','.join(map(str, sorted(plan.proxy)))}")
    if name == "meshlet-batch" and opts.batch_poll_delay is not None:
        server = start_meshlet(name, key, files, plan.proxy, workdir, {"poll_delay": opts.batch_poll_delay})
    else:
        server = STARTERS[name](name, key, files, plan.proxy, workdir)
    try:
        load_avg = os.getloadavg()[0]
        progress(f"{name}/{key}: {opts.connections} connections, {opts.warmup_s:g} s warm-up, "
                 f"{opts.duration_s:g} s measured")
        load, window = run_load(server, opts, plan, workdir, f"{name}-{key}")
    finally:
        server.stop()
    row = to_row(name, key, server, load, window, opts, plan, load_avg)
    if name == "meshlet-batch":
        row["key_path"] += f", poll_delay {opts.batch_poll_delay or '0.2ms (default)'}"
    progress(f"{name}/{key}: {row['handshakes_per_s']:.0f} handshakes/s, "
             f"{row['cpu_us_per_handshake']:.0f} us CPU each, p99 {row['p99_ms']:.1f} ms")
    return row


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two targets, per key where both rows succeeded."""
    by = {(row["name"], row["key"]): row for row in rows if "error" not in row}
    batch_vs_stdlib: dict[str, float | None] = {}
    for key in KEYS:
        batch, stdlib = by.get(("meshlet-batch", key)), by.get(("stdlib-ssl", key))
        if batch is not None and stdlib is not None:
            batch_vs_stdlib[key] = _ratio(batch["handshakes_per_cpu_s"], stdlib["handshakes_per_cpu_s"])
    vs_haproxy: dict[str, float | None] = {}
    haproxy = by.get(("haproxy", "rsa2048"))
    if haproxy is not None:
        for (name, key), row in by.items():
            if key == "rsa2048" and name != "haproxy":
                vs_haproxy[name] = _ratio(row["cpu_us_per_handshake"], haproxy["cpu_us_per_handshake"])
    batch_ratio = batch_vs_stdlib.get("rsa2048")
    batch_cpu = vs_haproxy.get("meshlet-batch")
    return {
        "batch_vs_stdlib_handshakes_per_cpu_s": batch_vs_stdlib,
        "rsa2048_cpu_per_handshake_vs_haproxy": vs_haproxy,
        "targets": {
            "batch_at_least_2x_stdlib_rsa2048": None if batch_ratio is None else batch_ratio >= 2.0,
            "batch_at_least_2x_stdlib_p256": (None if batch_vs_stdlib.get("p256") is None
                                              else (batch_vs_stdlib["p256"] or 0.0) >= 2.0),
            "batch_rsa2048_cpu_below_haproxy": None if batch_cpu is None else batch_cpu < 1.0,
        },
    }


def selected_systems(opts: HandshakeBenchOptions, progress: Progress) -> list[str]:
    unknown = [s for s in opts.systems if s not in SYSTEMS] + [k for k in opts.keys if k not in KEYS]
    if unknown:
        raise ValueError(f"unknown system(s)/key(s): {', '.join(unknown)}")
    chosen = []
    for name in opts.systems:
        if opts.skip_missing and not external_available(name):
            progress(f"{name}: not installed, left out")
            continue
        chosen.append(name)
    return chosen


# Summed over rounds; every other number is the median of the rounds.
SUMMED = ("server_handshakes", "client_connections", "client_resumed", "client_errors", "server_cpu_s",
          "keyserver_cpu_s")


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a (system, key)'s rounds: medians (sums for counts); a failed round fails the row."""
    failed = [row for row in rows if "error" in row]
    if failed:
        return failed[0]
    merged = dict(rows[0])
    for name, value in rows[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        values = [row[name] for row in rows]
        merged[name] = round(sum(values) if name in SUMMED else statistics.median(values), 3)
    merged["rounds"] = len(rows)
    if len(rows) > 1:
        # The spread says how much the machine moved the figure between rounds.
        merged["cpu_us_per_handshake_rounds"] = [row["cpu_us_per_handshake"] for row in rows]
    return merged


def run_handshake_bench(opts: HandshakeBenchOptions, progress: Progress) -> dict[str, Any]:
    """Every (system, key) of ``opts``, ``opts.rounds`` times, alternating systems so that
    slow drifts of the machine hit them alike; one that fails gets a row with ``error``."""
    systems = selected_systems(opts, progress)
    plan = plan_cpus()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(name, key): [] for key in opts.keys
                                                         for name in systems}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-handshake-") as tmp:
        workdir = Path(tmp)
        files = {key: write_key_files(key, workdir) for key in opts.keys}
        for round_no in range(1, opts.rounds + 1):
            if opts.rounds > 1:
                progress(f"round {round_no} of {opts.rounds}")
            for (name, key), done in runs.items():
                if any("error" in row for row in done):
                    continue
                try:
                    done.append(bench_one(name, key, files[key], opts, plan, workdir, progress))
                except (ChildError, OSError, ValueError) as exc:
                    progress(f"{name}/{key}: failed: {exc}")
                    done.append({"name": name, "key": key, "error": str(exc)})
    progress(f"done in {time.monotonic() - started:.0f} s")
    rows = [merge_rounds(done) for done in runs.values()]
    return {"rows": rows, "ratios": ratios(rows)}
