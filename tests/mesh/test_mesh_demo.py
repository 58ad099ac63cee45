"""``meshlet demo`` (``make demo``) as a user runs it in a terminal: one pass over every
bookinfo scenario through the ingress gateway, then serving until Ctrl-C, which stops
every process it started."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshlet.mesh.procs import start_ticks
from meshlet.mesh.state import MeshState


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> str:
    assert proc.stdout is not None
    output = b""
    deadline = time.monotonic() + timeout
    # Rich wraps long lines at the terminal's width: look for the words, not the line.
    while marker not in b" ".join(output.split()):
        assert time.monotonic() < deadline, output.decode(errors="replace")[-3000:]
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, output.decode(errors="replace")[-3000:]
            output += chunk
    return output.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_walks_through_every_scenario_and_ctrl_c_stops_everything() -> None:
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MESHLET_DIR")}
    env["COLUMNS"] = "200"
    proc = subprocess.Popen([sys.executable, "-m", "meshlet.cli.main", "demo", "--requests", "12"],
                            stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    os.close(secondary)
    pids: list[int] = []
    try:
        text = _read_until(proc, b"Ctrl-C stops everything", 240)
        summary = text[text.index("what each scenario changed"):]
        rows = {line.split("\u2502")[1].strip() + "/" + line.split("\u2502")[2].strip(): line
                for line in summary.splitlines() if line.count("\u2502") >= 4}
        assert re.search(r"v1: \d+ +v2: \d+ +v3: \d+", rows["no routing rules/(anonymous)"])
        assert re.search(r"\u2502 v1: 12 +\u2502", rows["all traffic to v1/(anonymous)"])
        assert re.search(r"\u2502 v2: 12 +\u2502", rows["user jason to v2/jason"])
        assert "reviews error: 8" in rows["7 s delay on ratings for jason/jason"]
        assert re.search(r"v1: \d+ +v3: \d+", rows["50/50 reviews v1 / v3/(anonymous)"])
        assert re.search(r"\u2502 v1: 12 +\u2502", rows["mTLS STRICT/(anonymous)"])
        assert re.search(r"reviews-v2 received 12 mirrored copies of 12 requests", text)
        assert "plaintext request to productpage's sidecar: refused" in text
        state_dir = re.search(r"meshlet status --dir (\S+)", text)
        assert state_dir is not None
        pids = [r.pid for r in MeshState(Path(state_dir.group(1))).all_recorded()]
        assert len(pids) == 8  # control plane, gateway, six workloads
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            # Killed, the demo still takes its mesh with it (its processes are tied to it).
            proc.kill()
            proc.wait(5)
        os.close(primary)
    assert all(start_ticks(pid) is None for pid in pids)
