"""``meshlet up / run / status / down`` from the command line: bookinfo's workloads beside
their sidecars, traffic through the ingress gateway driven by curl, routing changes
reaching the running proxies, sync state per proxy, and nothing left running after
``down``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshlet.bench.admin import admin_get
from meshlet.bench.apps import examples_dir
from meshlet.bench.procs import free_port, process_tree
from meshlet.mesh.client import MeshClient
from meshlet.mesh.demo import gateway_yaml, wait_synced
from meshlet.mesh.lifecycle import pick_loopback_block, stop_workload
from meshlet.mesh.procs import start_ticks
from meshlet.mesh.state import MeshState

BOOKINFO = examples_dir() / "bookinfo"
# A loopback block of its own, so a demo or another test run on the machine does not collide.
BLOCK = pick_loopback_block(9080, preferred=203)
WORKLOADS = (("details", "v1"), ("ratings", "v1"), ("reviews", "v1"), ("reviews", "v2"),
             ("productpage", "v1"))


@dataclass
class Mesh:
    state: MeshState
    env: dict[str, str]
    gateway_port: int

    def meshlet(self, *args: str, timeout: float = 60,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "meshlet.cli.main", *args], capture_output=True,
                              text=True, timeout=timeout, env=self.env, check=False)
        if check:
            assert done.returncode == 0, f"meshlet {' '.join(args)}: {done.stderr}{done.stdout}"
        return done

    @property
    def client(self) -> MeshClient:
        info = self.state.info()
        return MeshClient(info.api_url, info.status_url)

    def page(self, user: str = "") -> dict[str, object]:
        url = f"http://127.0.0.1:{self.gateway_port}/productpage" + (f"?u={user}" if user else "")
        done = subprocess.run(["curl", "-sS", "--max-time", "10", "-f", url], capture_output=True, text=True,
                              timeout=15, check=False)
        assert done.returncode == 0, done.stderr
        page: dict[str, object] = json.loads(done.stdout)
        return page


def sidecar_gone(admin_port: int) -> bool:
    status, _ = admin_get(admin_port, "/ready", 1.0)
    return status == 0


def _pids(state: MeshState) -> list[int]:
    return [r.pid for r in state.all_recorded()]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    root = tmp_path_factory.mktemp("mesh")
    state = MeshState(root / ".meshlet")
    gateway = root / "gateway.yaml"
    port = free_port()
    gateway.write_text(gateway_yaml(port))
    mesh = Mesh(state, {**os.environ, "MESHLET_DIR": str(state.root)}, port)
    try:
        mesh.meshlet("up", "--loopback-block", str(BLOCK))
        api = state.info().api_url
        mesh.meshlet("apply", "--server", api, "-f", str(BOOKINFO / "services.yaml"),
                     "-f", str(BOOKINFO / "destination-rules.yaml"), "-f", str(gateway))
        for service, version in WORKLOADS:
            mesh.meshlet("run", "--service", service, "--version", version, "--",
                         sys.executable, str(BOOKINFO / "app.py"), service)
        yield mesh
    finally:
        subprocess.run([sys.executable, "-m", "meshlet.cli.main", "down"], env=mesh.env, timeout=60,
                       capture_output=True, check=False)


def test_traffic_through_the_gateway_reaches_each_reviews_version(mesh: Mesh) -> None:
    versions = {mesh.page()["reviewsVersion"] for _ in range(12)}
    assert versions == {"v1", "v2"}
    page = mesh.page()
    details = page["details"]
    assert isinstance(details, dict) and details["author"] == "William Shakespeare"


def test_status_shows_healthy_workloads_and_every_proxy_in_sync(mesh: Mesh) -> None:
    report = json.loads(mesh.meshlet("status", "--json", "--wait-synced", "15").stdout)
    assert report["synced"] is True
    assert all(p["running"] for p in report["processes"])
    assert {p["name"] for p in report["processes"]} == {
        "control-plane", "gateway", *(f"workload-{s}-{v}" for s, v in WORKLOADS)}
    workloads = {w["name"]: w for w in report["workloads"]}
    assert set(workloads) == {f"{s}-{v}" for s, v in WORKLOADS}
    assert {w["health"] for w in workloads.values()} == {"HEALTHY"}
    assert workloads["reviews-v2"]["address"] == f"127.{BLOCK}.1.4"
    nodes = [p["node"] for p in report["proxies"]]
    assert len(nodes) == len(WORKLOADS) + 1 and any(n.startswith("router~") for n in nodes)
    for proxy in report["proxies"]:
        assert proxy["connected"] and proxy["synced"] and not proxy["nacks"]
        assert set(proxy["acked"]) >= {"lds", "rds", "cds", "eds"}
    text = mesh.meshlet("status").stdout
    for title in ("processes", "services", "workloads", "proxies (ACKed versions)"):
        assert title in text


def test_a_routing_rule_reaches_the_running_proxies(mesh: Mesh) -> None:
    results = mesh.client.apply((BOOKINFO / "virtual-service-reviews-jason-v2.yaml").read_text())
    wait_synced(mesh.client, int(results[0]["resourceVersion"]))
    assert {mesh.page("jason")["reviewsVersion"] for _ in range(4)} == {"v2"}
    assert {mesh.page()["reviewsVersion"] for _ in range(6)} == {"v1"}
    jason = mesh.page("jason")["reviews"]
    assert isinstance(jason, dict)
    assert jason["reviews"][0]["rating"] == {"stars": 5, "color": "black"}  # v2 asked ratings


def test_policies_stored_but_not_enforced_show_in_status(mesh: Mesh) -> None:
    policy = ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all}\n"
              "spec: {}\n")
    results = mesh.client.apply(policy)
    wait_synced(mesh.client, int(results[0]["resourceVersion"]))
    report = json.loads(mesh.meshlet("status", "--json").stdout)
    notes = [n for p in report["proxies"] for n in p["notes"]]
    assert any("not enforced" in n["message"] and "deny-all" in n["resource"] for n in notes), notes
    assert "not enforced" in mesh.meshlet("status").stdout
    mesh.client.delete("security.istio.io", "authorizationpolicies", "default", "deny-all")


def test_run_refuses_a_service_that_is_not_defined(mesh: Mesh) -> None:
    done = mesh.meshlet("run", "--service", "nosuch", "--", "true", check=False)
    assert done.returncode != 0
    assert "service default/nosuch is not defined" in done.stderr
    assert "Traceback" not in done.stderr


def test_up_twice_is_refused(mesh: Mesh) -> None:
    done = mesh.meshlet("up", check=False)
    assert done.returncode != 0 and "already up" in done.stderr


REVIEWS_V2 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v2}
"""


