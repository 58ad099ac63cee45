"""The proxy benchmark: meshlet beside HAProxy on the same path, in the same run.

Path: load generator -> proxy (pinned to one core) -> sample upstream (1 KiB
responses, keep-alive). The load generators and the upstream share the other
cores. For each proxy:

1. warm-up, then saturation throughput with ``wrk -t1 -c32 --latency``;
2. latency at a fixed 1000 req/s from the open-loop generator (latency from
   the scheduled send time), with the proxy's CPU time (utime+stime from
   /proc) read before and after, giving CPU seconds per 1000 requests;
3. resident memory (VmRSS at the end of the load, and the VmHWM peak).

Everything started here is stopped here, and every phase is bounded in time.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

import meshlet
from meshlet.bench.apps import start_upstream
from meshlet.bench.client import build_request, fetch
from meshlet.bench.configs import dump, single_route_proxy
from meshlet.bench.haproxy import haproxy_argv, haproxy_binary, haproxy_config, haproxy_version
from meshlet.bench.openloop import OpenLoopResult, run_open_loop
from meshlet.bench.procs import (
    LOOPBACK,
    Child,
    ChildError,
    cpu_seconds,
    free_port,
    memory,
    online_cpus,
    wait_for_port,
)
from meshlet.bench.wrk import WrkResult, run_wrk

SYSTEMS = ("meshlet", "haproxy")
READY_TIMEOUT = 15.0
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ProxyBenchOptions:
    saturation_s: float = 10.0
    connections: int = 32  # wrk's, for saturation
    fixed_rate: float = 1000.0
    fixed_rate_s: float = 10.0
    fixed_rate_connections: int = 16
    warmup_s: float = 2.0
    systems: tuple[str, ...] = SYSTEMS
    rounds: int = 1


# A smoke run (about 10 s for both systems): shapes and sanity, not figures to quote.
QUICK = ProxyBenchOptions(saturation_s=1.0, connections=8, fixed_rate_s=1.0, fixed_rate_connections=8,
                          warmup_s=0.0)


@dataclass(frozen=True, slots=True)
class CpuPlan:
    proxy: set[int]  # the proxy under test: one core
    load: set[int]  # generators and upstream
    machine_cores: int

    @property
    def shared(self) -> bool:
        return bool(self.proxy & self.load)


def plan_cpus(cpus: list[int] | None = None) -> CpuPlan:
    available = cpus if cpus is not None else online_cpus()
    if len(available) < 2:
        # One core: everything shares it; the rows say so (shared_core).
        return CpuPlan({available[0]}, {available[0]}, len(available))
    return CpuPlan({available[0]}, set(available[1:]), len(available))


# --------------------------------------------------------------------------- #
# Starting the proxies
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class ProxyUnderTest:
    name: str
    child: Child
    port: int
    version: str


def start_meshlet(workdir: Path, upstream_port: int, cpus: set[int]) -> ProxyUnderTest:
    port, admin_port = free_port(), free_port()
    config = workdir / "meshlet-bench.yaml"
    config.write_text(dump(single_route_proxy(port, upstream_port, admin_port)))
    argv = [sys.executable, "-m", "meshlet.cli.main", "proxy", "--config", str(config),
            "--log-level", "warning"]
    child = Child("meshlet proxy", argv, cpus=cpus, log_path=workdir / "meshlet.log").start()
    return ProxyUnderTest("meshlet", child, port, meshlet.__version__)


def start_haproxy(workdir: Path, upstream_port: int, cpus: set[int]) -> ProxyUnderTest:
    binary = haproxy_binary()
    if binary is None:
        raise ChildError("haproxy is not installed (Debian package: haproxy)")
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(haproxy_config(port, upstream_port))
    argv = haproxy_argv(binary, config)
    child = Child("haproxy", argv, cpus=cpus, log_path=workdir / "haproxy.log").start()
    return ProxyUnderTest("haproxy", child, port, haproxy_version(binary))


STARTERS: dict[str, Callable[[Path, int, set[int]], ProxyUnderTest]] = {
    "meshlet": start_meshlet,
    "haproxy": start_haproxy,
}


def wait_proxy_ready(target: ProxyUnderTest, timeout: float = READY_TIMEOUT) -> None:
    """Ready means a request through the proxy came back 200 from the upstream."""
    deadline = time.monotonic() + timeout
    wait_for_port(target.port, timeout, child=target.child)
    request = build_request("GET", "/", f"{LOOPBACK}:{target.port}")
    while True:
        status, _ = uvloop.run(fetch(LOOPBACK, target.port, request, timeout=2.0))
        if status == 200:
            return
        target.child.check_alive()
        if time.monotonic() >= deadline:
            raise ChildError(f"{target.name} did not proxy a request within {timeout:.0f} s (last: {status})")
        time.sleep(0.1)


# --------------------------------------------------------------------------- #
# Measuring one proxy
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class Measurement:
    version: str
    load_average: float  # the machine's 1-minute load before the run: noise from other work
    wrk: WrkResult
    fixed: OpenLoopResult
    cpu_s: float
    rss_mb: float
    hwm_mb: float


def measure(target: ProxyUnderTest, opts: ProxyBenchOptions, plan: CpuPlan,
            progress: Progress) -> Measurement:
    url = f"http://{LOOPBACK}:{target.port}/"
    load_average = os.getloadavg()[0]
    if opts.warmup_s > 0:
        progress(f"{target.name}: warm-up {opts.warmup_s:g} s")
        run_wrk(url, threads=1, connections=opts.connections, duration=opts.warmup_s, cpus=plan.load)
    progress(f"{target.name}: saturation, wrk -t1 -c{opts.connections} -d{opts.saturation_s:g}s")
    wrk = run_wrk(url, threads=1, connections=opts.connections, duration=opts.saturation_s, cpus=plan.load)
    progress(f"{target.name}: {wrk.rps:.0f} req/s; "
             f"fixed rate {opts.fixed_rate:g} req/s for {opts.fixed_rate_s:g} s")
    request = build_request("GET", "/", f"{LOOPBACK}:{target.port}")
    cpu_before = cpu_seconds(target.child.pid)
    with pinned(plan.load):
        fixed = uvloop.run(run_open_loop(LOOPBACK, target.port, request, rate=opts.fixed_rate,
                                         duration=opts.fixed_rate_s,
                                         connections=opts.fixed_rate_connections))
    cpu_after = cpu_seconds(target.child.pid)
    mem = memory(target.child.pid)
    target.child.check_alive()
    return Measurement(target.version, load_average, wrk, fixed, cpu_after - cpu_before, mem.rss_mb,
                       mem.hwm_mb)


def to_row(name: str, m: Measurement, opts: ProxyBenchOptions, plan: CpuPlan) -> dict[str, Any]:
    fixed = m.fixed
    answered = max(fixed.completed, 1)
    return {
        "name": name,
        "rps_max": round(m.wrk.rps, 1),
        "p50_ms": round(fixed.latency(0.50), 3),
        "p90_ms": round(fixed.latency(0.90), 3),
        "p99_ms": round(fixed.latency(0.99), 3),
        "cpu_s_per_1000_req": round(m.cpu_s / answered * 1000, 4),
        "rss_mb": round(m.rss_mb, 1),
        "rss_hwm_mb": round(m.hwm_mb, 1),
        "duration_s": opts.saturation_s,
        "connections": opts.connections,
        "cores": len(plan.proxy),
        "machine_cores": plan.machine_cores,
        "shared_core": plan.shared,
        "fixed_rate_rps": opts.fixed_rate,
        "fixed_rate_duration_s": opts.fixed_rate_s,
        "fixed_rate_connections": opts.fixed_rate_connections,
        "fixed_rate_requests": fixed.completed,
        "fixed_rate_errors": fixed.errors,
        "fixed_rate_non_2xx": sum(n for status, n in fixed.statuses.items() if not 200 <= status < 300),
        "generator_lag_p99_ms": round(fixed.dispatch_lag_p99_ms, 3),
        "saturation_requests": m.wrk.requests,
        "saturation_errors": m.wrk.socket_errors + m.wrk.non_2xx,
        "cpu_s": round(m.cpu_s, 3),
        "version": m.version,
        "load_average": round(m.load_average, 2),
    }


@contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


# --------------------------------------------------------------------------- #
# The experiment
# --------------------------------------------------------------------------- #


def bench_one(name: str, workdir: Path, upstream_port: int, opts: ProxyBenchOptions, plan: CpuPlan,
              progress: Progress) -> dict[str, Any]:
    progress(f"{name}: starting on core {','.join(map(str, sorted(plan.proxy)))}")
    target = STARTERS[name](workdir, upstream_port, plan.proxy)
    try:
        wait_proxy_ready(target)
        return to_row(name, measure(target, opts, plan, progress), opts, plan)
    finally:
        target.child.stop()


# Summed over rounds; every other number is the median of the rounds.
SUMMED = ("fixed_rate_requests", "fixed_rate_errors", "fixed_rate_non_2xx", "saturation_requests",
          "saturation_errors", "cpu_s")


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a system's rounds: medians (sums for counts); any failed round fails the row."""
    failed = [row for row in rows if "error" in row]
    if failed:
        return failed[0]
    merged = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        values = [row[key] for row in rows]
        merged[key] = round(sum(values) if key in SUMMED else statistics.median(values), 4)
    # CPU per request over all rounds: total CPU over total requests.
    merged["cpu_s_per_1000_req"] = round(merged["cpu_s"] / max(merged["fixed_rate_requests"], 1) * 1000, 4)
    merged["rounds"] = len(rows)
    return merged


