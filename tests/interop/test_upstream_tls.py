"""Upstream TLS and mTLS: meshlet as the TLS client of ``openssl s_server``.

``s_server -www`` answers every request with an HTTP/1.0 status page
describing the TLS session; ``-Verify 1`` makes it demand a client certificate.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from interop_helpers import (
    StartMeshlet,
    bootstrap,
    cluster,
    hcm,
    listener,
    ports,
    require,
    route,
    run,
    tls_socket,
)

from certs import Pki, make_pki
from meshlet.bench.procs import free_port, wait_for_port

pytestmark = pytest.mark.interop

ENGINES = ["openssl", "meshlet"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def s_server(pki: Pki) -> Iterator[int]:
    require("openssl")
    port = free_port()
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(pki.server_cert),
            "-key", str(pki.server_key), "-CAfile", str(pki.ca_cert), "-Verify", "1",
            "-verify_return_error", "-www", "-tls1_3", "-quiet"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 10)
        yield port
    finally:
        proc.kill()
        proc.wait(5)


def upstream_tls(pki: Pki, *, with_client_cert: bool) -> dict[str, object]:
    common: dict[str, object] = {
        "validation_context": {
            "trusted_ca": {"filename": str(pki.ca_cert)},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "localhost"}}],
        },
    }
    if with_client_cert:
        common["tls_certificates"] = [{"certificate_chain": {"filename": str(pki.client_cert)},
                                       "private_key": {"filename": str(pki.client_key)}}]
    return tls_socket({"common_tls_context": common, "sni": "localhost"}, upstream=True)


def start(start_meshlet: StartMeshlet, upstream_port: int, pki: Pki, engine: str, *,
          with_client_cert: bool) -> int:
    port, admin = ports(2)
    socket_config = upstream_tls(pki, with_client_cert=with_client_cert)
    upstream = cluster("tls_app", upstream_port, transport_socket=socket_config)
    config = bootstrap([listener("http", port, [hcm([route("/", cluster="tls_app")])])], [upstream], admin)
    start_meshlet(config, "--tls-engine", engine)
    return port


@pytest.mark.parametrize("engine", ENGINES)
def test_mtls_to_openssl_s_server(start_meshlet: StartMeshlet, s_server: int, pki: Pki, engine: str) -> None:
    require("curl")
    port = start(start_meshlet, s_server, pki, engine, with_client_cert=True)
    # The page is an HTTP/1.0 body delimited by the server closing its TLS connection: the
    # response ends there, long before the route's 15 s timeout (curl gives up at 8 s).
    done = run(["curl", "-sS", "--max-time", "8", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}/"],
               timeout=30)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    assert status == "200", done.stdout + done.stderr
    assert "TLSv1.3" in body  # s_server's page describes the session the proxy opened


@pytest.mark.parametrize("engine", ENGINES)
def test_upstream_demanding_a_client_certificate_refuses_the_proxy_without_one(
    start_meshlet: StartMeshlet, s_server: int, pki: Pki, engine: str
) -> None:
    require("curl")
    port = start(start_meshlet, s_server, pki, engine, with_client_cert=False)
    done = run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                f"http://127.0.0.1:{port}/"])
    assert done.stdout == "503"


@pytest.mark.parametrize("engine", ENGINES)
def test_proxy_refuses_an_upstream_it_does_not_trust(start_meshlet: StartMeshlet, s_server: int, pki: Pki,
                                                      engine: str, tmp_path: Path) -> None:
    require("curl")
    other = make_pki(tmp_path / "other", ca_name="some other CA")
    port, admin = ports(2)
    socket_config = upstream_tls(pki, with_client_cert=True)
    socket_config["typed_config"]["common_tls_context"]["validation_context"]["trusted_ca"] = {  # type: ignore[index]
        "filename": str(other.ca_cert)}
    upstream = cluster("tls_app", s_server, transport_socket=socket_config)
    config = bootstrap([listener("http", port, [hcm([route("/", cluster="tls_app")])])], [upstream], admin)
    start_meshlet(config, "--tls-engine", engine)
    done = run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                f"http://127.0.0.1:{port}/"])
    assert done.stdout == "503"
