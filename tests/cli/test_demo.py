"""``meshlet demo``: config port remapping, and one full round from the command line."""

from __future__ import annotations

import os
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
    done = subprocess.run([sys.executable, "-m", "meshlet.cli.main", "demo", "--requests", "60"],
                          capture_output=True, text=True, timeout=90, env=env, check=False)
    assert done.returncode == 0, done.stderr + done.stdout
    out = done.stdout
    assert "meshlet proxy on http://127.0.0.1:" in out
    for expected in ("200 x", "404 x", "503 x", "504 x", "http.demo.downstream_rq_total"):
        assert expected in out, out
    assert "status mix 2xx:" in out
