from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from identity.pki import BOTH_AUTH, CLIENT_AUTH, SERVER_AUTH, CertAuthority, Issued, key_usage, utc_now
from meshlet.config.model import CertificateValidation, SanMatcher, SanType, StringMatcher, StringMatchKind
from meshlet.errors import ConfigError
from meshlet.identity.bundle import TrustBundle, TrustBundleSet
from meshlet.identity.spiffe import SpiffeId, SpiffeIdMatcher
from meshlet.tls.alerts import AlertDescription, TlsAlertError
from meshlet.tls.verify import (
    PeerPolicy,
    PeerRole,
    PeerVerificationError,
    VerifiedPeer,
    check_san_matchers,
    dns_name_matches,
    verify_peer,
)

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/default/sa/web"


@pytest.fixture(scope="module")
def root() -> CertAuthority:
    return CertAuthority.root("cluster.local root", trust_domain=TD)


@pytest.fixture(scope="module")
def inter(root: CertAuthority) -> CertAuthority:
    return root.intermediate("cluster.local intermediate")


@pytest.fixture(scope="module")
def partner() -> CertAuthority:
    return CertAuthority.root("partner.org root", trust_domain="partner.org")


@pytest.fixture(scope="module")
def bundles(root: CertAuthority, partner: CertAuthority) -> TrustBundleSet:
    return TrustBundleSet.of(
        [TrustBundle.from_pem(TD, root.pem), TrustBundle.from_pem("partner.org", partner.pem)]
    )


def client_policy(bundles: TrustBundleSet, **kwargs: object) -> PeerPolicy:
    return PeerPolicy(role=PeerRole.CLIENT, bundles=bundles, **kwargs)  # type: ignore[arg-type]


def refused(
    chain: Issued | tuple[bytes, ...], policy: PeerPolicy, now: datetime.datetime | None = None
) -> PeerVerificationError:
    chain_der = chain.chain_der if isinstance(chain, Issued) else chain
    with pytest.raises(PeerVerificationError) as err:
        verify_peer(chain_der, policy, now or utc_now())
    return err.value


def string_matcher(kind: StringMatchKind, value: str, *, ignore_case: bool = False) -> StringMatcher:
    predicates: dict[StringMatchKind, Callable[[str, str], bool]] = {
        StringMatchKind.EXACT: lambda s, v: s == v,
        StringMatchKind.PREFIX: str.startswith,
        StringMatchKind.SUFFIX: str.endswith,
        StringMatchKind.CONTAINS: lambda s, v: v in s,
    }
    test = predicates[kind]
    wanted = value.lower() if ignore_case else value

    def match(text: str) -> bool:
        return test(text.lower() if ignore_case else text, wanted)

    return StringMatcher(kind, value, ignore_case, match)


# --------------------------------------------------------------------------- #
# Accepted chains
# --------------------------------------------------------------------------- #


def test_svid_through_intermediate(
    inter: CertAuthority, root: CertAuthority, bundles: TrustBundleSet
) -> None:
    leaf = inter.issue_svid(WEB)
    peer = verify_peer(leaf.chain_der, client_policy(bundles), utc_now())
    assert isinstance(peer, VerifiedPeer)
    assert peer.spiffe_id == SpiffeId.parse(WEB)
    assert peer.uri_sans == (WEB,)
    assert peer.dns_sans == ()
    assert peer.chain == (leaf.cert, inter.cert, root.cert)
    assert peer.leaf == leaf.cert


