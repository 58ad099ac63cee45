"""HTTP/2 (h2c) and HTTP/1.1 load through the proxy from nghttp2's h2load and nghttp."""

from __future__ import annotations

import re

import pytest
from interop_helpers import (
    MeshletProcess,
    StartMeshlet,
    bootstrap,
    cluster,
    hcm,
    listener,
    ports,
    require,
    route,
    run,
)

pytestmark = pytest.mark.interop


@pytest.fixture
def proxy(start_meshlet: StartMeshlet, upstream_port: int) -> tuple[MeshletProcess, int]:
    port, admin = ports(2)
    config = bootstrap([listener("http", port, [hcm([route("/")])])], [cluster("app", upstream_port)], admin)
    return start_meshlet(config), port


def h2load_summary(output: str) -> tuple[int, int, int]:
    found = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", output)
    assert found, output
    total, done, succeeded = (int(g) for g in found.groups())
    return total, done, succeeded


@pytest.mark.parametrize("mode", ["h2c", "h1"])
def test_h2load(proxy: tuple[MeshletProcess, int], mode: str) -> None:
    require("h2load")
    _, port = proxy
    argv = ["h2load", "-n", "2000", "-c", "4", "-m", "10" if mode == "h2c" else "1", f"http://127.0.0.1:{port}/"]
    if mode == "h1":
        argv.insert(1, "--h1")
    done = run(argv, timeout=60)
    assert done.returncode == 0, done.stderr
    assert h2load_summary(done.stdout) == (2000, 2000, 2000)
    assert "status codes: 2000 2xx" in done.stdout
    protocol = "h2c" if mode == "h2c" else "http/1.1"
    assert f"Application protocol: {protocol}" in done.stdout


def test_nghttp_streams_and_upload(proxy: tuple[MeshletProcess, int], tmp_path: object) -> None:
    require("nghttp")
    _, port = proxy
    base = f"http://127.0.0.1:{port}"
    # Several concurrent streams on one connection, statuses per stream.
    done = run(["nghttp", "-n", "-s", f"{base}/", f"{base}/status/404", f"{base}/delay/50"], timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("/status/404") == 1
    # An upload echoed back.
    done = run(["nghttp", "-d", "/etc/hostname", f"{base}/echo"], timeout=30)
    assert done.returncode == 0, done.stderr
    with open("/etc/hostname") as fh:
        assert done.stdout == fh.read()
