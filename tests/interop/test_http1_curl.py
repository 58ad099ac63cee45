"""HTTP/1.1 and h2c through the real proxy process, driven by curl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from interop_helpers import (
    MeshletProcess,
    StartMeshlet,
    bootstrap,
    cluster,
    direct,
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
    require("curl")
    port, admin = ports(2)
    routes = [
        direct("/hello", 200, "hello from meshlet\n"),
        route("/app/", prefix_rewrite="/"),
        route("/"),
    ]
    config = bootstrap([listener("http", port, [hcm(routes)])], [cluster("app", upstream_port)], admin)
    return start_meshlet(config), port


def curl(*args: str) -> tuple[str, str]:
    done = run(["curl", "-sS", "--max-time", "10", *args])
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_get_keep_alive_two_requests_one_connection(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    out, err = curl("-v", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{size_download}\n",
                    f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/app/")
    assert out.splitlines() == ["200 1024", "200 1024"]
    assert "Re-using existing connection" in err


def test_headers_reach_the_upstream(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    out, _ = curl("-H", "X-Probe: 42", f"http://127.0.0.1:{port}/headers?x=1")
    doc = json.loads(out)
    headers = dict(doc["headers"])
    assert doc["method"] == "GET" and doc["path"] == "/headers?x=1"
    assert headers["x-probe"] == "42"
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers.get("x-forwarded-proto") == "http"
    assert "x-request-id" in headers


def test_direct_response(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    out, _ = curl("-i", f"http://127.0.0.1:{port}/hello")
    head, _, body = out.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200")
    assert body == "hello from meshlet\n"


def test_chunked_upload_is_echoed(proxy: tuple[MeshletProcess, int], tmp_path: Path) -> None:
    _, port = proxy
    body = "0123456789" * 50_000  # 500 kB: several body chunks and flow-control pauses
    upload = tmp_path / "upload.txt"
    upload.write_text(body)
    out, _ = curl("-H", "Transfer-Encoding: chunked", "-H", "Content-Type: text/x-probe",
                  "--data-binary", f"@{upload}", f"http://127.0.0.1:{port}/echo")
    assert out == body


def test_expect_100_continue(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    body = "x" * 4096
    out, err = curl("-v", "-H", "Expect: 100-continue", "--data-binary", body, f"http://127.0.0.1:{port}/echo")
    assert out == body
    assert "HTTP/1.1 100 Continue" in err


def test_head(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    out, _ = curl("-I", f"http://127.0.0.1:{port}/")
    assert out.startswith("HTTP/1.1 200")
    assert "content-length: 1024" in out.lower()


def test_h2c_prior_knowledge(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    out, _ = curl("--http2-prior-knowledge", "-o", "/dev/null",
                  "-w", "%{http_version} %{http_code} %{size_download}", f"http://127.0.0.1:{port}/")
    assert out == "2 200 1024"
    out, _ = curl("--http2-prior-knowledge", "--data-binary", "over h2c", f"http://127.0.0.1:{port}/echo")
    assert out == "over h2c"


def test_upstream_status_passes_through(proxy: tuple[MeshletProcess, int]) -> None:
    _, port = proxy
    out, _ = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/status/503")
    assert out == "503"
