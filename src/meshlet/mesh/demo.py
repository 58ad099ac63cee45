"""The bookinfo demo on the whole mesh: ``meshlet demo`` (``make demo``).

Brings the mesh up in a fresh state directory (control plane on SQLite, ingress
gateway), runs bookinfo's six workloads beside their sidecars, then applies
Istio's traffic-management scenarios one by one. After each it waits until
every proxy has ACKed the new config, sends traffic through the ingress
gateway (anonymous, and as user "jason" where the scenario is about him) and
prints which reviews version answered, status codes and latencies.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console
from rich.table import Table

from meshlet.bench.apps import examples_dir
from meshlet.bench.procs import free_port, port_is_free
from meshlet.bench.stats import percentile
from meshlet.mesh.client import ControlPlaneError, MeshClient
from meshlet.mesh.lifecycle import (
    MeshError,
    RunRequest,
    UpOptions,
    mesh_down,
    mesh_up,
    pick_loopback_block,
    run_workload,
)
from meshlet.mesh.state import MeshInfo, MeshState, StateError

GATEWAY_PORT = 8080
SERVICE_PORT = 9080  # bookinfo's services' port
SYNC_TIMEOUT = 30.0
TRANSLATE_GRACE = 0.3
MIRROR_SETTLE = 3.0
REQUEST_TIMEOUT = 15.0
CONCURRENCY = 8
BOOKINFO = (("details", "v1"), ("ratings", "v1"), ("reviews", "v1"), ("reviews", "v2"), ("reviews", "v3"),
            ("productpage", "v1"))
BASE_FILES = ("services.yaml", "destination-rules.yaml")

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Scenario:
    title: str
    files: tuple[str, ...]
    expect: str
    users: tuple[str, ...] = ("",)
    mirror: bool = False
    strict: bool = False
    # At most this many page views per named user (the delayed ones take seconds each).
    user_cap: int | None = None


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("no routing rules", (), "reviews answers from v1, v2 and v3 in turn"),
    Scenario("all traffic to v1", ("virtual-service-all-v1.yaml",), "only v1"),
    Scenario("user jason to v2", ("virtual-service-reviews-jason-v2.yaml",), "jason sees v2, others v1",
             users=("", "jason")),
    Scenario("7 s delay on ratings for jason", ("virtual-service-ratings-delay-jason.yaml",),
             "jason's page waits 3 s for reviews and shows an error; others unaffected", users=("", "jason"),
             user_cap=CONCURRENCY),
    Scenario("50/50 reviews v1 / v3", ("virtual-service-all-v1.yaml", "virtual-service-reviews-50-v3.yaml"),
             "about half v1, half v3"),
    Scenario("mirror reviews v1 to v2", ("virtual-service-reviews-mirror-v2.yaml",),
             "answers from v1; v2 receives a copy of each request", mirror=True),
    Scenario("mTLS STRICT", ("peer-authentication-strict.yaml",),
             "traffic keeps flowing over mesh mTLS; plaintext to a sidecar is refused", strict=True),
)


@dataclass
class UserResult:
    user: str
    versions: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    def quantile(self, q: float) -> float:
        return percentile(sorted(self.latencies_ms), q)


@dataclass
class ScenarioResult:
    scenario: Scenario
    users: list[UserResult]
    notes: list[str] = field(default_factory=list)


def bookinfo_dir() -> Path:
    return examples_dir() / "bookinfo"


def gateway_yaml(port: int) -> str:
    text = (bookinfo_dir() / "gateway.yaml").read_text()
    return text.replace(f"number: {GATEWAY_PORT}", f"number: {port}")


def start_bookinfo(state: MeshState, say: Say, *, loopback_block: int | None = None,
                   gateway_port: int | None = None, tied: bool = True) -> tuple[MeshInfo, int]:
    """The mesh up with bookinfo's config and workloads; returns the gateway's port.
    ``tied``: the mesh's processes end with this one."""
    block = loopback_block if loopback_block is not None else pick_loopback_block(SERVICE_PORT)
    info = mesh_up(state, UpOptions(loopback_block=block, tied=tied), say)
    client = MeshClient(info.api_url, info.status_url)
    port = gateway_port or (GATEWAY_PORT if port_is_free(GATEWAY_PORT) else free_port())
    if port != GATEWAY_PORT:
        say(f"port {GATEWAY_PORT} is taken: the gateway listens on {port}")
    for name in BASE_FILES:
        client.apply((bookinfo_dir() / name).read_text())
    client.apply(gateway_yaml(port))
    app = str(bookinfo_dir() / "app.py")
    for service, version in BOOKINFO:
        run_workload(state, RunRequest(service, [sys.executable, app, service], version=version, tied=tied),
                     say)
    return info, port


