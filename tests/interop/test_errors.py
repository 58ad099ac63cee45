"""Errors the proxy answers itself, as Envoy does: 404, 503, 504, 400, 431, 408."""

from __future__ import annotations

import socket
import time

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

from meshlet.bench.procs import free_port

pytestmark = pytest.mark.interop


@pytest.fixture
def proxy(start_meshlet: StartMeshlet, upstream_port: int) -> tuple[MeshletProcess, int]:
    port, admin = ports(2)
    routes = [
        route("/down/", cluster="down"),
        route("/slow/", prefix_rewrite="/delay/", timeout="0.3s"),
        route("/app/", prefix_rewrite="/"),
    ]
    http = hcm(routes, max_request_headers_kb=8, request_headers_timeout="0.5s")
    clusters = [cluster("app", upstream_port), cluster("down", free_port(), connect_timeout="0.5s")]
    return start_meshlet(bootstrap([listener("http", port, [http])], clusters, admin)), port


def curl_status_and_body(url: str, *extra: str) -> tuple[str, str]:
    require("curl")
    done = run(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *extra, url])
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    return status, body


def raw_exchange(port: int, data: bytes, wait: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def test_no_route_is_404(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    status, body = curl_status_and_body(f"http://127.0.0.1:{port}/nowhere")
    assert (status, body) == ("404", "")


def test_upstream_down_is_503_with_envoys_body(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    status, body = curl_status_and_body(f"http://127.0.0.1:{port}/down/x")
    assert status == "503"
    assert body.startswith("upstream connect error or disconnect/reset before headers. reset reason: ")


def test_route_timeout_is_504(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    started = time.monotonic()
    status, body = curl_status_and_body(f"http://127.0.0.1:{port}/slow/3000")
    assert (status, body) == ("504", "upstream request timeout")
    assert time.monotonic() - started < 5  # the 0.3 s route timeout, not the app's 3 s


def test_malformed_request_is_400(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    answer = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in answer.lower()


def test_oversized_headers_are_431(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    answer = raw_exchange(port, b"GET /app/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_slow_request_headers_are_408(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /app/ HTTP/1.1\r\nHost: x\r\n")  # ...and never finish the head
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_errors_do_not_disturb_other_connections(proxy: tuple[MeshletProcess, int]) -> None:
    meshlet, port = proxy
    raw_exchange(port, b"\x16\x03\x01garbage that is not HTTP\r\n\r\n", wait=1)
    status, _ = curl_status_and_body(f"http://127.0.0.1:{port}/app/")
    assert status == "200"
    assert meshlet.proc is not None and meshlet.proc.poll() is None
