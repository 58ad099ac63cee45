"""SVIDs the control plane has the mesh CA sign for proxies, served over SDS: with the key
in process, or in a key server so that only its handle travels; renewal at half-life."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from translate_helpers import ALL_V1, MTLS_STRICT, as_dict, bookinfo, compile_like_a_proxy, node_of

from meshlet.control.translate import translate_with_status
from meshlet.control.translate.identity import CaIdentity, KeyServerKeys, key_handle
from meshlet.identity.bundle import TrustBundle
from meshlet.identity.ca import CertificateAuthority, create_root
from meshlet.keys.keyserver.server import KeyServer
from meshlet.keys.keyserver.store import KeyStore
from meshlet.tls.keys_local import LocalKey
from meshlet.xds.snapshot import SECRET

TRUST_DOMAIN = "cluster.local"


async def mesh_ca() -> CertificateAuthority:
    key = LocalKey(ec.generate_private_key(ec.SECP256R1()))
    root = await create_root(TRUST_DOMAIN, key)
    return CertificateAuthority(TRUST_DOMAIN, root, key, TrustBundle.of(TRUST_DOMAIN, [root]))


def spiffe_ids(chain_pem: bytes) -> list[str]:
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    return leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)


async def test_svid_for_the_workload_identity_with_the_key_in_process() -> None:
    identity = CaIdentity(await mesh_ca())
    node = node_of("reviews-v1")
    assert await identity.prepare(node, "bookinfo-reviews")
    assert not await identity.prepare(node, "bookinfo-reviews")  # cached until renewal
    t = translate_with_status(node, bookinfo(ALL_V1, MTLS_STRICT), identity)
    compile_like_a_proxy(t.messages)
    secrets = {as_dict(m)["name"]: as_dict(m) for m in t.messages[SECRET]}
    certificate = identity.certificate_for(node)
    assert certificate is not None and certificate.private_key_pem is not None
    assert spiffe_ids(certificate.chain_pem) == ["spiffe://cluster.local/ns/default/sa/bookinfo-reviews"]
    assert "private_key" in secrets["default"]["tls_certificate"]


async def test_renewal_at_half_life_with_a_new_key() -> None:
    now = [1_000_000.0]
    identity = CaIdentity(await mesh_ca(), ttl=datetime.timedelta(hours=1), clock=lambda: now[0])
    node = node_of("ratings-v1")
    await identity.prepare(node, "bookinfo-ratings")
    first = identity.certificate_for(node)
    assert identity.next_renewal() == now[0] + 1800
    now[0] += 1799
    assert not await identity.prepare(node, "bookinfo-ratings")
    now[0] += 2
    assert await identity.prepare(node, "bookinfo-ratings")
    second = identity.certificate_for(node)
    assert first is not None and second is not None
    assert second.chain_pem != first.chain_pem and second.private_key_pem != first.private_key_pem
    # A changed service account is a new identity: issued at once.
    assert await identity.prepare(node, "other")
    again = identity.certificate_for(node)
    assert again is not None and spiffe_ids(again.chain_pem) == ["spiffe://cluster.local/ns/default/sa/other"]


@pytest.fixture
async def keyserver(tmp_path: Path) -> AsyncIterator[Path]:
    server = KeyServer(KeyStore(tmp_path / "keys"))
    path = tmp_path / "ks.sock"
    await server.start(path)
    try:
        yield path
    finally:
        await server.close()


async def test_key_in_a_key_server_never_travels(keyserver: Path) -> None:
    identity = CaIdentity(await mesh_ca(), keys=KeyServerKeys(str(keyserver)))
    node = node_of("details-v1")
    await identity.prepare(node, "bookinfo-details")
    certificate = identity.certificate_for(node)
    assert certificate is not None and certificate.private_key_pem is None
    provider = certificate.key_provider
    assert provider is not None and provider.provider_name == "meshlet.keyserver"
    t = translate_with_status(node, bookinfo(ALL_V1, MTLS_STRICT), identity)
    secret = next(as_dict(m) for m in t.messages[SECRET] if as_dict(m)["name"] == "default")
    tls = secret["tls_certificate"]
    assert "private_key" not in tls
    assert tls["private_key_provider"]["provider_name"] == "meshlet.keyserver"
    assert tls["private_key_provider"]["typed_config"]["value"]["handle"] == provider.settings["handle"]
    # The proxy's compiler opens the key by handle in the key server (a blocking call,
    # so off this loop, which runs the key server).
    await asyncio.to_thread(compile_like_a_proxy, t.messages)


def test_key_handles_fit_the_key_server() -> None:
    assert key_handle("svid-default-reviews-v1-1700000000") == "svid-default-reviews-v1-1700000000"
    long = key_handle("svid-" + "x" * 100 + "-1700000000")
    assert len(long) == 64 and long.endswith("-1700000000") and long[0].isalnum()
    assert key_handle("svid-ns/name:1") == "svid-ns-name-1"