def apply_and_wait(client: MeshClient, files: tuple[str, ...], timeout: float = SYNC_TIMEOUT) -> int:
    """Apply ``files`` and wait until every proxy ACKed config built from them; the revision."""
    target = 0
    for name in files:
        for result in client.apply((bookinfo_dir() / name).read_text()):
            target = max(target, int(result.get("resourceVersion") or 0))
    wait_synced(client, target, timeout)
    return target


def wait_synced(client: MeshClient, revision: int, timeout: float = SYNC_TIMEOUT,
                min_connected: int = 1) -> None:
    """Wait until the control plane has taken in ``revision`` and every connected proxy has
    ACKed the snapshot the cache holds for it. ``min_connected``: how many proxies must be
    connected first — after a control-plane restart the proxies come back one by one
    (reconnect back-off), and the ones not yet back would otherwise be left out.
    ``TRANSLATE_GRACE`` is a short settling time after the revision shows."""
    deadline = time.monotonic() + timeout
    seen_at: float | None = None
    while True:
        status = client.sync_status()
        nodes = [n for n in status["nodes"] if n["connected"]]
        if status["revision"] >= revision and seen_at is None:
            seen_at = time.monotonic()
        settled = seen_at is not None and time.monotonic() - seen_at >= TRANSLATE_GRACE
        enough = len(nodes) >= max(1, min_connected)
        if settled and enough and all(n["synced"] and n["current"] for n in nodes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"proxies did not ACK config revision {revision} within {timeout:.0f} s")
        time.sleep(0.05)


async def _one(http: httpx.AsyncClient, url: str, result: UserResult) -> None:
    started = time.perf_counter()
    try:
        response = await http.get(url)
        result.statuses[str(response.status_code)] += 1
        body = response.json() if response.status_code == 200 else {}
        reviews = body.get("reviews") if isinstance(body, dict) else None
        version = body.get("reviewsVersion") if isinstance(body, dict) else None
        failed = isinstance(reviews, dict) and "error" in reviews
        result.versions[version or ("reviews error" if failed else "none")] += 1
    except (httpx.HTTPError, ValueError) as exc:
        result.statuses[type(exc).__name__] += 1
    result.latencies_ms.append((time.perf_counter() - started) * 1000)


async def send_traffic(port: int, users: tuple[str, ...], requests: int,
                       user_cap: int | None = None) -> list[UserResult]:
    """``requests`` page views per user (``user_cap`` for named users) through the gateway,
    ``CONCURRENCY`` at a time."""
    results = [UserResult(user) for user in users]
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as http:
        async def view(url: str, result: UserResult) -> None:
            async with gate:
                await _one(http, url, result)

        jobs = []
        for result in results:
            url = f"http://127.0.0.1:{port}/productpage" + (f"?u={result.user}" if result.user else "")
            count = min(requests, user_cap) if result.user and user_cap else requests
            jobs += [view(url, result) for _ in range(count)]
        await asyncio.gather(*jobs)
    return results


def mirrored_at(state: MeshState, workload: str) -> int:
    """How many mirrored copies ``workload``'s app has answered (asked directly, not via the mesh)."""
    record = state.workload(workload)
    response = httpx.get(f"http://127.0.0.1:{record.app_port}/stats", timeout=5.0)
    return int(response.json()["mirrored"])


def settled_count(read: Callable[[], int], timeout: float = MIRROR_SETTLE) -> int:
    """``read()`` once it stops growing: mirrored copies are fire-and-forget and the last
    ones land after the answers."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = read()
        if now == last:
            return now
        last = now
    return last


def plaintext_refused(state: MeshState, workload: str) -> str:
    """A plaintext request straight to ``workload``'s sidecar inbound port: what happened."""
    record = state.workload(workload)
    try:
        response = httpx.get(f"http://{record.inbound_address}:{SERVICE_PORT}/productpage", timeout=5.0)
    except (OSError, httpx.HTTPError) as exc:
        return f"refused ({type(exc).__name__})"
    return f"answered {response.status_code} (not refused)"


