"""The regex routing benchmark: every regex engine at 10, 100 and 1000 regex routes.

Each route table is one catch-all virtual host with N regex routes shaped like
real API routes (``/api/v[0-9]+/svc{i}/items/[a-z0-9-]+``) and, last, a prefix
route ``/`` so every request is answered by the upstream. Request paths come in
three equal groups: *early* (matching one of the first tenth of the regex
routes), *late* (one of the last tenth) and *none* (close misses that match no
regex route and fall through to the last route, the most expensive case for
sequential matching).

For each (engine, routes) row:

* ``match_ns``: the median time of one ``RouteTable.select``, measured in this
  process over batches of calls on every path of the mix (also per group);
* ``proxy_rps``: saturation throughput of a real ``meshlet proxy`` process with
  that table (pinned to one core), driven by ``wrk`` cycling through the same
  paths: the median over rounds that alternate the engines, so that load from
  the rest of the machine falls on every engine alike; beside it the proxy's
  CPU time per request (``proxy_cpu_us_per_request``, from /proc), which such
  load disturbs less;
* ``speedup_vs_re``: these figures relative to the stdlib ``re`` row of the
  same route count.

Everything started here is stopped here, and every phase is bounded in time.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import meshlet
from meshlet.bench.apps import start_upstream
from meshlet.bench.configs import dump, single_route_proxy
from meshlet.bench.procs import LOOPBACK, Child, ChildError, cpu_seconds, free_port
from meshlet.bench.proxy import CpuPlan, ProxyUnderTest, plan_cpus, wait_proxy_ready
from meshlet.bench.wrk import WrkResult, parse_wrk, wrk_argv
from meshlet.config.context import CompileContext, compiling
from meshlet.config.loader import parse_resource
from meshlet.config.routes import compile_route_configuration
from meshlet.errors import ConfigError
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing import RouteTable
from meshlet.proxy.routing.regex import regex_engine

ENGINES = ("re", "re2", "hyperscan")
ROUTE_COUNTS = (10, 100, 1000)
GROUPS = ("early", "late", "none")
RC_URL = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# Hyperscan compiles a thousand patterns in seconds: the proxy gets time to start.
READY_TIMEOUT = 120.0
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class RegexBenchOptions:
    engines: tuple[str, ...] = ENGINES
    route_counts: tuple[int, ...] = ROUTE_COUNTS
    paths_per_group: int = 32
    calls_per_batch: int = 20
    batches_per_path: int = 15
    rps_rounds: int = 3
    rps_duration_s: float = 3.0  # per round and engine
    warmup_s: float = 1.0
    connections: int = 16
    seed: int = 1


# A smoke run (about 10 s): shapes and sanity, not figures to quote.
QUICK = RegexBenchOptions(route_counts=(100,), paths_per_group=6, calls_per_batch=5, batches_per_path=3,
                          rps_rounds=1, rps_duration_s=1.0, warmup_s=0.0, connections=4)


# --------------------------------------------------------------------------- #
# The workload
# --------------------------------------------------------------------------- #


def route_pattern(i: int) -> str:
    return f"/api/v[0-9]+/svc{i}/items/[a-z0-9-]+"


def route_config(count: int) -> dict[str, Any]:
    """``count`` regex routes to the upstream, then a catch-all prefix route."""
    routes: list[dict[str, Any]] = [
        {"name": f"svc{i}", "match": {"safe_regex": {"regex": route_pattern(i)}},
         "route": {"cluster": "upstream"}}
        for i in range(count)
    ]
    routes.append({"name": "fallback", "match": {"prefix": "/"}, "route": {"cluster": "upstream"}})
    return {"name": "bench", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}


@dataclass(frozen=True, slots=True)
class PathMix:
    by_group: dict[str, list[str]]

    @property
    def interleaved(self) -> list[str]:
        """early, late, none, early, late, none, ... (what wrk cycles through)."""
        return [path for trio in zip(*(self.by_group[g] for g in GROUPS), strict=True) for path in trio]


def path_mix(count: int, per_group: int, rng: random.Random) -> PathMix:
    tenth = max(1, count // 10)

    def item() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-") for _ in range(rng.randint(4, 12)))

    def hit(low: int, high: int) -> str:
        return f"/api/v{rng.randint(1, 3)}/svc{rng.randrange(low, high)}/items/{item()}"

    def miss() -> str:
        # Shares every route's prefix and fails late: "items" becomes "orders", or an upper-case id.
        service = rng.randrange(count)
        if rng.random() < 0.5:
            return f"/api/v1/svc{service}/orders/{item()}"
        return f"/api/v2/svc{service}/items/{item().upper()}X"

    return PathMix({
        "early": [hit(0, tenth) for _ in range(per_group)],
        "late": [hit(count - tenth, count) for _ in range(per_group)],
        "none": [miss() for _ in range(per_group)],
    })


def build_table(count: int, engine: str) -> RouteTable:
    msg = parse_resource(RC_URL, route_config(count), "route_config")
    with compiling(CompileContext(regex=regex_engine(engine, "engine"))):
        config = compile_route_configuration(msg, "route_config")
    if not isinstance(config.table, RouteTable):
        raise TypeError("the compiled route configuration has no route table")
    return config.table


# --------------------------------------------------------------------------- #
# In-process: route selection time
# --------------------------------------------------------------------------- #


class WorkloadError(RuntimeError):
    """A generated path does not land where its group says (a bug in the workload)."""


def check_selection(table: RouteTable, mix: PathMix, count: int) -> None:
    """The workload must do what it says: early/late paths hit a regex route, none do not."""
    for group, paths in mix.by_group.items():
        for path in paths:
            found = table.select(_head(path))
            name = found[1].name if found is not None else None
            if (name == "fallback") is not (group == "none"):
                raise WorkloadError(f"{group} path {path!r} selected {name!r} with {count} routes")


def _head(path: str) -> RequestHead:
    return RequestHead(method="GET", scheme="http", authority="bench", path=path, headers=[])


def time_per_call(table: RouteTable, path: str, calls: int) -> float:
    """Nanoseconds per ``select`` over one batch of ``calls`` calls."""
    head = _head(path)
    select = table.select
    start = time.perf_counter_ns()
    for _ in range(calls):
        select(head)
    return (time.perf_counter_ns() - start) / calls


def measure_matching(table: RouteTable, mix: PathMix, opts: RegexBenchOptions) -> dict[str, float]:
    """Median ns per selection: over the whole mix ("all") and per group."""
    samples: dict[str, list[float]] = {group: [] for group in GROUPS}
    for path in mix.interleaved[: len(GROUPS)]:
        time_per_call(table, path, opts.calls_per_batch)  # warm caches and allocators
    for _ in range(opts.batches_per_path):
        for group in GROUPS:
            for path in mix.by_group[group]:
                samples[group].append(time_per_call(table, path, opts.calls_per_batch))
    medians = {group: statistics.median(values) for group, values in samples.items()}
    medians["all"] = statistics.median([v for values in samples.values() for v in values])
    return medians


# --------------------------------------------------------------------------- #
# End to end: a proxy process with the table
# --------------------------------------------------------------------------- #


def wrk_script(paths: Sequence[str]) -> str:
    quoted = ", ".join(f'"{p}"' for p in paths)  # paths are [a-zA-Z0-9/-] only
    return (
        f"local paths = {{{quoted}}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #paths + 1\n"
        "  return wrk.format(\"GET\", paths[i])\n"
        "end\n"
    )


def run_wrk_paths(url: str, script: Path, *, connections: int, duration: float, cpus: set[int]) -> WrkResult:
    argv = wrk_argv(url, threads=1, connections=connections, duration=duration)
    argv[1:1] = ["-s", str(script)]
    argv = ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ChildError(f"wrk did not finish within {duration + 30:.0f} s") from exc
    except FileNotFoundError as exc:
        raise ChildError(f"{argv[0]} is not installed") from exc
    if done.returncode != 0:
        raise ChildError(f"wrk failed (exit {done.returncode}): {done.stderr.strip()[:200]}")
    return parse_wrk(done.stdout)


def start_proxy(workdir: Path, count: int, engine: str, upstream_port: int, cpus: set[int]) -> ProxyUnderTest:
    port, admin_port = free_port(), free_port()
    bootstrap = single_route_proxy(port, upstream_port, admin_port)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"] = route_config(count)
    config = workdir / f"regex-{engine}-{count}.yaml"
    config.write_text(dump(bootstrap))
    argv = [sys.executable, "-m", "meshlet.cli.main", "proxy", "--config", str(config),
            "--regex-engine", engine, "--log-level", "warning"]
    log = workdir / f"regex-{engine}-{count}.log"
    child = Child(f"meshlet proxy ({engine}, {count} routes)", argv, cpus=cpus, log_path=log).start()
    return ProxyUnderTest(engine, child, port, meshlet.__version__)


@dataclass(slots=True)
class ProxyFigures:
    """One engine's proxy over the rounds of a route count."""

    rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    cpu_s: float = 0.0

    def add(self, wrk: WrkResult, cpu_s: float) -> None:
        self.rps.append(wrk.rps)
        self.p50_ms.append(wrk.latency_ms.get(50, 0.0))
        self.p99_ms.append(wrk.latency_ms.get(99, 0.0))
        self.requests += wrk.requests
        self.errors += wrk.socket_errors + wrk.non_2xx
        self.cpu_s += cpu_s

    def as_values(self) -> dict[str, Any]:
        return {
            "proxy_rps": round(statistics.median(self.rps), 1),
            "proxy_rps_rounds": [round(r, 1) for r in self.rps],
            "proxy_cpu_us_per_request": round(self.cpu_s / max(self.requests, 1) * 1e6, 1),
            "proxy_p50_ms": round(statistics.median(self.p50_ms), 3),
            "proxy_p99_ms": round(statistics.median(self.p99_ms), 3),
            "proxy_requests": self.requests,
            "proxy_errors": self.errors,
        }


