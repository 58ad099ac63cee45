"""meshlet.pkcs11 against SoftHSM2: keys imported with softhsm2-util and
generated in the token, verified RSA-PSS and ECDSA signatures, config errors,
and mTLS handshakes with the stdlib client signed by the token."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from keys_helpers import (
    Echo,
    MiniPki,
    client_ssl_context,
    issue_for,
    meshlet_serve,
    server_context,
    stdlib_exchange,
    verify_tls_signature,
)

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError
from meshlet.keys.base import ProviderUnavailable
from meshlet.keys.pkcs11 import DEFAULT_MODULE, Pkcs11KeyProvider, build_pkcs11
from meshlet.tls.aio import MeshletTlsSocketFactory
from meshlet.tls.crypto import schemes_for_key

pkcs11 = pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")
if shutil.which("softhsm2-util") is None or not os.path.exists(DEFAULT_MODULE):
    pytest.skip("SoftHSM2 is not installed", allow_module_level=True)

PIN = "4321"
TOKEN = "meshlet-test"
DATA = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + bytes(range(48))


@dataclass
class Token:
    directory: Path
    keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]


def _softhsm(*args: str) -> None:
    done = subprocess.run(["softhsm2-util", *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """One token for the module: SoftHSM reads its config when the library is
    first initialised in this process, so tokens are made before that."""
    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        _softhsm("--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", "87654321")
        keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {
            "rsa": rsa.generate_private_key(65537, 2048),
            "p384": ec.generate_private_key(ec.SECP384R1()),
        }
        for i, (label, key) in enumerate(keys.items(), start=1):
            pem = directory / f"{label}.pem"
            pem.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            _softhsm(
                "--import", str(pem), "--token", TOKEN, "--label", label, "--id", f"{i:02x}", "--pin", PIN
            )
            pem.unlink()
        _generate_p256_in_token("p256")
        yield Token(directory, keys)
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


def _generate_p256_in_token(label: str) -> None:
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    lib = pkcs11.lib(DEFAULT_MODULE)
    with lib.get_token(token_label=TOKEN).open(user_pin=PIN, rw=True) as session:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        params.generate_keypair(store=True, label=label)


def config(label: str, **extra: object) -> PrivateKeyProviderConfig:
    settings: dict[str, object] = {"token_label": TOKEN, "pin": PIN, "key_label": label, **extra}
    return PrivateKeyProviderConfig("meshlet.pkcs11", settings)


@pytest.mark.parametrize("label", ["rsa", "p384", "p256"])
async def test_token_signatures_verify(token: Token, label: str) -> None:
    provider = build_pkcs11(config(label))
    try:
        if label in token.keys:
            expected = (
                token.keys[label]
                .public_key()
                .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            )
            assert (
                provider.public_key.public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                == expected
            )
        schemes = schemes_for_key(provider.public_key)
        assert schemes
        for scheme in schemes:
            verify_tls_signature(provider.public_key, scheme, await provider.sign(scheme, DATA), DATA)
        # Concurrent signs over the worker threads' sessions.
        signatures = await asyncio.gather(*(provider.sign(schemes[0], DATA) for _ in range(10)))
        for signature in signatures:
            verify_tls_signature(provider.public_key, schemes[0], signature, DATA)
        assert provider.stats()["ops"] == len(schemes) + 10
    finally:
        provider.close()


def test_pin_from_the_environment(token: Token, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLET_TEST_PIN", PIN)
    provider = build_pkcs11(
        PrivateKeyProviderConfig(
            "meshlet.pkcs11", {"token_label": TOKEN, "pin_env": "MESHLET_TEST_PIN", "key_label": "rsa"}
        )
    )
    assert isinstance(provider, Pkcs11KeyProvider)
    provider.close()


@pytest.mark.parametrize(
    ("settings", "error", "words"),
    [
        ({"key_label": "missing"}, ConfigError, r"typed_config.key_label: no private key labelled 'missing'"),
        ({"pin": "0000"}, ConfigError, r"typed_config.pin: the token refused the PIN"),
        ({"token_label": "nope"}, ProviderUnavailable, r"typed_config.token_label: no token labelled 'nope'"),
        ({"module": "/nonexistent.so"}, ProviderUnavailable, r"module /nonexistent.so does not exist"),
        ({"pin_env": "X"}, ConfigError, r"set exactly one of pin, pin_env"),
    ],
)
def test_config_errors_name_the_field(
    token: Token, settings: dict[str, object], error: type[Exception], words: str
) -> None:
    base = {"token_label": TOKEN, "pin": PIN, "key_label": "rsa"}
    with pytest.raises(error, match=words):
        build_pkcs11(PrivateKeyProviderConfig("meshlet.pkcs11", {**base, **settings}))


@pytest.mark.parametrize("label", ["rsa", "p256"])
async def test_mtls_handshake_signed_by_the_token(token: Token, tmp_path: Path, label: str) -> None:
    provider = build_pkcs11(config(label))
    public = provider.public_key
    provider.close()
    pki = MiniPki.create(tmp_path)
    cert_file = issue_for(pki, "server", public)
    client = pki.issue("client", "ecdsa")
    factory = MeshletTlsSocketFactory.from_context(server_context(pki, cert_file, config(label)))
    served = await meshlet_serve(factory, Echo)
    try:
        assert (
            await asyncio.to_thread(stdlib_exchange, served.port, client_ssl_context(pki, client))
            == b"ping\n"
        )
        assert factory.config.key.stats()["ops"] == 1  # type: ignore[union-attr]
    finally:
        served.server.close()
        factory.config.key.close()  # type: ignore[union-attr]
