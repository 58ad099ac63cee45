"""An open-loop HTTP/1.1 load generator: a fixed request schedule, whatever the server does.

Requests are due at ``start + i / rate``. A ticker thread sleeps until each
due time (``time.sleep`` has microsecond resolution, unlike the millisecond
timers of event loops) and hands the request to the event loop, which sends
it on an idle keep-alive connection or queues it until one frees up.
Latency runs from the *scheduled* time, so a server that stalls is charged
for every request it delayed, including the ones queued behind it (no
coordinated omission, as in wrk2).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from meshlet.bench.client import ClientConnection
from meshlet.bench.stats import percentile

RECONNECT_PAUSE = 0.05
# A short GIL switch interval lets the ticker thread wake on time while the loop is busy.
SWITCH_INTERVAL = 0.0002


@dataclass(slots=True)
class OpenLoopResult:
    rate: float
    duration: float
    connections: int
    scheduled: int
    completed: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # sorted
    statuses: dict[int, int] = field(default_factory=dict)
    # How late the generator itself handed requests to the loop (its own noise floor).
    dispatch_lag_p99_ms: float = 0.0

    def latency(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


class _OpenLoop:
    def __init__(self, host: str, port: int, request: bytes, rate: float, duration: float,
                 connections: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.request = request
        self.rate = rate
        self.total = max(1, int(rate * duration))
        self.connections = connections
        self.timeout = timeout
        self.result = OpenLoopResult(rate, duration, connections, self.total)
        self.statuses: Counter[int] = Counter()
        self.lags: list[float] = []
        self.idle: deque[ClientConnection] = deque()
        self.backlog: deque[float] = deque()
        self.accounted = 0
        self.stopping = threading.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.all_conns: set[ClientConnection] = set()
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self.loop.create_future()

    async def run(self) -> OpenLoopResult:
        try:
            for _ in range(self.connections):
                self.idle.append(await self._open())
        except BaseException:
            await self._shutdown()  # the connections that did open
            raise
        start = time.perf_counter() + 0.02
        ticker = threading.Thread(target=self._tick, args=(start,), name="openloop-ticker", daemon=True)
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        ticker.start()
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), self.total / self.rate + self.timeout + 2)
        except TimeoutError:
            pass  # whatever is still unanswered counts as errors below
        finally:
            self.stopping.set()
            ticker.join(timeout=2)
            sys.setswitchinterval(previous_interval)
            await self._shutdown()
        return self._summarise()

    # -- the schedule (ticker thread) --------------------------------------- #

    def _tick(self, start: float) -> None:
        interval = 1.0 / self.rate
        for i in range(self.total):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if self.stopping.is_set():
                return
            try:
                self.loop.call_soon_threadsafe(self._dispatch, due)
            except RuntimeError:
                return  # the loop is gone

    # -- on the event loop -------------------------------------------------- #

    def _dispatch(self, due: float) -> None:
        self.lags.append(time.perf_counter() - due)
        while self.idle:
            conn = self.idle.popleft()
            if conn.usable:
                self._send(conn, due)
                return
            self._replace(conn)
        self.backlog.append(due)

    def _send(self, conn: ClientConnection, due: float) -> None:
        conn.tag = due
        conn.send(self.request)
        conn.timer = self.loop.call_later(self.timeout, conn.abort)

    def _done(self, conn: ClientConnection, status: int | None) -> None:
        now = time.perf_counter()
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if status is None:
            self.result.errors += 1
        else:
            self.result.latencies_ms.append((now - conn.tag) * 1000.0)
            self.statuses[status] += 1
        self.accounted += 1
        if self.accounted >= self.total and not self.finished.done():
            self.finished.set_result(None)
        if conn.usable:
            self._next(conn)
        else:
            self._replace(conn)

    def _next(self, conn: ClientConnection) -> None:
        if self.backlog:
            self._send(conn, self.backlog.popleft())
        else:
            self.idle.append(conn)

    def _replace(self, conn: ClientConnection) -> None:
        self.all_conns.discard(conn)
        conn.close()
        if self.stopping.is_set() or self.finished.done():
            return
        task = self.loop.create_task(self._reconnect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reconnect(self) -> None:
        while not self.stopping.is_set():
            try:
                conn = await self._open()
            except (OSError, TimeoutError):
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            self._next(conn)
            return

    async def _open(self) -> ClientConnection:
        conn = await ClientConnection.open(self.host, self.port, self._done, self.timeout)
        self.all_conns.add(conn)
        return conn

    async def _shutdown(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=1)
        for conn in list(self.all_conns):
            conn.on_done = _ignore
            conn.close()

    def _summarise(self) -> OpenLoopResult:
        result = self.result
        result.completed = len(result.latencies_ms)
        result.errors += self.total - self.accounted  # never answered
        result.latencies_ms.sort()
        result.statuses = dict(self.statuses)
        lags = sorted(lag * 1000.0 for lag in self.lags)
        result.dispatch_lag_p99_ms = percentile(lags, 0.99)
        return result


def _ignore(_conn: ClientConnection, _status: int | None) -> None:
    return None


async def run_open_loop(host: str, port: int, request: bytes, *, rate: float, duration: float,
                        connections: int = 8, timeout: float = 5.0) -> OpenLoopResult:
    """Send ``rate`` requests/s for ``duration`` seconds over ``connections`` keep-alive connections."""
    if rate <= 0 or duration <= 0 or connections <= 0:
        raise ValueError("rate, duration and connections must be positive")
    return await _OpenLoop(host, port, request, rate, duration, connections, timeout).run()