def run_proxy_bench(opts: ProxyBenchOptions, progress: Progress) -> dict[str, Any]:
    """Run every system in ``opts.systems``, ``opts.rounds`` times, alternating systems so
    that slow drifts of the machine hit them alike; a system that fails gets a row with ``error``."""
    unknown = [s for s in opts.systems if s not in STARTERS]
    if unknown:
        raise ValueError(f"unknown system(s): {', '.join(unknown)} (known: {', '.join(STARTERS)})")
    plan = plan_cpus()
    per_system: dict[str, list[dict[str, Any]]] = {name: [] for name in opts.systems}
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-") as tmp:
        workdir = Path(tmp)
        progress(f"upstream: starting on core(s) {','.join(map(str, sorted(plan.load)))}")
        upstream, upstream_port = start_upstream(cpus=plan.load)
        try:
            for round_no in range(1, opts.rounds + 1):
                if opts.rounds > 1:
                    progress(f"round {round_no} of {opts.rounds}")
                for name in opts.systems:
                    if any("error" in row for row in per_system[name]):
                        continue
                    try:
                        per_system[name].append(bench_one(name, workdir, upstream_port, opts, plan, progress))
                    except ChildError as exc:
                        progress(f"{name}: failed: {exc}")
                        per_system[name].append({"name": name, "error": str(exc)})
        finally:
            upstream.stop()
    return {"rows": [merge_rounds(rows) for rows in per_system.values()]}
