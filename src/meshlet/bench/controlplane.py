"""``meshlet bench controlplane``: the control plane under a mesh's worth of proxies.

The control plane runs as its own process (``meshlet control-plane run`` on a
fresh SQLite store), holding ``services`` Services and one registered Workload
per simulated proxy. ``workers`` processes each open real ADS streams (gRPC,
``meshlet.xds.loadgen``) for their share of the ``proxies`` sidecars, which
subscribe to every type and ACK every response. Once every proxy has its first
config, the benchmark changes one VirtualService ``changes`` times; that change
reaches every sidecar's outbound routes, and the time from the write to the
arrival (ACKed at once) of the new RouteConfiguration at each proxy gives
``push_p50_ms`` / ``push_p99_ms``. The control plane's peak RSS (``rss_mb``,
VmHWM) and CPU seconds (``cpu_s``, whole run; ``push_cpu_s`` during the
changes) come from /proc.

Workers report on stdout, one JSON object a line: ``{"ready": n}`` once all
their proxies have a first config, then ``{"round": r, "arrivals": [...]}``
each time every one of their proxies has a route configuration other than the
one it had at the previous round (the unix time each new one arrived). The
harness makes one change per round and waits for every worker's line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.bench.procs import Child, ChildError, cpu_seconds, memory
from meshlet.bench.stats import percentile

SERVICE_PORT = 9080
APPLY_BATCH = 500
READY_TIMEOUT = 60.0
FIRST_CONFIG_TYPES = ("Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment")

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ControlPlaneBenchOptions:
    services: int = 1000
    proxies: int = 2000
    workers: int = 2
    channels: int = 16  # gRPC channels per worker
    changes: int = 5
    delta: bool = False
    sync_timeout: float = 300.0  # first config to every proxy
    push_timeout: float = 60.0  # one change to every proxy


QUICK = ControlPlaneBenchOptions(services=20, proxies=40, workers=1, channels=4, changes=2,
                                 sync_timeout=60.0, push_timeout=30.0)


# -- the mesh's config ------------------------------------------------------------------------------ #


def proxy_address(index: int) -> str:
    return f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}"


def proxy_node_id(index: int) -> str:
    return f"sidecar~{proxy_address(index)}~w-{index}.default~default.svc.cluster.local"


def services_yaml(count: int) -> list[str]:
    return [f"apiVersion: meshlet.dev/v1\nkind: Service\nmetadata: {{name: svc-{i}}}\n"
            f"spec: {{ports: [{{name: http, number: {SERVICE_PORT}, protocol: HTTP}}]}}\n"
            for i in range(count)]


def workloads_yaml(proxies: int, services: int) -> list[str]:
    return [f"apiVersion: meshlet.dev/v1\nkind: Workload\nmetadata: {{name: w-{i}}}\n"
            f"spec: {{address: {proxy_address(i)}, ports: {{http: {SERVICE_PORT}}}, "
            f"labels: {{app: svc-{i % services}, version: v1}}, proxyId: \"{proxy_node_id(i)}\"}}\n"
            for i in range(proxies)]


def change_yaml(step: int) -> str:
    """A VirtualService on svc-0 whose timeout differs each step: every sidecar's
    outbound route configuration for the service port changes."""
    return ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: svc-0}\n"
            f"spec: {{hosts: [svc-0], http: [{{timeout: {step + 1}s, "
            "route: [{destination: {host: svc-0}}]}]}\n")


# -- the harness -------------------------------------------------------------------------------------- #


def _apply(api_url: str, documents: Sequence[str]) -> None:
    import httpx

    with httpx.Client(timeout=120.0) as client:
        for start in range(0, len(documents), APPLY_BATCH):
            body = "---\n".join(documents[start:start + APPLY_BATCH])
            response = client.post(f"{api_url}/apply", content=body)
            if response.status_code != 200:
                raise ChildError(f"apply failed: HTTP {response.status_code}: {response.text[:300]}")


def _start_control_plane(workdir: Path) -> tuple[Child, str, str]:
    argv = [sys.executable, "-m", "meshlet.cli.main", "control-plane", "run", "--store",
            f"sqlite:{workdir / 'meshlet.db'}", "--api-port", "0", "--xds-port", "0",
            "--log-level", "warning"]
    plane = Child("control plane", argv, capture_stdout=True, log_path=workdir / "control-plane.log").start()
    ready = plane.read_stdout_line(r"api=(\S+) xds=(\S+)", READY_TIMEOUT)
    return plane, ready.group(1), ready.group(2)


def _start_worker(index: int, xds: str, first: int, count: int, opts: ControlPlaneBenchOptions,
                  workdir: Path) -> Child:
    argv = [sys.executable, "-m", "meshlet.bench.controlplane", "--xds", xds, "--first", str(first),
            "--count", str(count), "--channels", str(opts.channels), *(["--delta"] if opts.delta else [])]
    log = workdir / f"worker-{index}.log"
    return Child(f"worker {index}", argv, capture_stdout=True, log_path=log).start()


def _reply(worker: Child, key: str, timeout: float) -> dict[str, Any]:
    found = worker.read_stdout_line(r"^\{.*\}$", timeout)
    reply: dict[str, Any] = json.loads(found.group(0))
    if key not in reply:
        raise ChildError(f"{worker.name}: expected {key!r}, got {found.group(0)[:200]}")
    return reply


def _shares(total: int, parts: int) -> list[tuple[int, int]]:
    """(first, count) of each of ``parts`` near-equal slices of ``range(total)``."""
    size, extra = divmod(total, parts)
    out, first = [], 0
    for i in range(parts):
        count = size + (1 if i < extra else 0)
        out.append((first, count))
        first += count
    return [share for share in out if share[1] > 0]


def run_controlplane_bench(opts: ControlPlaneBenchOptions, progress: Progress) -> dict[str, Any]:
    row: dict[str, Any] = {"name": "meshlet-control-plane", "services": opts.services,
                           "proxies": opts.proxies, "workers": opts.workers,
                           "protocol": "delta" if opts.delta else "sotw", "changes": opts.changes}
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-cp-") as tmp:
        workdir = Path(tmp)
        plane, api_url, xds = _start_control_plane(workdir)
        workers: list[Child] = []
        try:
            progress(f"control plane up (api {api_url}, xDS {xds}); storing {opts.services} services and "
                     f"{opts.proxies} workloads")
            started = time.monotonic()
            _apply(api_url, services_yaml(opts.services) + workloads_yaml(opts.proxies, opts.services))
            row["store_s"] = round(time.monotonic() - started, 2)
            started = time.monotonic()
            workers = [_start_worker(i, xds, first, count, opts, workdir)
                       for i, (first, count) in enumerate(_shares(opts.proxies, opts.workers))]
            for worker in workers:
                _reply(worker, "ready", opts.sync_timeout)
            row["initial_sync_s"] = round(time.monotonic() - started, 2)
            progress(f"{opts.proxies} proxies have their first config after {row['initial_sync_s']} s")
            row.update(_measure_pushes(api_url, plane, workers, opts, progress))
            usage = memory(plane.pid)
            row["rss_mb"] = round(usage.hwm_mb, 1)
            row["rss_now_mb"] = round(usage.rss_mb, 1)
            row["cpu_s"] = round(cpu_seconds(plane.pid), 2)
        except ChildError as exc:
            row["error"] = str(exc)
        finally:
            for worker in workers:
                worker.stop()
            plane.stop()
    return {"rows": [row]}


def _measure_pushes(api_url: str, plane: Child, workers: list[Child], opts: ControlPlaneBenchOptions,
                    progress: Progress) -> dict[str, Any]:
    latencies_ms: list[float] = []
    cpu_before = cpu_seconds(plane.pid)
    for step in range(opts.changes):
        written = time.time()
        _apply(api_url, [change_yaml(step)])
        for worker in workers:
            reply = _reply(worker, "round", opts.push_timeout)
            latencies_ms += [(arrived - written) * 1000 for arrived in reply["arrivals"]]
        progress(f"change {step + 1}/{opts.changes}: every proxy has it after "
                 f"{max(latencies_ms[-opts.proxies:]):.0f} ms")
    latencies_ms.sort()
    return {"push_p50_ms": round(percentile(latencies_ms, 0.5), 1),
            "push_p99_ms": round(percentile(latencies_ms, 0.99), 1),
            "push_max_ms": round(latencies_ms[-1], 1) if latencies_ms else None,
            "push_cpu_s": round(cpu_seconds(plane.pid) - cpu_before, 2)}


# -- the worker process ------------------------------------------------------------------------------- #


def _emit(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


async def run_worker(xds: str, first: int, count: int, channels: int, delta: bool) -> None:
    from meshlet.xds.loadgen import Fleet
    from meshlet.xds.snapshot import ROUTE, TYPE_PREFIX

    fleet = Fleet(xds, channels=channels)
    proxies = [fleet.add(proxy_node_id(i), delta=delta, clock=time.time) for i in range(first, first + count)]
    needed = [next(t for t in _type_urls() if t.endswith("." + name)) for name in FIRST_CONFIG_TYPES]
    assert all(t.startswith(TYPE_PREFIX) for t in needed)
    try:
        while not all(all(t in p.latest for t in needed) for p in proxies):
            await asyncio.sleep(0.05)
        _emit({"ready": count})
        baseline = [p.latest.get(ROUTE) for p in proxies]
        round_number = 0
        while True:
            await asyncio.sleep(0.01)
            if any(p.latest.get(ROUTE) == seen for p, seen in zip(proxies, baseline, strict=True)):
                continue
            round_number += 1
            baseline = [p.latest.get(ROUTE) for p in proxies]
            _emit({"round": round_number,
                   "arrivals": [p.arrivals[(ROUTE, v)] for p, v in zip(proxies, baseline, strict=True) if v]})
    finally:
        await fleet.close()


def _type_urls() -> tuple[str, ...]:
    from meshlet.xds.snapshot import RESOURCE_TYPES

    return RESOURCE_TYPES


def worker_main(argv: Sequence[str] | None = None) -> int:
    import argparse

    import uvloop

    parser = argparse.ArgumentParser(prog="python -m meshlet.bench.controlplane")
    parser.add_argument("--xds", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--delta", action="store_true")
    args = parser.parse_args(argv)
    try:
        uvloop.run(run_worker(args.xds, args.first, args.count, args.channels, args.delta))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