class ProxySet:
    """One proxy per engine for a route count, all started at once (their tables
    compile side by side) and loaded one at a time."""

    def __init__(self, workdir: Path, count: int, upstream_port: int, plan: CpuPlan) -> None:
        self.workdir = workdir
        self.count = count
        self.upstream_port = upstream_port
        self.plan = plan
        self.running: dict[str, ProxyUnderTest] = {}
        self.failed: dict[str, str] = {}

    def start(self, engines: Sequence[str]) -> None:
        for engine in engines:
            self.running[engine] = start_proxy(self.workdir, self.count, engine, self.upstream_port,
                                               self.plan.proxy)
        for engine, target in list(self.running.items()):
            self._guarded(engine, partial(wait_proxy_ready, target, READY_TIMEOUT))

    def load(self, engine: str, url_path_script: Path, duration: float, connections: int,
             figures: ProxyFigures | None) -> None:
        target = self.running.get(engine)
        if target is None:
            return

        def run() -> None:
            url = f"http://{LOOPBACK}:{target.port}/"
            before = cpu_seconds(target.child.pid)
            wrk = run_wrk_paths(url, url_path_script, connections=connections, duration=duration,
                                cpus=self.plan.load)
            spent = cpu_seconds(target.child.pid) - before
            target.child.check_alive()
            if figures is not None:
                figures.add(wrk, spent)

        self._guarded(engine, run)

    def stop(self) -> None:
        for target in self.running.values():
            target.child.stop()
        self.running.clear()

    def _guarded(self, engine: str, step: Callable[[], None]) -> None:
        """Run ``step``; a failure takes only this engine's proxy out of the count."""
        try:
            step()
        except ChildError as exc:
            self.failed[engine] = str(exc)
            self.running.pop(engine).child.stop()


