"""Key providers from Envoy config (TypedStruct settings), the openssl engine's
refusal of provider-only certificates, and the ``meshlet keyserver`` CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from keys_helpers import Echo, MiniPki, client_ssl_context, key_server_process, meshlet_serve, stdlib_exchange

from meshlet.config.loader import parse_resource
from meshlet.config.model import TransportSocketConfig
from meshlet.config.tls import compile_transport_socket
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.keys.local import LocalKeyProvider
from meshlet.proxy.listeners.transport_sockets import make_factory
from meshlet.tls.aio import MeshletTlsSocketFactory

TRANSPORT_SOCKET = "type.googleapis.com/envoy.config.core.v3.TransportSocket"
DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"


def compile_socket(cert: dict[str, Any], pki: MiniPki) -> TransportSocketConfig:
    data = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM,
            "common_tls_context": {
                "tls_certificates": [cert],
                "validation_context": {"trusted_ca": {"filename": str(pki.ca_file)}},
            },
            "require_client_certificate": True,
        },
    }
    return compile_transport_socket(
        parse_resource(TRANSPORT_SOCKET, data), "transport_socket", server_side=True
    )


def provider_cert(cert_file: Path, name: str, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": str(cert_file)},
        "private_key_provider": {
            "provider_name": name,
            "typed_config": {"@type": TYPED_STRUCT, "value": settings},
            **extra,
        },
    }


async def test_offload_provider_from_envoy_config(tmp_path: Path) -> None:
    pki = MiniPki.create(tmp_path)
    leaf = pki.issue("server", "rsa")
    client = pki.issue("client", "ecdsa")
    settings = {"private_key": {"filename": str(leaf.key_file)}, "workers": 2, "max_in_flight": 8}
    compiled = compile_socket(provider_cert(leaf.cert_file, "meshlet.offload", settings), pki)
    factory = make_factory(compiled, default_engine="meshlet")
    assert isinstance(factory, MeshletTlsSocketFactory)
    key = factory.config.key
    try:
        assert key.stats()["workers"] == 2  # type: ignore[union-attr]
        served = await meshlet_serve(factory, Echo)
        try:
            assert (
                await asyncio.to_thread(stdlib_exchange, served.port, client_ssl_context(pki, client))
                == b"ping\n"
            )
        finally:
            served.server.close()
    finally:
        key.close()  # type: ignore[union-attr]


def test_provider_setting_errors_name_the_field(tmp_path: Path) -> None:
    pki = MiniPki.create(tmp_path)
    leaf = pki.issue("server")
    compiled = compile_socket(provider_cert(leaf.cert_file, "meshlet.offload", {"mode": "gpu"}), pki)
    with pytest.raises(
        ConfigError, match=r"private_key_provider.typed_config.mode: must be one of thread, process"
    ):
        make_factory(compiled, default_engine="meshlet")


def test_openssl_engine_refuses_provider_only_certificates(tmp_path: Path) -> None:
    pki = MiniPki.create(tmp_path)
    leaf = pki.issue("server")
    settings = {"private_key": {"filename": str(leaf.key_file)}}
    compiled = compile_socket(provider_cert(leaf.cert_file, "meshlet.local", settings), pki)
    with pytest.raises(UnsupportedConfig) as info:
        make_factory(compiled, default_engine="openssl")
    assert info.value.path.endswith("private_key_provider")
    assert "--tls-engine meshlet" in info.value.message
    assert "'meshlet.local'" in info.value.message


def test_openssl_engine_uses_the_fallback_key(tmp_path: Path) -> None:
    pki = MiniPki.create(tmp_path)
    leaf = pki.issue("server")
    cert = provider_cert(
        leaf.cert_file, "meshlet.local", {"private_key": {"filename": str(leaf.key_file)}}, fallback=True
    )
    cert["private_key"] = {"filename": str(leaf.key_file)}
    compiled = compile_socket(cert, pki)
    assert make_factory(compiled, default_engine="openssl").is_tls
    meshlet_factory = make_factory(compiled, default_engine="meshlet")
    assert isinstance(meshlet_factory, MeshletTlsSocketFactory)
    assert isinstance(meshlet_factory.config.key, LocalKeyProvider)  # the provider, not the fallback


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def meshlet(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "meshlet.cli.main", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_help_lists_the_keyserver_commands() -> None:
    assert "keyserver" in meshlet("--help").stdout
    usage = meshlet("keyserver", "--help").stdout
    for command in ("run", "generate", "import", "list"):
        assert command in usage


def test_cli_generate_import_list(tmp_path: Path) -> None:
    with key_server_process(tmp_path) as ks:
        made = ks.cli("generate", "--type", "p384", "--name", "made")
        assert made.returncode == 0, made.stderr
        name, pem = made.stdout.split("\n", 1)
        assert name == "made"
        public = serialization.load_pem_public_key(pem.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        assert "PRIVATE" not in made.stdout

        key = ec.generate_private_key(ec.SECP256R1())
        key_file = tmp_path / "imported.pem"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        out = tmp_path / "imported.pub"
        imported = ks.cli("import", "--key", str(key_file), "--name", "imported", "--public-out", str(out))
        assert imported.returncode == 0, imported.stderr
        assert imported.stdout == "imported\n"
        assert serialization.load_pem_public_key(out.read_bytes()).public_numbers() == (  # type: ignore[union-attr]
            key.public_key().public_numbers()
        )

        assert ks.cli("list").stdout == "imported\nmade\n"
        again = ks.cli("generate", "--type", "p256", "--name", "made")
        assert again.returncode == 1
        assert again.stderr.strip() == "meshlet: error: key server: EXISTS: a key named 'made' already exists"
        bad = ks.cli("generate", "--type", "dsa", "--name", "x")
        assert bad.returncode == 2
    # The key server is gone: one clear line, exit 1.
    gone = meshlet("keyserver", "list", "--socket", str(ks.socket_path))
    assert gone.returncode == 1
    assert gone.stderr.startswith("meshlet: error: cannot reach the key server at")
    assert len(gone.stderr.strip().splitlines()) == 1