def run_scenario(state: MeshState, client: MeshClient, port: int, scenario: Scenario,
                 requests: int) -> ScenarioResult:
    revision = apply_and_wait(client, scenario.files)
    mirrored_before = mirrored_at(state, "reviews-v2") if scenario.mirror else 0
    users = asyncio.run(send_traffic(port, scenario.users, requests, scenario.user_cap))
    result = ScenarioResult(scenario, users, [f"config revision {revision} ACKed by every proxy"])
    if scenario.mirror:
        copies = settled_count(lambda: mirrored_at(state, "reviews-v2")) - mirrored_before
        result.notes.append(f"reviews-v2 received {copies} mirrored copies of {sum(u.count for u in users)} "
                            "requests")
    if scenario.strict:
        outcome = plaintext_refused(state, "productpage-v1")
        result.notes.append(f"plaintext request to productpage's sidecar: {outcome}")
    return result


# -- the command's pass over the scenarios ------------------------------------------------------------ #


def _mix(user: UserResult) -> str:
    order = sorted(user.versions, key=lambda v: (not v.startswith("v"), v))
    return "  ".join(f"{v}: {user.versions[v]}" for v in order)


def scenario_table(result: ScenarioResult) -> Table:
    table = Table("user", "views", "reviews version", "statuses", "p50 ms", "p99 ms", "max ms",
                  title=f"{result.scenario.title}: {result.scenario.expect}")
    for user in result.users:
        statuses = " ".join(f"{code} x{n}" for code, n in sorted(user.statuses.items()))
        table.add_row(user.user or "(anonymous)", str(user.count), _mix(user), statuses,
                      f"{user.quantile(0.5):.1f}", f"{user.quantile(0.99):.1f}",
                      f"{max(user.latencies_ms, default=0.0):.1f}")
    return table


def summary_table(results: list[ScenarioResult]) -> Table:
    table = Table("scenario", "user", "reviews version", "p50 ms", title="what each scenario changed")
    for result in results:
        for user in result.users:
            table.add_row(result.scenario.title, user.user or "(anonymous)", _mix(user),
                          f"{user.quantile(0.5):.1f}")
    return table


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def mesh_demo(console: Console, interactive: bool, requests: int) -> None:
    """Bring bookinfo up, walk through ``SCENARIOS``, and stop everything it started."""
    with tempfile.TemporaryDirectory(prefix="meshlet-mesh-demo-") as tmp:
        state = MeshState(Path(tmp))
        # SIGTERM (e.g. a CI timeout) stops the demo the way Ctrl-C does.
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            info, port = start_bookinfo(state, console.print)
            client = MeshClient(info.api_url, info.status_url)
            console.print(f"bookinfo is up: http://127.0.0.1:{port}/productpage through the ingress gateway")
            results = []
            for scenario in SCENARIOS:
                console.rule(scenario.title)
                if scenario.files:
                    files = " -f ".join(f"examples/bookinfo/{f}" for f in scenario.files)
                    console.print(f"meshlet apply -f {files}")
                result = run_scenario(state, client, port, scenario, requests)
                results.append(result)
                console.print(scenario_table(result))
                for note in result.notes:
                    console.print(f"  {note}")
            console.print(summary_table(results))
            if interactive:
                console.print(f"\nrunning: try  curl 'http://127.0.0.1:{port}/productpage?u=jason'  and  "
                              f"meshlet status --dir {state.root} ; Ctrl-C stops everything")
                while state.recorded("control-plane") is not None:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            console.print("\\nstopping")
        except (MeshError, ControlPlaneError, StateError, TimeoutError) as exc:
            _show_logs(console, state)
            raise DemoError(str(exc)) from None
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            mesh_down(state, lambda line: console.print(f"  {line}"))


class DemoError(RuntimeError):
    """The demo could not run; the message says which step failed."""


def _show_logs(console: Console, state: MeshState, lines: int = 5) -> None:
    for log in sorted((state.root / "logs").glob("*.log")):
        tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
        if tail:
            console.print(f"--- {log.name}")
            for line in tail:
                console.print(f"  {line}", markup=False, highlight=False)