def test_proxies_ride_out_a_control_plane_crash_and_up_starts_it_again(mesh: Mesh) -> None:
    plane = mesh.state.recorded("control-plane")
    assert plane is not None
    os.kill(plane.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while plane.alive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # No control plane: every proxy keeps serving its last good config.
    assert {mesh.page("jason")["reviewsVersion"] for _ in range(3)} == {"v2"}
    assert {mesh.page()["reviewsVersion"] for _ in range(3)} == {"v1"}
    out = mesh.meshlet("up").stdout
    assert "starting it again" in out
    restarted = mesh.state.recorded("control-plane")
    assert restarted is not None and restarted.alive() and restarted.pid != plane.pid
    # The proxies reconnect, and config changes reach them again.
    results = mesh.client.apply(REVIEWS_V2)
    wait_synced(mesh.client, int(results[0]["resourceVersion"]), min_connected=len(WORKLOADS) + 1)
    assert {mesh.page()["reviewsVersion"] for _ in range(4)} == {"v2"}
    report = json.loads(mesh.meshlet("status", "--json", "--wait-synced", "15").stdout)
    assert report["synced"] and len([p for p in report["proxies"] if p["connected"]]) == len(WORKLOADS) + 1


def test_a_workload_whose_app_exits_is_deregistered_and_its_sidecar_stopped(mesh: Mesh) -> None:
    mesh.meshlet("run", "--service", "details", "--version", "v9", "--",
                 sys.executable, str(BOOKINFO / "app.py"), "details")
    supervisor = mesh.state.recorded("workload-details-v9")
    assert supervisor is not None and supervisor.alive()
    record = mesh.state.workload("details-v9")
    family = process_tree(supervisor.pid)
    assert len(family) >= 3  # the supervisor, the sidecar, the app
    app = next(pid for pid in family if "app.py" in Path(f"/proc/{pid}/cmdline").read_text())
    os.kill(app, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while supervisor.alive() or mesh.client.get("meshlet.dev", "workloads", "default", "details-v9"):
        assert time.monotonic() < deadline, "the workload outlived its app"
        time.sleep(0.1)
    assert all(start_ticks(pid) is None for pid in family)
    assert sidecar_gone(record.admin_port)
    status = json.loads(mesh.meshlet("status", "--json").stdout)
    assert "details-v9" not in {w["name"] for w in status["workloads"]}
    assert not any("details-v9" in p["node"] and p["connected"] for p in status["proxies"])
    stop_workload(mesh.state, "details-v9")  # forget its records


def test_down_stops_everything_and_deregisters(mesh: Mesh) -> None:
    pids = _pids(mesh.state)
    client = mesh.client
    assert len(pids) == len(WORKLOADS) + 2
    out = mesh.meshlet("down").stdout
    assert out.count(": stopped") == len(pids), out
    assert all(start_ticks(pid) is None for pid in pids)
    assert mesh.state.all_recorded() == [] and mesh.state.workloads() == []
    # Every sidecar, app and the gateway are gone: nothing answers on their addresses.
    done = subprocess.run(["curl", "-sS", "--max-time", "2", f"http://127.0.0.1:{mesh.gateway_port}/productpage"],
                          capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode != 0
    with pytest.raises(Exception, match="cannot reach"):
        client.healthz()
    assert "nothing was running" in mesh.meshlet("down").stdout


@pytest.mark.parametrize("command", [["status"], ["run", "--service", "x", "--", "true"]])
def test_commands_without_a_mesh_say_how_to_start_one(tmp_path: Path, command: list[str]) -> None:
    name, *rest = command
    done = subprocess.run([sys.executable, "-m", "meshlet.cli.main", name, "--dir", str(tmp_path), *rest],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("meshlet: error: no mesh is up in") and "meshlet up" in done.stderr
    assert "Traceback" not in done.stderr
