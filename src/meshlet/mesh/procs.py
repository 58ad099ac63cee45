"""Detached processes recorded in pid files, and stopping them without orphans.

A process ``meshlet up`` or ``meshlet run`` starts outlives the command, so it
is started in its own session (its process group is its pid) and recorded in
``<name>.pid`` with its start time: ``stop`` signals the whole group, and never
a process that merely reused the pid after ours ended.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
STOP_GRACE = 10.0
KILL_WAIT = 5.0
POLL = 0.05


class ProcessError(RuntimeError):
    """A process could not be started, or a pid file is unreadable."""


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name (which may hold spaces); starttime is field 22.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None  # a zombie has ended; only its parent's wait remains
    return int(fields[19])


@dataclass(frozen=True, slots=True)
class Recorded:
    """A process as its pid file describes it."""

    name: str
    pid: int
    started: int
    log: str

    def alive(self) -> bool:
        return start_ticks(self.pid) == self.started

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "pid": self.pid, "started": self.started, "log": self.log}


def read_pid_file(path: Path) -> Recorded | None:
    try:
        data = json.loads(path.read_text())
        return Recorded(str(data["name"]), int(data["pid"]), int(data["started"]), str(data["log"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProcessError(f"{path}: unreadable pid file ({exc})") from None


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the starter still stops it on every normal exit path


def spawn_detached(name: str, argv: Sequence[str], *, pid_file: Path, log_file: Path,
                   env: Mapping[str, str] | None = None, cwd: Path | None = None,
                   tied: bool = False) -> Recorded:
    """Start ``argv`` in its own session, output to ``log_file``, recorded in ``pid_file``.
    ``tied``: it also ends when this process dies, however it dies (the demo's mesh must
    not outlive the demo; ``meshlet up``'s must outlive the command)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=dict(env) if env is not None else None, cwd=cwd,
                                    start_new_session=True,
                                    preexec_fn=_terminate_with_parent if tied else None)
        except OSError as exc:
            raise ProcessError(f"cannot start {name} ({argv[0]}): {exc.strerror}") from None
    started = start_ticks(proc.pid)
    if started is None:
        proc.wait(timeout=KILL_WAIT)
        raise ProcessError(f"{name} exited at once (exit code {proc.returncode}); see {log_file}")
    recorded = Recorded(name, proc.pid, started, str(log_file))
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(recorded.to_json()) + "\n")
    tmp.replace(pid_file)
    # The Popen object is dropped on purpose: the process outlives this command.
    # Mark it reaped-by-someone-else so Python does not warn about it.
    proc.returncode = 0
    return recorded


def _signal_group(recorded: Recorded, sig: signal.Signals) -> None:
    if not recorded.alive():
        return
    try:
        os.killpg(recorded.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(recorded.pid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own child (a test or the demo started it)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_gone(recorded: Recorded, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(recorded.pid)
        if not recorded.alive() and not _group_alive(recorded.pid):
            return True
        time.sleep(POLL)
    return not recorded.alive()


def request_stop(recorded: Recorded) -> None:
    """SIGTERM the process group (``finish_stop`` waits for it)."""
    _signal_group(recorded, signal.SIGTERM)


def finish_stop(recorded: Recorded, grace: float = STOP_GRACE) -> str:
    """Wait up to ``grace`` s for a group asked to stop, then SIGKILL it. Says what happened."""
    if wait_gone(recorded, grace):
        return "stopped"
    _kill_group(recorded.pid)
    wait_gone(recorded, KILL_WAIT)
    return "killed"


def stop_recorded(recorded: Recorded, grace: float = STOP_GRACE) -> str:
    """SIGTERM the process group, SIGKILL it after ``grace`` s. Says what happened."""
    if not recorded.alive():
        if _group_alive(recorded.pid):
            _kill_group(recorded.pid)
        return "not running"
    request_stop(recorded)
    return finish_stop(recorded, grace)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
