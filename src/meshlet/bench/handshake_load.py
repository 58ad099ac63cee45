"""A load generator opening a new TLS 1.3 connection for every request.

``python -m meshlet.bench.handshake_load --port P`` runs ``--connections``
workers under uvloop; each one, in a loop: connect, full TLS 1.3 handshake
(stdlib ``ssl``, which never offers a ticket unless given a session, so the
server never resumes), ``GET /`` with ``Connection: close``, read the
response (to its content-length), close, repeat. The client offers RSA-PSS and
ECDSA signature schemes alike; the server's certificate picks the key type.

Why not h2load or wrk: both keep the session of a finished connection and
resume it on the next one (HAProxy logs ``ssl_fc_is_resumed=1`` for all but
the first connection of each client), which measures resumption, not the
private-key operation.

Protocol with the harness, one line each on stdout: ``measuring`` when the
warm-up ends, ``stopped`` when the measured window ends (the harness reads
the server's CPU time and handshake counter at both), then one JSON object
with the window's figures. Latency runs from the start of ``connect`` to the
end of the response: handshake included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvloop

from meshlet.bench.procs import LOOPBACK
from meshlet.bench.stats import percentile

MAX_RESPONSE = 64 * 1024  # the benchmark's responses are a few hundred bytes
ERROR_PAUSE = 0.01  # after a failed connection, so that a refusing server is not hammered


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed bench certificates; the server's cost is the same
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def request_bytes(host: str, port: int) -> bytes:
    return f"GET / HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n".encode("ascii")


@dataclass(slots=True)
class Window:
    """What finished inside the measured window."""

    started: float = 0.0
    ended: float = 0.0
    cpu_s: float = 0.0  # the generator's own, over the window
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    resumed: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)

    def summary(self, connections: int) -> dict[str, Any]:
        latencies = sorted(self.latencies_ms)
        wall = self.ended - self.started
        return {
            "completed": len(latencies),
            "wall_s": round(wall, 4),
            "per_s": round(len(latencies) / wall, 1) if wall > 0 else 0.0,
            "p50_ms": round(percentile(latencies, 0.50), 3),
            "p90_ms": round(percentile(latencies, 0.90), 3),
            "p99_ms": round(percentile(latencies, 0.99), 3),
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors.most_common(5)),
            "resumed": self.resumed,
            "tls_versions": dict(self.versions),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "connections": connections,
            "generator_cpu_s": round(self.cpu_s, 3),
        }


async def one_request(host: str, port: int, ctx: ssl.SSLContext, request: bytes,
                      timeout: float) -> tuple[int, str, bool]:
    """One connection, one request: (status, TLS version, resumed).

    The response ends at its ``content-length`` (or at the server's close
    without one); then the client closes, as curl and browsers do, rather
    than wait for the server's close."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname="meshlet-bench"), timeout)
    try:
        tls = writer.get_extra_info("ssl_object")
        writer.write(request)
        response = await read_response(reader, timeout)
    finally:
        writer.close()
    status = int(response[9:12]) if response.startswith(b"HTTP/1.") and response[9:12].isdigit() else 0
    return status, tls.version() or "", bool(tls.session_reused)


async def read_response(reader: asyncio.StreamReader, timeout: float) -> bytes:
    response = b""
    expected: int | None = None
    while expected is None or len(response) < expected:
        more = await asyncio.wait_for(reader.read(MAX_RESPONSE), timeout)
        if not more:
            break
        response += more
        if len(response) > MAX_RESPONSE:
            raise ValueError("response larger than expected")
        if expected is None:
            expected = response_length(response)
    return response


def response_length(received: bytes) -> int | None:
    """Head plus body length, once the head is in and names a content-length."""
    end = received.find(b"\r\n\r\n")
    if end < 0:
        return None
    for line in received[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return end + 4 + int(value)
    return None


async def worker(host: str, port: int, ctx: ssl.SSLContext, window: Window, measure_from: float,
                 stop_at: float, timeout: float) -> None:
    request = request_bytes(host, port)
    clock = time.perf_counter
    while True:
        begun = clock()
        if begun >= stop_at:
            return
        try:
            status, version, resumed = await one_request(host, port, ctx, request, timeout)
        except (OSError, ssl.SSLError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            if begun >= measure_from and clock() <= stop_at:
                window.errors[type(exc).__name__] += 1
            await asyncio.sleep(ERROR_PAUSE)
            continue
        finished = clock()
        if begun < measure_from or finished > stop_at:
            continue  # straddles the window's edge: counted by neither side
        window.statuses[status] += 1
        window.versions[version] += 1
        window.resumed += resumed
        if 200 <= status < 300:
            window.latencies_ms.append((finished - begun) * 1000.0)
        else:
            window.errors[f"status {status}"] += 1


async def mark(at: float, line: str) -> float:
    """Print ``line`` at ``at``; returns this process's CPU seconds then."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    print(line, flush=True)
    return time.process_time()


async def run(host: str, port: int, connections: int, duration: float, warmup: float,
              timeout: float) -> dict[str, Any]:
    ctx = client_context()
    now = time.perf_counter()
    window = Window(started=now + warmup, ended=now + warmup + duration)
    workers = [worker(host, port, ctx, window, window.started, window.ended, timeout)
               for _ in range(connections)]
    opened = asyncio.ensure_future(mark(window.started, "measuring"))
    closed = asyncio.ensure_future(mark(window.ended, "stopped"))
    await asyncio.gather(opened, closed, *workers)
    window.cpu_s = closed.result() - opened.result()
    return window.summary(connections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="Per connect / read, seconds.")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 4096 or args.duration <= 0 or args.warmup < 0:
        parser.error("--connections must be 1..4096, --duration > 0, --warmup >= 0")
    result = uvloop.run(run(args.host, args.port, args.connections, args.duration, args.warmup,
                            args.timeout))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
