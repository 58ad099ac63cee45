from __future__ import annotations

import base64
import datetime
import json

import pytest
from cryptography.hazmat.primitives import serialization

from identity.pki import CertAuthority, utc_now
from meshlet.identity.bundle import TrustBundle, TrustBundleError, TrustBundleSet
from meshlet.identity.spiffe import SpiffeIdError


@pytest.fixture(scope="module")
def old_root() -> CertAuthority:
    return CertAuthority.root("old root", trust_domain="cluster.local")


@pytest.fixture(scope="module")
def new_root() -> CertAuthority:
    return CertAuthority.root("new root", trust_domain="cluster.local")


def test_from_pem_holds_every_root_once(old_root: CertAuthority, new_root: CertAuthority) -> None:
    bundle = TrustBundle.from_pem("cluster.local", old_root.pem + new_root.pem + old_root.pem)
    assert bundle.trust_domain == "cluster.local"
    assert bundle.roots == (old_root.cert, new_root.cert)
    assert bundle.contains(new_root.cert)
    assert TrustBundle.from_pem("cluster.local", bundle.to_pem()) == bundle


def test_trust_domain_may_be_given_as_its_id(old_root: CertAuthority) -> None:
    assert TrustBundle.from_pem("spiffe://cluster.local", old_root.pem).trust_domain == "cluster.local"


def test_rotation_steps(old_root: CertAuthority, new_root: CertAuthority) -> None:
    bundle = TrustBundle.from_pem("cluster.local", old_root.pem)
    overlapping = bundle.with_root(new_root.cert)
    assert overlapping.roots == (old_root.cert, new_root.cert)
    rotated = overlapping.without_root(old_root.cert)
    assert rotated.roots == (new_root.cert,)
    with pytest.raises(TrustBundleError, match="no root certificates"):
        rotated.without_root(new_root.cert)


def test_without_expired() -> None:
    now = utc_now()
    expired = CertAuthority.root(
        "expired root",
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )
    live = CertAuthority.root("live root")
    bundle = TrustBundle.of("td", [expired.cert, live.cert])
    assert bundle.without_expired(now).roots == (live.cert,)


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        (b"", "not PEM certificates"),
        (b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "not PEM certificates"),
        (b"x" * ((1 << 20) + 1), "larger than"),
    ],
)
def test_from_pem_rejects_garbage(pem: bytes, reason: str) -> None:
    with pytest.raises(TrustBundleError, match=reason):
        TrustBundle.from_pem("td", pem)


def test_leaf_is_not_a_root(old_root: CertAuthority) -> None:
    leaf = old_root.issue_svid("spiffe://cluster.local/x")
    with pytest.raises(TrustBundleError, match="is not a CA"):
        TrustBundle.from_pem("cluster.local", leaf.pem)


def test_bad_trust_domain(old_root: CertAuthority) -> None:
    with pytest.raises(SpiffeIdError, match="lower-case"):
        TrustBundle.from_pem("Cluster.Local", old_root.pem)


def _jwks(*certs_der: bytes, extra: list[dict[str, object]] | None = None) -> str:
    keys: list[dict[str, object]] = [
        {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [base64.b64encode(der).decode()]}
        for der in certs_der
    ]
    return json.dumps({"spiffe_sequence": 1, "keys": keys + (extra or [])})


def test_from_spiffe_json(old_root: CertAuthority, new_root: CertAuthority) -> None:
    jwt_key = {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"}
    document = _jwks(old_root.der, new_root.der, extra=[jwt_key])
    bundle = TrustBundle.from_spiffe_json("cluster.local", document)
    assert bundle.roots == (old_root.cert, new_root.cert)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ("{", "not JSON"),
        ("[]", "no 'keys' array"),
        ('{"keys": [1]}', r"keys\[0\] is not an object"),
        ('{"keys": [{"use": "enc"}]}', "unsupported 'use'"),
        ('{"keys": [{"use": "x509-svid", "x5c": []}]}', "exactly one certificate"),
        ('{"keys": [{"use": "x509-svid", "x5c": ["!!"]}]}', "not a base64 DER certificate"),
        ('{"keys": [{"use": "x509-svid", "x5c": ["AAAA"]}]}', "not a base64 DER certificate"),
        ('{"keys": []}', "no root certificates"),
    ],
)
def test_from_spiffe_json_rejects_bad_documents(document: str, reason: str) -> None:
    with pytest.raises(TrustBundleError, match=reason):
        TrustBundle.from_spiffe_json("td", document)


def test_bundle_set_by_trust_domain(old_root: CertAuthority) -> None:
    partner = CertAuthority.root("partner root", trust_domain="partner.org")
    local = TrustBundle.from_pem("cluster.local", old_root.pem)
    federated = TrustBundle.from_pem("partner.org", partner.pem)
    bundles = TrustBundleSet.of([local, federated])
    assert bundles.trust_domains == ("cluster.local", "partner.org")
    assert bundles.roots_for("cluster.local") == (old_root.cert,)
    assert bundles.roots_for("partner.org") == (partner.cert,)
    assert bundles.roots_for("unknown.org") == ()
    assert bundles.bundle_for("unknown.org") is None
    assert "partner.org" in bundles and len(bundles) == 2
    assert bundles.without("partner.org").trust_domains == ("cluster.local",)


def test_bundle_set_replaces_whole_bundles(old_root: CertAuthority, new_root: CertAuthority) -> None:
    before = TrustBundleSet.of([TrustBundle.from_pem("cluster.local", old_root.pem)])
    after = before.with_bundle(TrustBundle.from_pem("cluster.local", new_root.pem))
    assert after.roots_for("cluster.local") == (new_root.cert,)
    assert before.roots_for("cluster.local") == (old_root.cert,)  # the old set is untouched


def test_bundle_set_refuses_duplicates_and_misfiling(old_root: CertAuthority) -> None:
    bundle = TrustBundle.from_pem("cluster.local", old_root.pem)
    with pytest.raises(TrustBundleError, match="two trust bundles"):
        TrustBundleSet.of([bundle, bundle])
    with pytest.raises(TrustBundleError, match="filed under"):
        TrustBundleSet({"other.org": bundle})


def test_bundle_set_is_read_only(old_root: CertAuthority) -> None:
    source = {"cluster.local": TrustBundle.from_pem("cluster.local", old_root.pem)}
    bundles = TrustBundleSet(source)
    source.clear()
    assert bundles.trust_domains == ("cluster.local",)
    with pytest.raises(TypeError):
        bundles.bundles["x"] = bundles.bundles["cluster.local"]  # type: ignore[index]


def test_der_roundtrip_of_roots(old_root: CertAuthority) -> None:
    bundle = TrustBundle.from_pem("cluster.local", old_root.pem)
    assert bundle.roots[0].public_bytes(serialization.Encoding.DER) == old_root.der