def measure_proxies(workdir: Path, count: int, engines: Sequence[str], mix: PathMix, upstream_port: int,
                    plan: CpuPlan, opts: RegexBenchOptions,
                    progress: Progress) -> dict[str, ProxyFigures | str]:
    """Figures per engine (or why there are none). Rounds alternate engines so that
    noise from the rest of the machine falls on all of them alike."""
    script = workdir / f"paths-{count}.lua"
    script.write_text(wrk_script(mix.interleaved))
    proxies = ProxySet(workdir, count, upstream_port, plan)
    figures = {engine: ProxyFigures() for engine in engines}
    try:
        progress(f"{count} routes: starting a proxy per engine ({', '.join(engines)})")
        proxies.start(engines)
        for engine in engines:
            if opts.warmup_s > 0:
                proxies.load(engine, script, opts.warmup_s, opts.connections, None)
        for round_number in range(1, opts.rps_rounds + 1):
            progress(f"{count} routes: round {round_number}/{opts.rps_rounds}, "
                     f"wrk -t1 -c{opts.connections} -d{opts.rps_duration_s:g}s per engine")
            for engine in engines:
                proxies.load(engine, script, opts.rps_duration_s, opts.connections, figures[engine])
    finally:
        proxies.stop()
    return {engine: proxies.failed.get(engine, figures[engine]) for engine in engines}


