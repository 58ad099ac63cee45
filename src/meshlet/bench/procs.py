"""Child processes for demos and benchmarks: start, pin, wait, measure, stop.

Every child is stopped on exit (SIGTERM, then SIGKILL after a bound), and every
wait has a deadline, so a harness never leaves a process behind or hangs.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ChildError(RuntimeError):
    """A child process failed to start or to become ready."""


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(port: int, timeout: float, host: str = LOOPBACK, child: Child | None = None) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if child is not None:
            child.check_alive()
        if time.monotonic() >= deadline:
            raise ChildError(f"nothing is listening on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.05)


def online_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


class Child:
    """One child process, optionally pinned to CPUs, stopped when the block ends."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: set[int] | None = None,
        capture_stdout: bool = False,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cpus = cpus
        self.log_path = log_path
        self._log_file: IO[bytes] | None = None
        self._capture = capture_stdout
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        if self.log_path is not None:
            self._log_file = self.log_path.open("wb")
        out: int | IO[bytes] | None = subprocess.PIPE if self._capture else self._log_file
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out if out is not None else subprocess.DEVNULL,
                stderr=self._log_file if self._log_file is not None else subprocess.DEVNULL,
                env=self._env,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop children in order
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            self._close_log()
            raise ChildError(f"cannot start {self.name} ({self.argv[0]}): {exc.strerror}") from exc
        if self.cpus:
            # Right after exec the child has one thread; threads it starts later inherit this.
            os.sched_setaffinity(self.proc.pid, self.cpus)
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ChildError(f"{self.name} is not running")
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ChildError(f"{self.name} exited early (exit code {code}){self._log_hint()}")

    def read_stdout_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read stdout lines until one matches ``pattern`` (needs capture_stdout)."""
        if self.proc is None or self.proc.stdout is None:
            raise ChildError(f"{self.name}: stdout is not captured")
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        pending = b""
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read(4096)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    found = regex.search(line.decode(errors="replace"))
                    if found:
                        return found
            else:
                self.check_alive()
                time.sleep(0.02)
        raise ChildError(f"{self.name} did not print /{pattern}/ within {timeout:.0f} s")

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        self._close_log()
        return proc.returncode

    def _signal(self, sig: signal.Signals) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            # The child leads its own session: signal the group so its workers stop too.
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_hint(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return ": " + " | ".join(tail) if tail else ""

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the harness dies without stopping it
    (SIGKILL, a crash), so no orphan keeps a port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: children are still stopped on every normal exit path


# --------------------------------------------------------------------------- #
# /proc readings
# --------------------------------------------------------------------------- #


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (workers count toward the proxy's cost)."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        for task in _listdir(f"/proc/{current}/task"):
            try:
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
            except OSError:
                continue
            found.extend(int(c) for c in children)
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants, in seconds."""
    total_ticks = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name (which may hold spaces).
        fields = stat[stat.rindex(")") + 2:].split()
        total_ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total_ticks / CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class Memory:
    rss_mb: float  # VmRSS now
    hwm_mb: float  # VmHWM: peak resident set


def memory(pid: int) -> Memory:
    """Resident memory of ``pid`` and its descendants, in MiB."""
    rss_kb = hwm_kb = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss_kb += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm_kb += int(line.split()[1])
    return Memory(rss_kb / 1024, hwm_kb / 1024)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
