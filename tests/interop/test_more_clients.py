"""More independent peers and shapes of traffic: HTTP/1.0, large bodies both ways over
HTTP/1.1 and HTTP/2, h2load over TLS with each engine, and HAProxy speaking h2c to meshlet."""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from interop_helpers import (
    MeshletProcess,
    StartMeshlet,
    bootstrap,
    cluster,
    downstream_tls,
    hcm,
    listener,
    ports,
    require,
    route,
    run,
)

from certs import Pki, make_pki
from meshlet.bench.haproxy import haproxy_binary
from meshlet.bench.procs import free_port, wait_for_port

pytestmark = pytest.mark.interop

MIB = 1024 * 1024


@pytest.fixture
def proxy(start_meshlet: StartMeshlet, upstream_port: int) -> tuple[MeshletProcess, int]:
    port, admin = ports(2)
    config = bootstrap([listener("http", port, [hcm([route("/")], stat_prefix="ingress")])],
                       [cluster("app", upstream_port)], admin)
    return start_meshlet(config), port


def test_http_1_0_client(proxy: tuple[MeshletProcess, int]) -> None:
    require("curl")
    _, port = proxy
    done = run(["curl", "-sS", "--max-time", "10", "--http1.0", "-i", f"http://127.0.0.1:{port}/"])
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition("\n\n")
    assert re.match(r"HTTP/1\.[01] 200", head)
    assert len(body) == 1024


@pytest.mark.parametrize("http", ["--http1.1", "--http2-prior-knowledge"])
def test_large_bodies_both_ways(proxy: tuple[MeshletProcess, int], http: str, tmp_path: Path) -> None:
    """4 MiB down and 4 MiB up: past every buffer and flow-control window on the path."""
    require("curl")
    _, port = proxy
    base = f"http://127.0.0.1:{port}"
    done = run(["curl", "-sS", "--max-time", "30", http, "-o", str(tmp_path / "down"),
                "-w", "%{http_code} %{size_download}", f"{base}/bytes/{4 * MIB}"], timeout=40)
    assert done.stdout == f"200 {4 * MIB}", done.stderr
    upload = tmp_path / "up"
    upload.write_bytes(bytes(range(256)) * (4 * MIB // 256))
    done = run(["curl", "-sS", "--max-time", "30", http, "--data-binary", f"@{upload}",
                "-o", str(tmp_path / "echoed"), "-w", "%{http_code}", f"{base}/echo"], timeout=40)
    assert done.stdout == "200", done.stderr
    echoed = (tmp_path / "echoed").read_bytes()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(upload.read_bytes()).digest()


@pytest.mark.parametrize("engine", ["openssl", "meshlet"])
def test_h2load_over_tls(start_meshlet: StartMeshlet, upstream_port: int, tmp_path: Path,
                         engine: str) -> None:
    require("h2load")
    pki: Pki = make_pki(tmp_path / "pki")
    port, admin = ports(2)
    tls = downstream_tls(pki.server_cert, pki.server_key)
    config = bootstrap([listener("https", port, [hcm([route("/")])], transport_socket=tls)],
                       [cluster("app", upstream_port)], admin)
    start_meshlet(config, "--tls-engine", engine)
    done = run(["h2load", "-n", "500", "-c", "4", "-m", "8", f"https://127.0.0.1:{port}/"], timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Application protocol: h2" in done.stdout
    assert "status codes: 500 2xx" in done.stdout
    assert "TLS Protocol: TLSv1.3" in done.stdout


@pytest.fixture
def haproxy_in_front(proxy: tuple[MeshletProcess, int], tmp_path: Path) -> Iterator[int]:
    """HAProxy (an independent HTTP/2 client) forwarding to meshlet over h2c."""
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed")
    _, meshlet_port = proxy
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""\
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend front
    bind 127.0.0.1:{port}
    default_backend meshlet
backend meshlet
    server meshlet 127.0.0.1:{meshlet_port} proto h2
""")
    proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 10)
        yield port
    finally:
        proc.kill()
        proc.wait(5)


def test_haproxy_speaks_h2c_to_meshlet(proxy: tuple[MeshletProcess, int], haproxy_in_front: int) -> None:
    require("curl")
    meshlet, _ = proxy
    for path, expected in (("/", "200 1024"), ("/status/418", "418 11"), ("/echo", "200 5")):
        extra = ["--data-binary", "hello"] if path == "/echo" else []
        done = run(["curl", "-sS", "--max-time", "10", *extra, "-o", "/dev/null",
                    "-w", "%{http_code} %{size_download}", f"http://127.0.0.1:{haproxy_in_front}{path}"])
        assert done.stdout == expected, done.stderr
    _, stats = meshlet.admin("/stats")
    counters = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
    assert int(counters["http.ingress.downstream_cx_http2_total"]) >= 1
