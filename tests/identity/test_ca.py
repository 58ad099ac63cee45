"""The CA: SVID contents, chains that OpenSSL and the TLS verifier accept,
a plug-in intermediate, a CA key held by a key server, root rotation."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest
from ca_helpers import key_server, openssl_verify, write_pem
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshlet.identity.bundle import TrustBundle, TrustBundleSet
from meshlet.identity.ca import (
    CaError,
    CertificateAuthority,
    IssuancePolicy,
    create_intermediate,
    create_root,
)
from meshlet.identity.cadir import (
    BUNDLE,
    CA_KEY,
    CaDirectory,
    CaDirectoryError,
    KeyPlacement,
    activate_root,
    finish_root_rotation,
    init_root_ca,
    rotate_root,
)
from meshlet.identity.spiffe import SpiffeId
from meshlet.tls.keys_local import LocalKey
from meshlet.tls.verify import PeerPolicy, PeerRole, PeerVerificationError, verify_peer

TD = "example.org"
WORKLOAD = SpiffeId.for_workload(TD, "shop", "cart")
KEY_MAKERS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
}


async def root_ca(kind: str = "p256", **policy: datetime.timedelta) -> CertificateAuthority:
    key = LocalKey(KEY_MAKERS[kind]())
    root = await create_root(TD, key)
    return CertificateAuthority(TD, root, key, TrustBundle.of(TD, [root]), policy=IssuancePolicy(**policy))


def verify_as_peer(chain: tuple[bytes, ...], bundle: TrustBundle) -> SpiffeId | None:
    policy = PeerPolicy(role=PeerRole.CLIENT, bundles=TrustBundleSet.of([bundle]))
    return verify_peer(chain, policy, datetime.datetime.now(datetime.UTC)).spiffe_id


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048"])
async def test_svid_carries_the_spiffe_profile(kind: str, tmp_path: Path) -> None:
    ca = await root_ca(kind)
    workload_key = KEY_MAKERS[kind]()
    before = datetime.datetime.now(datetime.UTC)
    issued = await ca.issue(WORKLOAD, workload_key.public_key())
    leaf = issued.leaf

    assert leaf.subject == x509.Name([])  # identity is the URI SAN, never the CN
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WORKLOAD)]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert usage.key_encipherment == (kind == "rsa2048")
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Backdated for skew, 24 h of lifetime from now.
    assert leaf.not_valid_before_utc <= before - datetime.timedelta(minutes=4)
    lifetime = leaf.not_valid_after_utc - before
    assert datetime.timedelta(hours=23, minutes=59) <= lifetime <= datetime.timedelta(hours=24, seconds=5)

    leaf.verify_directly_issued_by(ca.certificate)
    assert verify_as_peer(issued.chain_der(), ca.bundle) == WORKLOAD
    result = openssl_verify(write_pem(tmp_path / "root.pem", ca.certificate),
                            write_pem(tmp_path / "leaf.pem", *issued.chain))
    assert result.returncode == 0, result.stderr


async def test_intermediate_under_a_users_root_verifies_with_openssl(tmp_path: Path) -> None:
    user_root_key = LocalKey(ec.generate_private_key(ec.SECP256R1()))
    user_root = await create_root(TD, user_root_key)
    intermediate_key = LocalKey(ec.generate_private_key(ec.SECP256R1()))
    intermediate = await create_intermediate(TD, intermediate_key.public_key, user_root, user_root_key)
    bundle = TrustBundle.of(TD, [user_root])
    ca = CertificateAuthority(TD, intermediate, intermediate_key, bundle, (intermediate,))
    issued = await ca.issue(WORKLOAD, ec.generate_private_key(ec.SECP256R1()).public_key())

    assert issued.chain == (issued.leaf, intermediate)
    constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    root_file = write_pem(tmp_path / "root.pem", user_root)
    leaf_file = write_pem(tmp_path / "leaf.pem", issued.leaf)
    accepted = openssl_verify(root_file, leaf_file, write_pem(tmp_path / "intermediate.pem", intermediate))
    assert accepted.returncode == 0, accepted.stderr
    # Without the intermediate there is no path: the check above is not vacuous.
    refused = openssl_verify(root_file, leaf_file)
    assert refused.returncode != 0
    assert verify_as_peer(issued.chain_der(), ca.bundle) == WORKLOAD


async def test_no_certificate_outlives_its_issuer() -> None:
    root_key = LocalKey(ec.generate_private_key(ec.SECP256R1()))
    root = await create_root(TD, root_key)
    key = LocalKey(ec.generate_private_key(ec.SECP256R1()))
    short = await create_intermediate(TD, key.public_key, root, root_key, ttl=datetime.timedelta(hours=1))
    ca = CertificateAuthority(TD, short, key, TrustBundle.of(TD, [root]), (short,))
    issued = await ca.issue(WORKLOAD, ec.generate_private_key(ec.SECP256R1()).public_key())
    assert issued.leaf.not_valid_after_utc == short.not_valid_after_utc


async def test_refusals_name_the_problem() -> None:
    ca = await root_ca(max_ttl=datetime.timedelta(hours=48))
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CaError, match=r"not in trust domain 'example\.org'"):
        await ca.issue(SpiffeId.for_workload("other.org", "a", "b"), public)
    with pytest.raises(CaError, match="exceeds the CA's maximum"):
        await ca.issue(WORKLOAD, public, ttl=datetime.timedelta(days=3))
    with pytest.raises(CaError, match="needs a workload path"):
        await ca.issue(SpiffeId.parse("spiffe://example.org"), public)
    other_key = LocalKey(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CaError, match="does not match the CA certificate"):
        CertificateAuthority(TD, ca.certificate, other_key, ca.bundle)


async def test_ca_key_held_by_a_key_server(tmp_path: Path) -> None:
    with key_server(tmp_path) as socket_path:
        ca_dir = tmp_path / "ca"
        await init_root_ca(ca_dir, TD, placement=KeyPlacement("keyserver", keyserver_socket=str(socket_path)))
        assert not (ca_dir / CA_KEY).exists()  # no key bytes in the CA directory
        authority = CaDirectory(ca_dir).authority()
        assert type(authority.key).__name__ == "KeyServerProvider"
        issued = await authority.issue(WORKLOAD, ec.generate_private_key(ec.SECP256R1()).public_key())
        result = openssl_verify(ca_dir / "root-cert.pem", write_pem(tmp_path / "leaf.pem", *issued.chain))
        assert result.returncode == 0, result.stderr
        authority.key.close()  # type: ignore[attr-defined]


async def test_root_rotation_overlaps_old_and_new_roots(tmp_path: Path) -> None:
    ca_dir = CaDirectory(tmp_path / "ca")
    await init_root_ca(ca_dir.path, TD)
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    old_svid = await ca_dir.authority().issue(WORKLOAD, public)
    old_root = ca_dir.certificates(BUNDLE)[0]

    # Step 1: the new root joins the bundle; the old one still signs.
    new_root = await rotate_root(ca_dir)
    staged = ca_dir.authority()
    assert staged.bundle.roots == (old_root, new_root)
    assert staged.certificate == old_root
    (await staged.issue(WORKLOAD, public)).leaf.verify_directly_issued_by(old_root)
    with pytest.raises(CaDirectoryError, match="already under way"):
        await rotate_root(ca_dir)
    with pytest.raises(CaDirectoryError, match="activate it"):
        finish_root_rotation(ca_dir)

    # Step 2: the new root signs; both generations verify against the bundle.
    assert activate_root(ca_dir) == new_root
    assert not (ca_dir.path / CA_KEY).exists()  # the retired root's key is gone
    during = ca_dir.authority()
    new_svid = await during.issue(WORKLOAD, public)
    new_svid.leaf.verify_directly_issued_by(new_root)
    assert verify_as_peer(old_svid.chain_der(), during.bundle) == WORKLOAD
    assert verify_as_peer(new_svid.chain_der(), during.bundle) == WORKLOAD

    # Step 3: the old root leaves the bundle, and its SVIDs with it.
    assert finish_root_rotation(ca_dir) == [old_root]
    after = ca_dir.authority()
    assert after.bundle.roots == (new_root,)
    assert verify_as_peer(new_svid.chain_der(), after.bundle) == WORKLOAD
    with pytest.raises(PeerVerificationError):
        verify_as_peer(old_svid.chain_der(), after.bundle)


def test_signing_works_from_a_fresh_event_loop() -> None:
    # The CLI signs with asyncio.run; nothing may stay bound to an earlier loop.
    first = asyncio.run(root_ca())
    again = asyncio.run(first.issue(WORKLOAD, ec.generate_private_key(ec.SECP256R1()).public_key()))
    assert again.leaf.issuer == first.certificate.subject
