"""The sample upstream app (examples/apps/upstream.py), driven by curl and raw sockets."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest

from meshlet.bench.apps import start_upstream


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    child, bound = start_upstream()
    try:
        yield bound
    finally:
        child.stop()


def exchange(port: int, data: bytes, wait: float = 0.5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(data)
        sock.settimeout(wait)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(["curl", "-s", "--max-time", "5", *args], capture_output=True, text=True,
                          timeout=10, check=False)


def test_default_response_is_1_kib(port: int) -> None:
    done = curl("-o", "/dev/null", "-w", "%{http_code} %{size_download}", f"http://127.0.0.1:{port}/")
    assert done.stdout == "200 1024"


def test_status_and_head(port: int) -> None:
    status = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/status/503")
    assert status.stdout == "503"
    head = curl("-I", f"http://127.0.0.1:{port}/").stdout
    assert head.startswith("HTTP/1.1 200") and "content-length: 1024" in head


def test_echo_chunked_upload_with_expect_continue(port: int) -> None:
    body = "x" * 100_000
    done = curl("-v", "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
                "--data-binary", body, f"http://127.0.0.1:{port}/echo")
    assert done.stdout == body
    assert "HTTP/1.1 100 Continue" in done.stderr


def test_headers_endpoint(port: int) -> None:
    doc = json.loads(curl("-H", "X-Probe: 1", f"http://127.0.0.1:{port}/headers?q=1").stdout)
    assert doc["method"] == "GET" and doc["path"] == "/headers?q=1"
    assert ["x-probe", "1"] in doc["headers"]


def test_pipelined_responses_keep_request_order(port: int) -> None:
    slow_then_fast = b"GET /delay/100 HTTP/1.1\r\nHost: x\r\n\r\nGET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n"
    data = exchange(port, slow_then_fast)
    first, second = data.index(b"delayed 100 ms"), data.index(b"HTTP/1.1 201")
    assert first < second


def test_upgrade_switches_to_raw_echo(port: int) -> None:
    data = exchange(port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nhello raw")
    assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in data  # RFC 6455's example
    assert data.endswith(b"\r\n\r\nhello raw")


def test_malformed_and_oversized_requests(port: int) -> None:
    assert exchange(port, b"BAD\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    assert exchange(port, huge).startswith(b"HTTP/1.1 431 ")