# --------------------------------------------------------------------------- #
# The experiment
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class Row:
    engine: str
    routes: int
    values: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "routes": self.routes, **self.values}


def matching_row(engine: str, count: int, mix: PathMix, opts: RegexBenchOptions, progress: Progress) -> Row:
    row = Row(engine, count)
    try:
        started = time.perf_counter()
        table = build_table(count, engine)
        compile_s = time.perf_counter() - started
    except ConfigError as exc:  # e.g. the engine's library is not installed
        progress(f"{engine}, {count} routes: failed: {exc}")
        row.values["error"] = str(exc)
        return row
    check_selection(table, mix, count)
    medians = measure_matching(table, mix, opts)
    row.values.update({
        "match_ns": round(medians["all"], 1),
        **{f"match_ns_{group}": round(medians[group], 1) for group in GROUPS},
        "compile_s": round(compile_s, 3),
    })
    progress(f"{engine}, {count} routes: {medians['all']:.0f} ns per selection "
             f"(table compiled in {compile_s:.2f} s)")
    return row


def rows_for(count: int, workdir: Path, upstream_port: int, plan: CpuPlan, opts: RegexBenchOptions,
             progress: Progress) -> list[Row]:
    mix = path_mix(count, opts.paths_per_group, random.Random(opts.seed * 7919 + count))
    rows = [matching_row(engine, count, mix, opts, progress) for engine in opts.engines]
    ready = [row.engine for row in rows if "error" not in row.values]
    measured = measure_proxies(workdir, count, ready, mix, upstream_port, plan, opts, progress)
    for row in rows:
        found = measured.get(row.engine)
        if isinstance(found, str):
            progress(f"{row.engine}, {count} routes: proxy failed: {found}")
            row.values["error"] = found  # the in-process figures stand
        elif found is not None:
            row.values.update(found.as_values())
            row.values.update({"connections": opts.connections, "duration_s": opts.rps_duration_s,
                               "shared_core": plan.shared})
            progress(f"{row.engine}, {count} routes: {row.values['proxy_rps']:.0f} req/s through the proxy, "
                     f"{row.values['proxy_cpu_us_per_request']:.0f} us CPU per request")
    return rows


def add_speedups(rows: list[Row]) -> None:
    """``speedup_vs_re``: how many times better than stdlib ``re`` at the same route count
    (selection time, proxy throughput, proxy CPU per request)."""
    baseline = {row.routes: row.values for row in rows if row.engine == "re"}
    for row in rows:
        base = baseline.get(row.routes, {})
        speedup: dict[str, float] = {}
        if base.get("match_ns") and row.values.get("match_ns"):
            speedup["match"] = round(base["match_ns"] / row.values["match_ns"], 2)
        if base.get("proxy_rps") and row.values.get("proxy_rps"):
            speedup["proxy_rps"] = round(row.values["proxy_rps"] / base["proxy_rps"], 3)
        if base.get("proxy_cpu_us_per_request") and row.values.get("proxy_cpu_us_per_request"):
            cpu_ratio = base["proxy_cpu_us_per_request"] / row.values["proxy_cpu_us_per_request"]
            speedup["proxy_cpu"] = round(cpu_ratio, 3)
        if speedup:
            row.values["speedup_vs_re"] = speedup


def run_regex_bench(opts: RegexBenchOptions, progress: Progress) -> dict[str, Any]:
    """Every (engine, routes) row; one that fails (an engine not installed, a proxy that
    would not start) gets ``error`` and the others still run."""
    unknown = [e for e in opts.engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine(s): {', '.join(unknown)} (known: {', '.join(ENGINES)})")
    plan = plan_cpus()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-regex-") as tmp:
        workdir = Path(tmp)
        upstream, upstream_port = start_upstream(cpus=plan.load)
        try:
            for count in opts.route_counts:
                rows.extend(rows_for(count, workdir, upstream_port, plan, opts, progress))
        finally:
            upstream.stop()
    add_speedups(rows)
    return {"rows": [row.as_dict() for row in rows]}
