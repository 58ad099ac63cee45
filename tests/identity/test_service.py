"""The CA service as its own process (``meshlet ca serve``), over TLS anchored
in the trust bundle: bootstrap tokens, renewals, and every refusal with its
reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ca_helpers import CaProcess, ca_service, init_ca, meshlet, openssl_verify
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlet.identity.cadir import TOKENS_DB
from meshlet.identity.csr import create_csr
from meshlet.identity.service import (
    CaClient,
    CaRefused,
    CertificateRequest,
    CertificateResponse,
    RenewalProof,
    make_renewal_proof,
)
from meshlet.identity.spiffe import SpiffeId
from meshlet.identity.tokens import BootstrapTokens, SqliteTokenStore
from meshlet.tls.keys_local import LocalKey

CART = SpiffeId.for_workload("example.org", "shop", "cart")
PAYMENTS = SpiffeId.for_workload("example.org", "shop", "payments")


@dataclass
class Setup:
    ca_dir: Path
    ca: CaProcess

    def token(self, spiffe_id: SpiffeId, ttl: str = "1h") -> str:
        result = meshlet("ca", "token", "--dir", str(self.ca_dir), "--spiffe-id", str(spiffe_id),
                         "--ttl", ttl)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def tokens(self) -> BootstrapTokens:
        return BootstrapTokens(SqliteTokenStore(self.ca_dir / TOKENS_DB))

    def client(self, bundle: bytes | None = None) -> CaClient:
        roots = bundle if bundle is not None else (self.ca_dir / "bundle.pem").read_bytes()
        return CaClient(self.ca.address, roots, server_name="127.0.0.1", timeout=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("ca-service")
    init_ca(tmp / "ca")
    with ca_service(tmp, tmp / "ca") as ca:
        yield Setup(tmp / "ca", ca)


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[CaClient]:
    client = setup.client()
    yield client
    await client.close()


async def request_for(spiffe_id: SpiffeId) -> tuple[CertificateRequest, LocalKey]:
    key = LocalKey(ec.generate_private_key(ec.SECP256R1()))
    csr = await create_csr(spiffe_id, key)
    return CertificateRequest(csr.public_bytes(serialization.Encoding.PEM).decode()), key


async def test_token_gets_an_svid_that_openssl_accepts(
    setup: Setup, client: CaClient, tmp_path: Path
) -> None:
    request, _ = await request_for(CART)
    response = await client.create_certificate(request, token=setup.token(CART))
    assert response.trust_domain == "example.org"
    assert response.bundle_pem() == (setup.ca_dir / "bundle.pem").read_bytes()
    (tmp_path / "chain.pem").write_text("".join(response.cert_chain))
    result = openssl_verify(setup.ca_dir / "root-cert.pem", tmp_path / "chain.pem")
    assert result.returncode == 0, result.stderr


async def expect_refusal(client: CaClient, request: CertificateRequest, token: str | None,
                         code: str, reason: str) -> None:
    with pytest.raises(CaRefused) as refused:
        await client.create_certificate(request, token=token)
    assert refused.value.code == code
    assert reason in refused.value.reason


async def test_forged_token_is_refused(client: CaClient) -> None:
    request, _ = await request_for(CART)
    await expect_refusal(client, request, "mlt1.bm90LWEtcmVhbC10b2tlbi1idXQtbG9va3MtbGlrZS1vbmU",
                         "UNAUTHENTICATED", "not known to this CA")


async def test_expired_token_is_refused(setup: Setup, client: CaClient) -> None:
    token = setup.tokens().issue(CART, ttl=0.5)
    await asyncio.sleep(0.6)
    request, _ = await request_for(CART)
    await expect_refusal(client, request, token, "UNAUTHENTICATED", "bootstrap token expired at")


async def test_replayed_token_is_refused(setup: Setup, client: CaClient) -> None:
    token = setup.token(CART)
    first, _ = await request_for(CART)
    await client.create_certificate(first, token=token)
    replay, _ = await request_for(CART)
    await expect_refusal(client, replay, token, "UNAUTHENTICATED", "already used")


async def test_csr_for_another_identity_is_refused(setup: Setup, client: CaClient) -> None:
    token = setup.token(CART)
    request, _ = await request_for(PAYMENTS)
    await expect_refusal(client, request, token, "PERMISSION_DENIED",
                         f"bound to {CART}; the request asks for {PAYMENTS}")
    # The refused request did not burn the token: its rightful owner still can.
    own, _ = await request_for(CART)
    await client.create_certificate(own, token=token)


async def test_token_for_another_purpose_is_refused(setup: Setup, client: CaClient) -> None:
    token = setup.tokens().issue(CART, purpose="join")
    request, _ = await request_for(CART)
    await expect_refusal(client, request, token, "UNAUTHENTICATED", "is for 'join', not 'csr'")


async def test_csr_whose_signature_does_not_verify_is_refused(setup: Setup, client: CaClient) -> None:
    request, _ = await request_for(CART)
    csr = x509.load_pem_x509_csr(request.csr_pem.encode())
    raw = bytearray(csr.public_bytes(serialization.Encoding.DER))
    raw[-3] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(raw)).public_bytes(serialization.Encoding.PEM).decode()
    await expect_refusal(client, CertificateRequest(tampered), setup.token(CART), "INVALID_ARGUMENT",
                         "signature does not verify")


async def test_request_without_credential_is_refused(client: CaClient) -> None:
    request, _ = await request_for(CART)
    await expect_refusal(client, request, None, "UNAUTHENTICATED", "no credential")


async def test_lifetime_above_the_maximum_is_refused(setup: Setup, client: CaClient) -> None:
    request, _ = await request_for(CART)
    too_long = CertificateRequest(request.csr_pem, ttl_seconds=365 * 86400)
    await expect_refusal(client, too_long, setup.token(CART), "INVALID_ARGUMENT", "exceeds the CA's maximum")


async def first_svid(
    setup: Setup, client: CaClient, spiffe_id: SpiffeId
) -> tuple[CertificateResponse, LocalKey]:
    request, key = await request_for(spiffe_id)
    return await client.create_certificate(request, token=setup.token(spiffe_id)), key


async def test_renewal_with_the_current_svid(setup: Setup, client: CaClient) -> None:
    current, current_key = await first_svid(setup, client, CART)
    request, _ = await request_for(CART)
    csr = x509.load_pem_x509_csr(request.csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    proof = await make_renewal_proof(current.chain_der(), current_key, csr, time.time())
    renewed = await client.create_certificate(CertificateRequest(request.csr_pem, renewal=proof))
    assert renewed.chain_der()[0] != current.chain_der()[0]

    # A proof signed by a key that is not the SVID's.
    stranger = LocalKey(ec.generate_private_key(ec.SECP256R1()))
    forged = await make_renewal_proof(current.chain_der(), stranger, csr, time.time())
    await expect_refusal(client, CertificateRequest(request.csr_pem, renewal=forged), None,
                         "PERMISSION_DENIED", "does not verify with the current SVID's key")
    # A stale proof (replayed long after it was made).
    stale = await make_renewal_proof(current.chain_der(), current_key, csr, time.time() - 3600)
    await expect_refusal(client, CertificateRequest(request.csr_pem, renewal=stale), None,
                         "PERMISSION_DENIED", "stale")
    # An SVID of one workload cannot renew into another identity.
    other, _ = await request_for(PAYMENTS)
    other_der = x509.load_pem_x509_csr(other.csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    cross = await make_renewal_proof(current.chain_der(), current_key, other_der, time.time())
    await expect_refusal(client, CertificateRequest(other.csr_pem, renewal=cross), None,
                         "PERMISSION_DENIED", f"renewal chain is for {CART}")
    # A chain from another CA is not an SVID of this trust domain.
    foreign = RenewalProof(("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",),
                           int(time.time()), b"x")
    await expect_refusal(client, CertificateRequest(request.csr_pem, renewal=foreign), None,
                         "PERMISSION_DENIED", "renewal chain")


async def test_connection_is_anchored_in_the_trust_bundle(setup: Setup, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    init_ca(other)
    stranger = setup.client(bundle=(other / "bundle.pem").read_bytes())
    request, _ = await request_for(CART)
    try:
        with pytest.raises(CaRefused) as refused:
            await stranger.create_certificate(request, token=setup.token(CART))
    finally:
        await stranger.close()
    assert refused.value.code == "UNAVAILABLE"


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xff\xfe not json", "bad request"),
    (b'{"csr": 5}', "'csr' (a PEM string) is required"),
    (b'{"csr": "\\ud800"}', "'csr' (a PEM string) is required"),
    (b'{"csr": "x", "ttl_seconds": "long"}', "'ttl_seconds' must be a number"),
    (b'{"csr": "x", "renewal": {"signed_at": 1, "signature": "!!", "chain": []}}', "bad request"),
    (b'{"csr": "-----BEGIN CERTIFICATE REQUEST-----\\nAAAA\\n-----END CERTIFICATE REQUEST-----\\n"}',
     "not a PKCS#10"),
])
async def test_hostile_requests_get_a_status_and_the_ca_keeps_serving(
    setup: Setup, client: CaClient, payload: bytes, reason: str
) -> None:
    import grpc

    roots = (setup.ca_dir / "bundle.pem").read_bytes()
    async with grpc.aio.secure_channel(
        setup.ca.address, grpc.ssl_channel_credentials(roots),
        options=[("grpc.ssl_target_name_override", "127.0.0.1")],
    ) as channel:
        call = channel.unary_unary("/meshlet.identity.v1.CertificateService/CreateCertificate")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(payload, timeout=5)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (failed.value.details() or "")
    # The service is unharmed.
    request, _ = await request_for(CART)
    await client.create_certificate(request, token=setup.token(CART))
