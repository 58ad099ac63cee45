"""The demo's traffic: a fixed mix of requests through the proxy, summarised per kind."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from meshlet.bench.client import ClientConnection, build_request
from meshlet.bench.stats import percentile


@dataclass(frozen=True, slots=True)
class Probe:
    label: str
    path: str
    weight: int
    what: str  # what the proxy does with it


PROBES: tuple[Probe, ...] = (
    Probe("ok", "/app/", 50, "routed; /app/ rewritten to /"),
    Probe("direct", "/hello", 20, "direct_response"),
    Probe("no route", "/nowhere", 10, "no route: 404"),
    Probe("delayed", "/delay/30", 10, "app waits 30 ms"),
    Probe("upstream 503", "/status/503", 8, "app answers 503"),
    Probe("timeout", "/slow/1000", 2, "app takes 1 s, route allows 0.25 s: 504"),
)


@dataclass(slots=True)
class ProbeStats:
    probe: Probe
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    failures: int = 0

    def quantile(self, q: float) -> float:
        return percentile(sorted(self.latencies_ms), q)


class KeepAlive:
    """One keep-alive connection used for one request at a time; reconnects when closed."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.conn: ClientConnection | None = None
        self.waiter: asyncio.Future[int | None] | None = None

    async def request(self, raw: bytes) -> int | None:
        if self.conn is None or not self.conn.usable:
            self.conn = await ClientConnection.open(self.host, self.port, self._done, self.timeout)
        self.waiter = asyncio.get_running_loop().create_future()
        self.conn.send(raw)
        try:
            return await asyncio.wait_for(self.waiter, self.timeout)
        except TimeoutError:
            self.conn.abort()
            return None

    def _done(self, _conn: ClientConnection, status: int | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def request_plan(total: int, seed: int = 7) -> list[Probe]:
    weights = [p.weight for p in PROBES]
    plan = random.Random(seed).choices(PROBES, weights=weights, k=total)
    # Every kind shows up at least once, however small the round.
    plan[: len(PROBES)] = PROBES
    return plan


async def send_mix(host: str, port: int, total: int = 300, concurrency: int = 8,
                   timeout: float = 5.0) -> dict[str, ProbeStats]:
    results = {p.label: ProbeStats(p) for p in PROBES}
    queue: asyncio.Queue[Probe] = asyncio.Queue()
    for probe in request_plan(total):
        queue.put_nowait(probe)
    authority = f"{host}:{port}"

    async def worker() -> None:
        client = KeepAlive(host, port, timeout)
        try:
            while not queue.empty():
                probe = queue.get_nowait()
                stats = results[probe.label]
                started = time.perf_counter()
                try:
                    status = await client.request(build_request("GET", probe.path, authority))
                except (OSError, TimeoutError):
                    status = None
                if status is None:
                    stats.failures += 1
                    continue
                stats.latencies_ms.append((time.perf_counter() - started) * 1000.0)
                stats.statuses[status] += 1
        finally:
            client.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results