def test_svid_server_without_dns_san(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    """An SVID has only a URI SAN; as a server peer it still needs serverAuth, not a DNS name."""
    leaf = inter.issue_svid(WEB, ekus=[SERVER_AUTH])
    peer = verify_peer(leaf.chain_der, PeerPolicy(role=PeerRole.SERVER, bundles=bundles), utc_now())
    assert str(peer.spiffe_id) == WEB


def test_no_eku_allows_any_purpose(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = inter.issue_svid(WEB, ekus=None)
    for role in PeerRole:
        assert verify_peer(leaf.chain_der, PeerPolicy(role=role, bundles=bundles), utc_now()).spiffe_id


def test_naive_now_is_utc(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = inter.issue_svid(WEB)
    naive = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert verify_peer(leaf.chain_der, client_policy(bundles), naive).spiffe_id


def test_overlapping_roots_during_rotation(root: CertAuthority) -> None:
    new_root = CertAuthority.root("cluster.local root 2", trust_domain=TD)
    bundle = TrustBundle.from_pem(TD, root.pem).with_root(new_root.cert)
    policy = client_policy(TrustBundleSet.of([bundle]))
    for ca in (root, new_root):
        assert verify_peer(ca.issue_svid(WEB).chain_der, policy, utc_now()).chain[-1] == ca.cert


def test_federated_trust_domain(partner: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = partner.issue_svid("spiffe://partner.org/billing")
    peer = verify_peer(leaf.chain_der, client_policy(bundles), utc_now())
    assert peer.chain[-1] == partner.cert


def test_trusted_roots_for_dns_peers(root: CertAuthority) -> None:
    leaf = root.issue(dns=["db.example.com"])
    policy = PeerPolicy(role=PeerRole.SERVER, trusted_roots=(root.cert,), server_name="db.example.com")
    peer = verify_peer(leaf.chain_der, policy, utc_now())
    assert peer.spiffe_id is None
    assert peer.dns_sans == ("db.example.com",)


def test_trusted_roots_vouch_for_svids_without_a_bundle(root: CertAuthority) -> None:
    """Envoy's flat trusted_ca, as Istio configures it."""
    leaf = root.issue_svid(WEB)
    peer = verify_peer(
        leaf.chain_der, PeerPolicy(role=PeerRole.CLIENT, trusted_roots=(root.cert,)), utc_now()
    )
    assert str(peer.spiffe_id) == WEB


# --------------------------------------------------------------------------- #
# Refused chains, and the alert each one gets
# --------------------------------------------------------------------------- #


def test_no_certificate(bundles: TrustBundleSet) -> None:
    err = refused((), client_policy(bundles))
    assert err.description is AlertDescription.certificate_required
    assert isinstance(err, TlsAlertError)


def test_garbage_der(bundles: TrustBundleSet) -> None:
    err = refused((b"\x30\x03\x02\x01\x01",), client_policy(bundles))
    assert err.alert == "bad_certificate"
    assert "[0] is not a valid DER" in err.message


def test_too_many_certificates(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = inter.issue_svid(WEB)
    err = refused(leaf.chain_der * 6, client_policy(bundles))
    assert err.alert == "bad_certificate"
    assert "12 certificates" in err.message


def test_expired_leaf(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    now = utc_now()
    leaf = inter.issue_svid(
        WEB, not_before=now - datetime.timedelta(days=2), not_after=now - datetime.timedelta(days=1)
    )
    err = refused(leaf, client_policy(bundles), now)
    assert err.description is AlertDescription.certificate_expired
    assert "expired at" in err.message


def test_not_yet_valid_leaf(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    now = utc_now()
    leaf = inter.issue_svid(WEB, not_before=now + datetime.timedelta(hours=1))
    err = refused(leaf, client_policy(bundles), now)
    assert err.alert == "certificate_expired"
    assert "not valid before" in err.message
    assert "check the clocks" in err.message


def test_expired_intermediate(root: CertAuthority, bundles: TrustBundleSet) -> None:
    now = utc_now()
    old = root.intermediate(
        "stale intermediate",
        not_before=now - datetime.timedelta(days=3),
        not_after=now - datetime.timedelta(days=1),
    )
    leaf = old.issue_svid(WEB)
    err = refused(leaf, client_policy(bundles), now)
    assert err.alert == "certificate_expired"
    assert "intermediate certificate (CN=stale intermediate) expired" in err.message


def test_unknown_ca(bundles: TrustBundleSet) -> None:
    stranger = CertAuthority.root("stranger root")
    err = refused(stranger.issue_svid(WEB), client_policy(bundles))
    assert err.alert == "unknown_ca"
    assert "does not chain to the trust bundle of 'cluster.local'" in err.message
    assert "CN=stranger root" in err.message


def test_missing_intermediate(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = inter.issue_svid(WEB)
    err = refused((leaf.der,), client_policy(bundles))
    assert err.alert == "unknown_ca"
    assert "0 intermediate(s) sent" in err.message


def test_forged_signature(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = inter.issue_svid(WEB, signing_key=ec.generate_private_key(ec.SECP256R1()))
    err = refused(leaf, client_policy(bundles))
    assert err.alert == "bad_certificate"
    assert "signature does not verify" in err.message


def test_trust_domain_without_bundle(root: CertAuthority, bundles: TrustBundleSet) -> None:
    """A cluster.local CA signing an ID of another trust domain must not be believed."""
    leaf = root.issue_svid("spiffe://evil.org/ns/default/sa/web")
    err = refused(leaf, client_policy(bundles))
    assert err.alert == "unknown_ca"
    assert "spiffe://evil.org/ns/default/sa/web" in err.message
    assert "trust domain 'evil.org' is not trusted (trust bundles: cluster.local, partner.org)" in err.message


def test_federated_root_cannot_vouch_for_local_ids(partner: CertAuthority, bundles: TrustBundleSet) -> None:
    err = refused(partner.issue_svid(WEB), client_policy(bundles))
    assert err.alert == "unknown_ca"
    assert "trust bundle of 'cluster.local'" in err.message


def test_local_root_cannot_vouch_for_federated_ids(root: CertAuthority, bundles: TrustBundleSet) -> None:
    err = refused(root.issue_svid("spiffe://partner.org/billing"), client_policy(bundles))
    assert err.alert == "unknown_ca"
    assert "trust bundle of 'partner.org'" in err.message


def test_two_uri_sans(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = inter.issue_svid(WEB, extra_uris=["https://example.com/"])
    err = refused(leaf, client_policy(bundles))
    assert err.alert == "bad_certificate"
    assert "exactly one URI SAN" in err.message and "https://example.com/" in err.message


def test_invalid_spiffe_uri(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = inter.issue_svid("spiffe://Cluster.Local/x")
    err = refused(leaf, client_policy(bundles))
    assert err.alert == "bad_certificate"
    assert "not a valid SPIFFE ID" in err.message


def test_ca_certificate_as_leaf(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    svid = inter.issue_svid(WEB, ca=True)
    err = refused(svid, client_policy(bundles))
    assert err.alert == "bad_certificate"
    assert "keyCertSign" in err.message
    # With an SVID's key usage, the basic constraints alone still refuse it.
    svid = inter.issue_svid(WEB, ca=True, usage=key_usage(digital_signature=True))
    assert "basicConstraints" in refused(svid, client_policy(bundles)).message
    dns_leaf = inter.issue(dns=["ca.example.com"], ca=True)
    err = refused(dns_leaf, PeerPolicy(role=PeerRole.CLIENT, trusted_roots=(inter.cert,)))
    assert err.alert == "bad_certificate"


def test_leaf_without_san(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = inter.issue(common_name="old-style")
    err = refused(leaf, PeerPolicy(role=PeerRole.CLIENT, trusted_roots=(inter.cert,)))
    assert err.alert == "bad_certificate"


@pytest.mark.parametrize(
    ("role", "ekus", "needs"),
    [(PeerRole.CLIENT, [SERVER_AUTH], "clientAuth"), (PeerRole.SERVER, [CLIENT_AUTH], "serverAuth")],
)
def test_wrong_eku(
    inter: CertAuthority, bundles: TrustBundleSet, role: PeerRole, ekus: list, needs: str
) -> None:
    leaf = inter.issue_svid(WEB, ekus=ekus)
    err = refused(leaf, PeerPolicy(role=role, bundles=bundles))
    assert err.alert == "unsupported_certificate"
    assert f"as a TLS {role.value} (needs {needs})" in err.message


def test_intermediate_restricted_to_other_purpose(root: CertAuthority, bundles: TrustBundleSet) -> None:
    servers_only = root.intermediate("servers-only intermediate", ekus=[SERVER_AUTH])
    leaf = servers_only.issue_svid(WEB, ekus=BOTH_AUTH)
    assert verify_peer(leaf.chain_der, PeerPolicy(role=PeerRole.SERVER, bundles=bundles), utc_now())
    err = refused(leaf, client_policy(bundles))
    assert err.alert == "unsupported_certificate"
    assert "CN=servers-only intermediate" in err.message


def test_chain_too_deep(root: CertAuthority, bundles: TrustBundleSet) -> None:
    ca = root
    for depth in range(4):
        ca = ca.intermediate(f"level {depth}")
    err = refused(ca.issue_svid(WEB), client_policy(bundles, max_chain_depth=2))
    assert err.alert == "unknown_ca"


# --------------------------------------------------------------------------- #
# Identity
# --------------------------------------------------------------------------- #


def test_spiffe_allow_list(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    policy = client_policy(bundles, spiffe_ids=SpiffeIdMatcher.of([f"spiffe://{TD}/ns/default/*"]))
    assert verify_peer(inter.issue_svid(WEB).chain_der, policy, utc_now())
    err = refused(inter.issue_svid(f"spiffe://{TD}/ns/prod/sa/db"), policy)
    assert err.alert == "access_denied"
    assert "presented SPIFFE ID spiffe://cluster.local/ns/prod/sa/db" in err.message
    assert "allowed: SPIFFE IDs spiffe://cluster.local/ns/default/*" in err.message


def test_require_spiffe(root: CertAuthority) -> None:
    leaf = root.issue(dns=["web.example.com"])
    err = refused(leaf, PeerPolicy(role=PeerRole.CLIENT, trusted_roots=(root.cert,), require_spiffe=True))
    assert err.alert == "access_denied"
    assert "no SPIFFE ID; DNS SANs web.example.com" in err.message


@pytest.mark.parametrize(
    ("sans", "server_name", "ok"),
    [
        (["api.example.com"], "api.example.com", True),
        (["API.Example.com"], "api.example.COM", True),
        (["*.example.com"], "api.example.com", True),
        (["*.example.com"], "a.b.example.com", False),
        (["*.example.com"], "example.com", False),
        (["other.example.com"], "api.example.com", False),
    ],
)
def test_server_name(root: CertAuthority, sans: list[str], server_name: str, ok: bool) -> None:
    leaf = root.issue(dns=sans)
    policy = PeerPolicy(role=PeerRole.SERVER, trusted_roots=(root.cert,), server_name=server_name)
    if ok:
        assert verify_peer(leaf.chain_der, policy, utc_now())
    else:
        err = refused(leaf, policy)
        assert err.alert == "access_denied"
        assert f"not valid for server name {server_name!r}" in err.message


def test_server_name_ip(root: CertAuthority) -> None:
    leaf = root.issue(dns=["localhost"], ips=["127.0.0.1", "::1"])
    for name, ok in (("127.0.0.1", True), ("::1", True), ("0:0::1", True), ("127.0.0.2", False)):
        policy = PeerPolicy(role=PeerRole.SERVER, trusted_roots=(root.cert,), server_name=name)
        if ok:
            assert verify_peer(leaf.chain_der, policy, utc_now())
        else:
            assert refused(leaf, policy).alert == "access_denied"


def test_svid_with_server_name_needs_dns_san(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    policy = PeerPolicy(role=PeerRole.SERVER, bundles=bundles, server_name="web.default.svc")
    err = refused(inter.issue_svid(WEB), policy)
    assert err.alert == "access_denied"


def test_dns_allow_list(root: CertAuthority) -> None:
    policy = PeerPolicy(role=PeerRole.CLIENT, trusted_roots=(root.cert,), dns_names=("a.example.com",))
    assert verify_peer(root.issue(dns=["*.example.com"]).chain_der, policy, utc_now())
    err = refused(root.issue(dns=["b.example.org"]), policy)
    assert err.alert == "access_denied"
    assert "allowed: DNS names a.example.com" in err.message


def test_allow_lists_are_alternatives(
    root: CertAuthority, inter: CertAuthority, bundles: TrustBundleSet
) -> None:
    policy = PeerPolicy(
        role=PeerRole.CLIENT,
        bundles=bundles,
        trusted_roots=(root.cert,),
        spiffe_ids=SpiffeIdMatcher.of([WEB]),
        san_matchers=(SanMatcher(SanType.DNS, string_matcher(StringMatchKind.SUFFIX, ".internal")),),
    )
    assert verify_peer(inter.issue_svid(WEB).chain_der, policy, utc_now())
    assert verify_peer(root.issue(dns=["db.internal"]).chain_der, policy, utc_now())
    err = refused(root.issue(dns=["db.external"]), policy)
    assert err.message.endswith(
        "allowed: SPIFFE IDs spiffe://cluster.local/ns/default/sa/web or DNS SAN suffix '.internal'"
    )


def test_from_validation(root: CertAuthority) -> None:
    validation = CertificateValidation(
        trusted_ca_pem=root.pem,
        san_matchers=(
            SanMatcher(SanType.URI, string_matcher(StringMatchKind.PREFIX, f"spiffe://{TD}/ns/default/")),
        ),
    )
    policy = PeerPolicy.from_validation(validation, role=PeerRole.CLIENT)
    assert policy.trusted_roots == (root.cert,)
    assert verify_peer(root.issue_svid(WEB).chain_der, policy, utc_now())
    assert refused(root.issue_svid(f"spiffe://{TD}/ns/prod/sa/x"), policy).alert == "access_denied"


def test_no_roots_for_non_spiffe_peer(root: CertAuthority, bundles: TrustBundleSet) -> None:
    err = refused(root.issue(dns=["x.example.com"]), client_policy(bundles))
    assert err.alert == "unknown_ca"
    assert "no SPIFFE ID" in err.message


# --------------------------------------------------------------------------- #
# Helpers for other transport sockets
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("presented", "reference", "ok"),
    [
        ("example.com", "example.com", True),
        ("example.com.", "EXAMPLE.com", True),
        ("*.example.com", "www.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.com", "example.com", False),
        ("w*.example.com", "www.example.com", False),
        ("*.*.example.com", "a.b.example.com", False),
        ("www.*.com", "www.example.com", False),
    ],
)
def test_dns_name_matches(presented: str, reference: str, ok: bool) -> None:
    assert dns_name_matches(presented, reference) is ok


def test_check_san_matchers(root: CertAuthority) -> None:
    leaf = root.issue(uris=[WEB], dns=["*.mesh.local"], ips=["10.0.0.1"], emails=["ops@example.com"])

    def check(san_type: SanType, kind: StringMatchKind, value: str, *, ignore_case: bool = False) -> bool:
        return check_san_matchers(
            leaf.der, [SanMatcher(san_type, string_matcher(kind, value, ignore_case=ignore_case))]
        )

    assert check(SanType.URI, StringMatchKind.EXACT, WEB)
    assert not check(SanType.URI, StringMatchKind.EXACT, WEB + "x")
    assert check(SanType.DNS, StringMatchKind.EXACT, "api.mesh.local")  # wildcard SAN, as Envoy does
    assert not check(SanType.DNS, StringMatchKind.EXACT, "a.b.mesh.local")
    assert check(SanType.DNS, StringMatchKind.PREFIX, "*.mesh")
    assert check(SanType.IP_ADDRESS, StringMatchKind.EXACT, "10.0.0.1")
    assert check(SanType.EMAIL, StringMatchKind.EXACT, "OPS@example.com", ignore_case=True)
    assert not check(SanType.EMAIL, StringMatchKind.EXACT, "OPS@example.com")
    assert not check(SanType.DNS, StringMatchKind.EXACT, WEB)  # type matters
    assert check_san_matchers(leaf.der, [])
    assert not check_san_matchers(
        b"not a certificate", [SanMatcher(SanType.URI, string_matcher(StringMatchKind.EXACT, WEB))]
    )


# --------------------------------------------------------------------------- #
# Interop: OpenSSL's verifier agrees on the same chains and anchors
# --------------------------------------------------------------------------- #
#
# Left out on purpose, because OpenSSL's verifier has no opinion there while
# the webpki profile and the SPIFFE X.509-SVID spec do: a CA certificate used
# as leaf, a leaf without subjectAltName, and two URI SANs (OpenSSL accepts
# all three).


@dataclass(frozen=True)
class InteropCase:
    name: str
    make: Callable[[CertAuthority, CertAuthority, datetime.datetime], Issued]
    role: PeerRole = PeerRole.CLIENT
    server_name: str | None = None
    alert: str | None = None  # None: both accept
    openssl_error: str = ""  # a fragment of `openssl verify`'s error line
    trust_partner_only: bool = False  # anchor on the partner root instead of the local one


def _days(n: int) -> datetime.timedelta:
    return datetime.timedelta(days=n)


INTEROP_CASES = [
    InteropCase("svid via intermediate", lambda root, inter, now: inter.issue_svid(WEB)),
    InteropCase(
        "svid as server",
        lambda root, inter, now: inter.issue_svid(WEB, ekus=[SERVER_AUTH]),
        role=PeerRole.SERVER,
    ),
    InteropCase("no EKU", lambda root, inter, now: inter.issue_svid(WEB, ekus=None)),
    InteropCase(
        "wildcard server name",
        lambda root, inter, now: inter.issue(dns=["*.example.com"], ekus=[SERVER_AUTH]),
        role=PeerRole.SERVER,
        server_name="api.example.com",
    ),
    InteropCase(
        "ip server name",
        lambda root, inter, now: inter.issue(ips=["127.0.0.1"], ekus=[SERVER_AUTH]),
        role=PeerRole.SERVER,
        server_name="127.0.0.1",
    ),
    InteropCase(
        "expired leaf",
        lambda root, inter, now: inter.issue_svid(WEB, not_before=now - _days(2), not_after=now - _days(1)),
        alert="certificate_expired",
        openssl_error="certificate has expired",
    ),
    InteropCase(
        "not yet valid leaf",
        lambda root, inter, now: inter.issue_svid(WEB, not_before=now + _days(1), not_after=now + _days(2)),
        alert="certificate_expired",
        openssl_error="certificate is not yet valid",
    ),
    InteropCase(
        "expired intermediate",
        lambda root, inter, now: root.intermediate(
            "stale", not_before=now - _days(3), not_after=now - _days(1)
        ).issue_svid(WEB),
        alert="certificate_expired",
        openssl_error="certificate has expired",
    ),
    InteropCase(
        "unknown CA",
        lambda root, inter, now: CertAuthority.root("stranger").issue_svid(WEB),
        alert="unknown_ca",
        openssl_error="unable to get local issuer certificate",
    ),
    InteropCase(
        "missing intermediate",
        lambda root, inter, now: Issued(inter.issue_svid(WEB).cert, inter.issued.key),
        alert="unknown_ca",
        openssl_error="unable to get local issuer certificate",
    ),
    InteropCase(
        "forged signature",
        lambda root, inter, now: inter.issue_svid(WEB, signing_key=ec.generate_private_key(ec.SECP256R1())),
        alert="bad_certificate",
        openssl_error="certificate signature failure",
    ),
    InteropCase(
        "server-only EKU as client",
        lambda root, inter, now: inter.issue_svid(WEB, ekus=[SERVER_AUTH]),
        alert="unsupported_certificate",
        openssl_error="certificate purpose",
    ),
    InteropCase(
        "client-only EKU as server",
        lambda root, inter, now: inter.issue_svid(WEB, ekus=[CLIENT_AUTH]),
        role=PeerRole.SERVER,
        alert="unsupported_certificate",
        openssl_error="certificate purpose",
    ),
    InteropCase(
        "intermediate restricted to serverAuth, client peer",
        lambda root, inter, now: root.intermediate("servers only", ekus=[SERVER_AUTH]).issue_svid(WEB),
        alert="unsupported_certificate",
        openssl_error="certificate purpose",
    ),
    InteropCase(
        "server name mismatch",
        lambda root, inter, now: inter.issue(dns=["*.example.com"], ekus=[SERVER_AUTH]),
        role=PeerRole.SERVER,
        server_name="a.b.example.com",
        alert="access_denied",
        openssl_error="hostname mismatch",
    ),
    InteropCase(
        "local ID under the partner bundle",
        lambda root, inter, now: inter.issue_svid(WEB),
        alert="unknown_ca",
        openssl_error="unable to get local issuer certificate",
        trust_partner_only=True,
    ),
]


def _openssl_verify(
    tmp_path: Path, anchor: CertAuthority, leaf: Issued, case: InteropCase, now: datetime.datetime
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "ca.pem").write_bytes(anchor.pem)
    (tmp_path / "untrusted.pem").write_bytes(leaf.intermediates_pem)
    (tmp_path / "leaf.pem").write_bytes(leaf.pem)
    purpose = "sslserver" if case.role is PeerRole.SERVER else "sslclient"
    args = ["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), "-purpose", purpose]
    args += ["-attime", str(int(now.timestamp()))]
    if leaf.intermediates:
        args += ["-untrusted", str(tmp_path / "untrusted.pem")]
    if case.server_name is not None:
        is_ip = case.server_name.replace(".", "").isdigit() or ":" in case.server_name
        args += ["-verify_ip" if is_ip else "-verify_hostname", case.server_name]
    return subprocess.run([*args, str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=10)


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("case", INTEROP_CASES, ids=lambda case: case.name)
def test_openssl_agrees(
    tmp_path: Path, root: CertAuthority, inter: CertAuthority, partner: CertAuthority, case: InteropCase
) -> None:
    now = utc_now()
    leaf = case.make(root, inter, now)
    anchor = partner if case.trust_partner_only else root
    domain = "partner.org" if case.trust_partner_only else TD
    policy = PeerPolicy(
        role=case.role,
        bundles=TrustBundleSet.of([TrustBundle.of(domain, [anchor.cert])]),
        trusted_roots=(anchor.cert,),
        server_name=case.server_name,
    )
    openssl = _openssl_verify(tmp_path, anchor, leaf, case, now)
    openssl_output = openssl.stdout + openssl.stderr
    if case.alert is None:
        assert verify_peer(leaf.chain_der, policy, now)
        assert openssl.returncode == 0, openssl_output
    else:
        assert refused(leaf, policy, now).alert == case.alert
        assert openssl.returncode != 0
        assert case.openssl_error in openssl_output


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(timeout=5)
    if process.stdin is not None:
        process.stdin.close()


def _start_s_server(tmp_path: Path, leaf: Issued) -> tuple[subprocess.Popen[bytes], int]:
    cert, key = leaf.write(tmp_path, "server")
    chain = tmp_path / "server-chain.pem"
    chain.write_bytes(leaf.intermediates_pem)
    log = tmp_path / "s_server.log"
    args = ["openssl", "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", "-tls1_3"]
    args += ["-cert", str(cert), "-key", str(key), "-cert_chain", str(chain)]
    with log.open("wb") as out:
        # stdin stays open: s_server stops serving when its stdin ends.
        server = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("ACCEPT"):
                return server, int(line.rsplit(":", 1)[1])
        time.sleep(0.02)
    _stop(server)
    raise AssertionError(f"openssl s_server did not start: {log.read_text()}")


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_chain_sent_by_openssl_over_tls(
    tmp_path: Path, inter: CertAuthority, bundles: TrustBundleSet
) -> None:
    """The chain OpenSSL's TLS server sends on the wire verifies as a SPIFFE server peer."""
    leaf = inter.issue_svid(WEB, ekus=[SERVER_AUTH])
    server, port = _start_s_server(tmp_path, leaf)
    try:
        client = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts", "-tls1_3"],
            input="",
            capture_output=True,
            text=True,
            timeout=10,
        )
    finally:
        _stop(server)
    sent = x509.load_pem_x509_certificates(client.stdout.encode())
    chain_der = tuple(cert.public_bytes(serialization.Encoding.DER) for cert in sent)
    assert chain_der == leaf.chain_der
    policy = PeerPolicy(role=PeerRole.SERVER, bundles=bundles, spiffe_ids=SpiffeIdMatcher.of([WEB]))
    assert str(policy.verify(chain_der, utc_now()).spiffe_id) == WEB


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize(("allowed", "accepted"), [(WEB, True), (f"spiffe://{TD}/ns/default/sa/db", False)])
def test_check_san_matchers_after_stdlib_handshake(
    tmp_path: Path, root: CertAuthority, inter: CertAuthority, allowed: str, accepted: bool
) -> None:
    """The stdlib-ssl transport's use: OpenSSL verified the chain, we check the SAN matchers."""
    server_leaf = root.issue(dns=["localhost"], ekus=[SERVER_AUTH])
    client_leaf = inter.issue_svid(WEB, ekus=[CLIENT_AUTH])
    server_cert, server_key = server_leaf.write(tmp_path, "server")
    client_cert, client_key = client_leaf.write(tmp_path, "client")
    (tmp_path / "client-chain.pem").write_bytes(client_leaf.intermediates_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(cadata=root.pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED
    matchers = [SanMatcher(SanType.URI, string_matcher(StringMatchKind.EXACT, allowed))]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        port = listener.getsockname()[1]
        args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-cert", str(client_cert)]
        args += ["-key", str(client_key), "-cert_chain", str(tmp_path / "client-chain.pem")]
        client = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            raw, _ = listener.accept()
            raw.settimeout(5)
            with context.wrap_socket(raw, server_side=True) as tls:
                leaf_der = tls.getpeercert(binary_form=True)
        finally:
            _stop(client)
    assert leaf_der == client_leaf.der
    assert check_san_matchers(leaf_der, matchers) is accepted


# --------------------------------------------------------------------------- #
# Hostile input: anything a peer sends ends in a verdict, never a crash
# --------------------------------------------------------------------------- #

_FUZZ_ROOT = CertAuthority.root("fuzz root", trust_domain=TD)
_FUZZ_INTER = _FUZZ_ROOT.intermediate("fuzz intermediate")
_FUZZ_LEAF = _FUZZ_INTER.issue(uris=[WEB], dns=["a.example.com"], ips=["10.1.2.3"], emails=["x@example.com"])
_FUZZ_POLICY = PeerPolicy(
    role=PeerRole.CLIENT,
    bundles=TrustBundleSet.of([TrustBundle.of(TD, [_FUZZ_ROOT.cert])]),
    trusted_roots=(_FUZZ_ROOT.cert,),
    spiffe_ids=SpiffeIdMatcher.of([WEB]),
    dns_names=("a.example.com",),
    server_name="a.example.com",
)


def _verdict(chain_der: tuple[bytes, ...]) -> str:
    try:
        verify_peer(chain_der, _FUZZ_POLICY, utc_now())
    except PeerVerificationError as err:
        return err.alert
    return "accepted"


def test_fuzz_baseline_is_accepted() -> None:
    assert _verdict(_FUZZ_LEAF.chain_der) == "accepted"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_certificates_never_crash(data: st.DataObject) -> None:
    chain = list(_FUZZ_LEAF.chain_der)
    index = data.draw(st.integers(0, len(chain) - 1))
    der = bytearray(chain[index])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(der) - 1))
        der[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        der = der[: data.draw(st.integers(0, len(der)))]
    chain[index] = bytes(der)
    assert _verdict(tuple(chain)) in {"accepted", *AlertDescription.__members__}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_random_bytes_never_crash(chain: list[bytes]) -> None:
    assert _verdict(tuple(chain)) != "accepted"


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"omit_key_usage": True}, "does not assert digitalSignature"),
        ({"usage": key_usage(key_encipherment=True)}, "does not assert digitalSignature"),
        ({"usage": key_usage(digital_signature=True, crl_sign=True)}, "asserts keyCertSign or cRLSign"),
        ({"usage": key_usage(digital_signature=True, key_cert_sign=True)}, "asserts keyCertSign or cRLSign"),
    ],
)
def test_svid_key_usage(
    inter: CertAuthority, bundles: TrustBundleSet, overrides: dict[str, object], problem: str
) -> None:
    leaf = inter.issue_svid(WEB, **overrides)
    err = refused(leaf, client_policy(bundles))
    assert err.alert == "bad_certificate"
    assert f"X.509-SVID for {WEB} {problem}" in err.message


def test_svid_key_usage_digital_signature_only(inter: CertAuthority, bundles: TrustBundleSet) -> None:
    leaf = inter.issue_svid(WEB, usage=key_usage(digital_signature=True))
    assert verify_peer(leaf.chain_der, client_policy(bundles), utc_now())


def test_from_validation_refuses_bad_pem() -> None:
    with pytest.raises(ConfigError, match="trusted_ca: not PEM certificates"):
        PeerPolicy.from_validation(CertificateValidation(trusted_ca_pem=b"garbage"), role=PeerRole.SERVER)


@pytest.mark.parametrize(
    ("kwargs", "reason"), [({"max_chain_depth": -1}, "negative"), ({"server_name": ""}, "empty")]
)
def test_policy_refuses_nonsense(kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        PeerPolicy(role=PeerRole.SERVER, **kwargs)  # type: ignore[arg-type]
