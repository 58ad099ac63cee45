"""Detached processes by pid file (whole groups stopped, never a reused pid), and the
state directory's bookkeeping (addresses, names, the apps' service environment)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshlet.mesh.lifecycle import service_env
from meshlet.mesh.procs import Recorded, read_pid_file, spawn_detached, start_ticks, stop_recorded
from meshlet.mesh.state import MeshState, StateError, WorkloadRecord, inbound_address, outbound_address


def _gone(pid: int) -> bool:
    return start_ticks(pid) is None


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    # The child starts a grandchild and records its pid: stopping the child must end both.
    grandchild_file = tmp_path / "grandchild"
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(grandchild_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    recorded = spawn_detached("sleeper", [sys.executable, "-c", script], pid_file=tmp_path / "s.pid",
                              log_file=tmp_path / "s.log")
    try:
        assert read_pid_file(tmp_path / "s.pid") == recorded
        assert recorded.alive()
        deadline = time.monotonic() + 5
        while not grandchild_file.exists() or not grandchild_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        grandchild = int(grandchild_file.read_text())
        assert os.getpgid(grandchild) == recorded.pid  # its own session: the group is the pid
        assert stop_recorded(recorded, grace=5) == "stopped"
        assert _gone(recorded.pid)
        deadline = time.monotonic() + 5
        while not _gone(grandchild):
            assert time.monotonic() < deadline, "the grandchild outlived the stop"
            time.sleep(0.02)
    finally:
        if recorded.alive():
            os.killpg(recorded.pid, 9)


def test_a_tied_process_ends_when_its_starter_is_killed(tmp_path: Path) -> None:
    starter_code = (
        "import sys, time; from pathlib import Path; from meshlet.mesh.procs import spawn_detached; "
        f"r = spawn_detached('tied', [sys.executable, '-c', 'import time; time.sleep(60)'], "
        f"pid_file=Path({str(tmp_path / 't.pid')!r}), log_file=Path({str(tmp_path / 't.log')!r}), "
        "tied=True); "
        "print(r.pid, flush=True); time.sleep(60)")
    starter = subprocess.Popen([sys.executable, "-c", starter_code], stdout=subprocess.PIPE, text=True)
    tied_pid = 0
    try:
        assert starter.stdout is not None
        tied_pid = int(starter.stdout.readline())
        assert start_ticks(tied_pid) is not None
        starter.kill()  # no chance to stop anything itself
        starter.wait(5)
        deadline = time.monotonic() + 5
        while not _gone(tied_pid):
            assert time.monotonic() < deadline, "the tied process outlived its starter"
            time.sleep(0.02)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(5)
        if tied_pid and not _gone(tied_pid):
            os.kill(tied_pid, 9)


def test_a_pid_file_for_a_process_that_ended_kills_nothing(tmp_path: Path) -> None:
    # Our own pid with a different start time: a pid reused by another process.
    stale = Recorded("old", os.getpid(), (start_ticks(os.getpid()) or 0) + 1, "")
    assert not stale.alive()
    assert stop_recorded(stale) == "not running"
    assert start_ticks(os.getpid()) is not None  # still here


def test_unreadable_pid_file_is_a_state_error(tmp_path: Path) -> None:
    state = MeshState(tmp_path)
    state.pid_file("x").parent.mkdir(parents=True)
    state.pid_file("x").write_text("not json")
    with pytest.raises(StateError, match="unreadable pid file"):
        state.recorded("x")


def test_no_mesh_up_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="meshlet up"):
        MeshState(tmp_path).info()


def _record(name: str, index: int) -> WorkloadRecord:
    return WorkloadRecord(name=name, service="reviews", namespace="default", version="v1", index=index,
                          inbound_address=inbound_address(9, index),
                          outbound_address=outbound_address(9, index), app_port=1000 + index,
                          admin_port=2000 + index, node_id=f"sidecar~x~{name}")


def test_workloads_get_free_indexes_and_unique_names(tmp_path: Path) -> None:
    state = MeshState(tmp_path)
    assert state.free_index() == 1
    state.save_workload(_record("reviews-v1", 1))
    state.save_workload(_record("reviews-v1-2", 3))
    assert state.free_index() == 2
    assert state.unique_workload_name("reviews-v1") == "reviews-v1-3"
    assert state.unique_workload_name("ratings-v1") == "ratings-v1"
    assert state.workload("reviews-v1") == _record("reviews-v1", 1)
    state.drop_workload("reviews-v1")
    assert [w.name for w in state.workloads()] == ["reviews-v1-2"]
    assert (inbound_address(9, 3), outbound_address(9, 3)) == ("127.9.1.3", "127.9.2.3")


def test_apps_learn_each_service_of_their_namespace_at_their_outbound_address() -> None:
    def service(name: str, namespace: str, port: int) -> dict[str, object]:
        return {"metadata": {"name": name, "namespace": namespace},
                "spec": {"ports": [{"name": "p", "number": port}]}}

    services = [service("ratings", "default", 9080), service("my-db", "default", 5432),
                service("other", "prod", 80)]
    assert service_env(services, "default", "127.9.2.4") == {
        "RATINGS_SERVICE_HOST": "127.9.2.4", "RATINGS_SERVICE_PORT": "9080",
        "MY_DB_SERVICE_HOST": "127.9.2.4", "MY_DB_SERVICE_PORT": "5432",
    }
