"""One TLS port, several sites: the TLS inspector reads SNI, filter chains pick the
certificate and the routes; a plaintext client on the same port gets its own chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from interop_helpers import (
    StartMeshlet,
    address,
    bootstrap,
    direct,
    downstream_tls,
    hcm,
    ports,
    require,
    run,
)

from certs import Pki, make_pki

pytestmark = pytest.mark.interop


def chain(filters: list[dict[str, Any]], *, server_names: list[str] | None = None,
          transport_socket: dict[str, Any] | None = None, transport: str = "") -> dict[str, Any]:
    match: dict[str, Any] = {}
    if server_names:
        match["server_names"] = server_names
    if transport:
        match["transport_protocol"] = transport
    result: dict[str, Any] = {"filters": filters}
    if match:
        result["filter_chain_match"] = match
    if transport_socket is not None:
        result["transport_socket"] = transport_socket
    return result


@pytest.mark.parametrize("engine", ["openssl", "meshlet"])
def test_sni_selects_certificate_and_routes(start_meshlet: StartMeshlet, tmp_path: Path, engine: str) -> None:
    require("curl")
    pki: Pki = make_pki(tmp_path / "pki")
    alpha = pki.issue("alpha", dns=["alpha.mesh.local"])
    beta = pki.issue("beta", dns=["beta.mesh.local"])
    port, admin = ports(2)
    listener = {
        "name": "sites",
        "address": address(port),
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3"
                                      ".TlsInspector"},
        }],
        "filter_chains": [
            chain([hcm([direct("/", 200, "alpha\n")], stat_prefix="alpha")],
                  server_names=["alpha.mesh.local"], transport_socket=downstream_tls(alpha.cert, alpha.key)),
            chain([hcm([direct("/", 200, "beta\n")], stat_prefix="beta")],
                  server_names=["beta.mesh.local"], transport_socket=downstream_tls(beta.cert, beta.key)),
            chain([hcm([direct("/", 200, "plaintext\n")], stat_prefix="plain")], transport="raw_buffer"),
        ],
    }
    start_meshlet(bootstrap([listener], [], admin), "--tls-engine", engine)

    for site in ("alpha", "beta"):
        host = f"{site}.mesh.local"
        # curl verifies the certificate against the name: the right chain served the right cert.
        done = run(["curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca_cert),
                    "--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}/"])
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{site}\n"
    done = run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"])
    assert done.stdout == "plaintext\n", done.stderr
    # An unknown name over TLS matches no chain: the connection is closed, nothing is served.
    done = run(["curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca_cert),
                "--resolve", f"gamma.mesh.local:{port}:127.0.0.1", f"https://gamma.mesh.local:{port}/"])
    assert done.returncode != 0 and done.stdout == ""
