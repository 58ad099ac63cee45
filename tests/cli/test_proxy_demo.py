"""``meshlet demo --proxy``: config port remapping, and one full round from the command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshlet.bench.apps import example_path
from meshlet.cli.demo import demo_ports, prepare_config, remap_taken_ports


def test_demo_config_names_its_ports() -> None:
    config = yaml.safe_load(example_path("demo/proxy.yaml").read_text())
    ports = demo_ports(config)
    assert (ports.listener, ports.admin, ports.upstream) == (10000, 9901, 18080)


def test_taken_ports_are_remapped_everywhere_they_appear() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        config = {"a": {"port_value": taken}, "b": [{"port_value": taken}], "c": {"port_value": 1}}
        moved = remap_taken_ports(config)
    new = moved[taken]
    assert new != taken
    assert config["a"]["port_value"] == config["b"][0]["port_value"] == new  # type: ignore[index]
    # Port 1 needs root to bind: as non-root it reads as taken and is moved too.
    if os.geteuid() == 0:
        assert config["c"]["port_value"] == 1


def test_prepare_config_writes_a_runnable_copy(tmp_path: Path) -> None:
    target, ports, _ = prepare_config(example_path("demo/proxy.yaml"), tmp_path)
    written = yaml.safe_load(target.read_text())
    assert demo_ports(written) == ports


@pytest.mark.slow
def test_demo_once_from_the_command_line() -> None:
    env = {**os.environ, "CI": "1"}
    done = subprocess.run([sys.executable, "-m", "meshlet.cli.main", "demo", "--proxy", "--requests", "60"],
                          capture_output=True, text=True, timeout=90, env=env, check=False)
    assert done.returncode == 0, done.stderr + done.stdout
    out = done.stdout
    assert "meshlet proxy on http://127.0.0.1:" in out
    for expected in ("200 x", "404 x", "503 x", "504 x", "http.demo.downstream_rq_total"):
        assert expected in out, out
    assert "status mix 2xx:" in out


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_interactive_demo_runs_until_ctrl_c_and_stops_everything(stop_signal: signal.Signals) -> None:
    """With a terminal on stdin the demo keeps serving; Ctrl-C (SIGINT) or SIGTERM stops
    the proxy and the app, and their ports are free again afterwards."""
    import pty
    import re
    import select
    import time

    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.Popen([sys.executable, "-m", "meshlet.cli.main", "demo", "--proxy", "--requests", "20"],
                            stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    os.close(secondary)
    output = b""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops everything" not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, output.decode(errors="replace")
                output += chunk
        text = output.decode(errors="replace")
        proxy_port = int(re.search(r"meshlet proxy on http://127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        app_port = int(re.search(r"sample app on http://127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        time.sleep(1.0)
        assert proc.poll() is None  # still serving
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=5):
            pass
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(primary)
    for port in (proxy_port, app_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
