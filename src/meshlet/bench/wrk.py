"""Saturation throughput from ``wrk`` (closed loop: each connection waits for its answer)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from meshlet.bench.procs import ChildError

_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(\w+)", re.MULTILINE)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_LATENCY_LINE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    requests: int
    non_2xx: int
    socket_errors: int
    latency_ms: dict[int, float]  # percentile -> ms (closed loop: not comparable to open loop)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_argv(url: str, *, threads: int, connections: int, duration: float) -> list[str]:
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", url]


def parse_wrk(output: str) -> WrkResult:
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None:
        raise ChildError(f"could not read wrk's output: {output.strip()[:200]!r}")
    non_2xx = _NON_2XX.search(output)
    socket = _SOCKET_ERRORS.search(output)
    latency = {int(p): float(v) * _UNIT_MS[unit] for p, v, unit in _LATENCY_LINE.findall(output)}
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket.groups()) if socket else 0,
        latency_ms=latency,
    )


def run_wrk(url: str, *, threads: int, connections: int, duration: float,
            cpus: set[int] | None = None) -> WrkResult:
    argv = wrk_argv(url, threads=threads, connections=connections, duration=duration)
    if cpus:
        argv = ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ChildError(f"wrk did not finish within {duration + 30:.0f} s") from exc
    except FileNotFoundError as exc:
        raise ChildError(f"{argv[0]} is not installed (Debian package: wrk)") from exc
    if done.returncode != 0:
        raise ChildError(f"wrk failed (exit {done.returncode}): {done.stderr.strip()[:200]}")
    return parse_wrk(done.stdout)
