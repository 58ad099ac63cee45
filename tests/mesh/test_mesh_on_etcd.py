"""``meshlet up --store etcd:...``: the mesh's control plane on a real etcd (Debian's
etcd-server), a workload registered through it, its sidecar in sync, and the
registration in etcd where another control-plane replica reads it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshlet.bench.apps import examples_dir
from meshlet.bench.procs import free_port
from meshlet.control.resources import Workload
from meshlet.control.store import open_store
from meshlet.mesh.client import MeshClient
from meshlet.mesh.lifecycle import (
    RunRequest,
    UpOptions,
    mesh_down,
    mesh_up,
    pick_loopback_block,
    run_workload,
)
from meshlet.mesh.state import MeshState
from meshlet.mesh.status import collect

BOOKINFO = examples_dir() / "bookinfo"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[str]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    with (tmp_path / "etcd.log").open("wb") as log:
        process = subprocess.Popen(["etcd", "--name", "m1", "--data-dir", str(tmp_path / "etcd"),
                                    "--listen-client-urls", client, "--advertise-client-urls", client,
                                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                    "--initial-cluster", f"m1={peer}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
            try:
                if httpx.get(f"{client}/health", timeout=1.0).json().get("health") == "true":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "etcd did not become healthy"
            time.sleep(0.1)
        yield client
    finally:
        process.kill()
        process.wait(10)


async def _read_workload(store_url: str, name: str) -> Workload | None:
    store = await open_store(store_url)
    try:
        found = await store.get("Workload", "default", name)
    finally:
        await store.close()
    return found if isinstance(found, Workload) else None


def test_the_mesh_runs_on_etcd(etcd: str, tmp_path: Path) -> None:
    state = MeshState(tmp_path / "mesh")
    options = UpOptions(store_url=f"etcd:{etcd}", loopback_block=pick_loopback_block(9080, preferred=205),
                        gateway=False, tied=True)
    try:
        info = mesh_up(state, options)
        client = MeshClient(info.api_url, info.status_url)
        client.apply((BOOKINFO / "services.yaml").read_text())
        run_workload(state, RunRequest("details", [sys.executable, str(BOOKINFO / "app.py"), "details"],
                                       version="v1", tied=True))
        report = collect(state.root)
        assert report.info is not None and report.info.store_url == f"etcd:{etcd}"
        assert [(w["name"], w["health"]) for w in report.workloads] == [("details-v1", "HEALTHY")]
        # What the control plane stored is in etcd: a second reader (another replica) sees it.
        stored = asyncio.run(_read_workload(f"etcd:{etcd}", "details-v1"))
        assert stored is not None and stored.spec.proxy_id == state.workload("details-v1").node_id
    finally:
        mesh_down(state)
    assert state.all_recorded() == []
