"""CSRs signed inside a key provider, and the CA's reading of them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from ca_helpers import key_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.identity import der
from meshlet.identity.csr import MAX_CSR_BYTES, CsrError, create_csr, read_csr
from meshlet.identity.spiffe import SpiffeId
from meshlet.tls.keys_local import LocalKey

WORKLOAD = SpiffeId.for_workload("example.org", "shop", "cart")


def openssl_req_verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "req", "-in", str(path), "-noout", "-verify"],
                          capture_output=True, text=True, timeout=10, check=False)


@pytest.mark.parametrize("make", [
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: rsa.generate_private_key(65537, 2048),
], ids=["p256", "p384", "rsa2048"])
async def test_csr_signed_through_a_key_handle(make: object, tmp_path: Path) -> None:
    assert callable(make)
    key = LocalKey(make())
    csr = await create_csr(WORKLOAD, key)
    checked = read_csr(csr.public_bytes(serialization.Encoding.PEM))
    assert checked.spiffe_id == WORKLOAD
    assert checked.public_key == key.public_key  # the provider's key, not the stand-in
    assert csr.subject == x509.Name([])
    path = tmp_path / "req.pem"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    result = openssl_req_verify(path)
    assert result.returncode == 0 and "verify OK" in (result.stdout + result.stderr), result.stderr


async def test_csr_from_a_key_generated_in_a_key_server(tmp_path: Path) -> None:
    from meshlet.keys.keyserver.client import build_keyserver, call, checked
    from meshlet.keys.keyserver.protocol import GenerateRequest

    with key_server(tmp_path) as socket_path:
        checked(call(str(socket_path), GenerateRequest(1, "p256", "workload")))
        provider = build_keyserver(
            PrivateKeyProviderConfig("meshlet.keyserver", {"socket": str(socket_path), "handle": "workload"})
        )
        try:
            csr = await create_csr(WORKLOAD, provider)
        finally:
            provider.close()
    result = read_csr(csr.public_bytes(serialization.Encoding.DER))
    assert result.spiffe_id == WORKLOAD
    assert result.public_key == provider.public_key


def _csr_with(key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName] | None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(("sans", "reason"), [
    (None, "requests no subjectAltName"),
    ([x509.UniformResourceIdentifier(str(WORKLOAD)), x509.UniformResourceIdentifier("spiffe://example.org/x")],
     "exactly one URI SAN"),
    ([x509.UniformResourceIdentifier(str(WORKLOAD)), x509.DNSName("cart.shop")],
     "SANs other than one SPIFFE ID"),
    ([x509.UniformResourceIdentifier("https://example.org/ns/a")], "not a SPIFFE ID"),
])
def test_csr_asking_for_anything_but_one_spiffe_id_is_refused(
    sans: list[x509.GeneralName] | None, reason: str
) -> None:
    with pytest.raises(CsrError, match=reason):
        read_csr(_csr_with(ec.generate_private_key(ec.SECP256R1()), sans))


async def test_csr_whose_signature_does_not_verify_is_refused() -> None:
    csr = await create_csr(WORKLOAD, LocalKey(ec.generate_private_key(ec.SECP256R1())))
    encoded = csr.public_bytes(serialization.Encoding.DER)
    info, algorithm, _signature = der.children(der.read_element(encoded))
    # Someone else's signature over the same request: proof of possession fails.
    stranger = ec.generate_private_key(ec.SECP256R1()).sign(info.encoded, ec.ECDSA(hashes.SHA256()))
    forged = der.signed(info.encoded, algorithm.encoded, stranger)
    with pytest.raises(CsrError, match="signature does not verify"):
        read_csr(forged)


def test_garbage_and_oversized_input_is_refused() -> None:
    with pytest.raises(CsrError, match="not a PKCS#10"):
        read_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(CsrError, match="not a PKCS#10"):
        read_csr(b"\x30\x03\x02\x01\x00")
    with pytest.raises(CsrError, match="larger than"):
        read_csr(b"0" * (MAX_CSR_BYTES + 1))
