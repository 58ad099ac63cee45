"""TLS and mTLS through the proxy with OpenSSL-based peers: curl, openssl s_client, stdlib ssl.

Each test runs with both TLS engines (``--tls-engine openssl`` and ``meshlet``).
"""

from __future__ import annotations

import http.client
import ssl
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

pytestmark = pytest.mark.interop

ENGINES = ["openssl", "meshlet"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def start_tls_proxy(start_meshlet: StartMeshlet, upstream_port: int, pki: Pki, engine: str, *,
                    mtls: bool) -> tuple[MeshletProcess, int]:
    port, admin = ports(2)
    tls = downstream_tls(pki.server_cert, pki.server_key, ca=pki.ca_cert if mtls else None,
                         require_client=mtls)
    config = bootstrap([listener("https", port, [hcm([route("/")])], transport_socket=tls)],
                       [cluster("app", upstream_port)], admin)
    return start_meshlet(config, "--tls-engine", engine), port


@pytest.mark.parametrize("engine", ENGINES)
def test_curl_http2_over_tls(start_meshlet: StartMeshlet, upstream_port: int, pki: Pki, engine: str) -> None:
    require("curl")
    _, port = start_tls_proxy(start_meshlet, upstream_port, pki, engine, mtls=False)
    url = f"https://localhost:{port}/"
    resolve = f"localhost:{port}:127.0.0.1"
    for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
        done = run(["curl", "-sS", "--max-time", "10", flag, "--cacert", str(pki.ca_cert),
                    "--resolve", resolve, "-o", "/dev/null",
                    "-w", "%{http_version} %{http_code} %{size_download}", url])
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{version} 200 1024"


@pytest.mark.parametrize("engine", ENGINES)
def test_curl_refuses_an_untrusted_proxy(start_meshlet: StartMeshlet, upstream_port: int, pki: Pki,
                                         engine: str, tmp_path: Path) -> None:
    require("curl")
    _, port = start_tls_proxy(start_meshlet, upstream_port, pki, engine, mtls=False)
    other = make_pki(tmp_path / "other", ca_name="some other CA")
    done = run(["curl", "-sS", "--max-time", "10", "--cacert", str(other.ca_cert), f"https://127.0.0.1:{port}/"])
    assert done.returncode == 60  # CURLE_PEER_FAILED_VERIFICATION


@pytest.mark.parametrize("engine", ENGINES)
def test_mtls_with_openssl_s_client(start_meshlet: StartMeshlet, upstream_port: int, pki: Pki,
                                    engine: str) -> None:
    require("openssl")
    _, port = start_tls_proxy(start_meshlet, upstream_port, pki, engine, mtls=True)
    request = b"GET /status/201 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    base = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-CAfile", str(pki.ca_cert), "-verify_return_error", "-ign_eof", "-tls1_3"]
    done = run([*base, "-cert", str(pki.client_cert), "-key", str(pki.client_key)], input=request)
    assert "Verify return code: 0 (ok)" in done.stdout
    assert "HTTP/1.1 201 Created" in done.stdout
    # Without a client certificate the proxy refuses the handshake (TLS 1.3: alert after Finished).
    done = run(base, input=request)
    assert "HTTP/1.1 201" not in done.stdout
    assert "alert" in (done.stdout + done.stderr).lower()


@pytest.mark.parametrize("engine", ENGINES)
def test_mtls_with_stdlib_ssl(start_meshlet: StartMeshlet, upstream_port: int, pki: Pki, engine: str) -> None:
    _, port = start_tls_proxy(start_meshlet, upstream_port, pki, engine, mtls=True)
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        for _ in range(3):  # keep-alive over one TLS connection
            conn.request("POST", "/echo", body=b"over mTLS", headers={"Content-Type": "text/plain"})
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"over mTLS")
        assert conn.sock is not None
        assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.version() == "TLSv1.3"
    finally:
        conn.close()

    anonymous = ssl.create_default_context(cafile=str(pki.ca_cert))
    conn = http.client.HTTPSConnection("localhost", port, context=anonymous, timeout=10)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            conn.request("GET", "/")
            conn.getresponse()
    finally:
        conn.close()
