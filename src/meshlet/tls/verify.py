"""X.509 and SPIFFE peer verification, shared by meshlet's TLS engine and the
stdlib-``ssl`` transport sockets.

``verify_peer(chain_der, policy, now)`` takes the certificates a peer sent
(leaf first), builds a path to a trusted root with
``cryptography.x509.verification`` and then applies the SPIFFE X.509-SVID
rules and the identity allow-lists of a ``PeerPolicy``. Every failure is a
``PeerVerificationError``: a ``TlsAlertError`` carrying the RFC 8446 alert to
send and a message that says what was presented and what was expected.

Which roots verify a peer:

- an X.509-SVID (a leaf whose URI SAN is a ``spiffe://`` ID) is verified
  against the trust bundle of *its own* trust domain only, so a federated
  domain's root can never vouch for an ID of another domain;
- when the policy has no bundle for that trust domain, or the leaf carries no
  SPIFFE ID, the domain-agnostic ``trusted_roots`` are used (Envoy's
  ``validation_context.trusted_ca``: one flat set of roots, as Istio
  configures it).

Chain building always uses the *client* verifier of ``cryptography``:
its server verifier insists on matching a DNS name or IP address, and
X.509-SVIDs carry only a URI SAN. The extended key usage the client verifier
would enforce (clientAuth) is replaced by our own check of the purpose the
peer's role needs (clientAuth for clients, serverAuth for servers), and the
server name, when the policy has one, is matched against the DNS/IP SANs here
(RFC 6125 rules: a wildcard is only a whole left-most label).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from meshlet.config.model import CertificateValidation, SanMatcher, SanType, StringMatchKind
from meshlet.errors import ConfigError
from meshlet.identity.bundle import TrustBundleSet
from meshlet.identity.spiffe import SpiffeId, SpiffeIdError, SpiffeIdMatcher
from meshlet.tls.alerts import AlertDescription, TlsAlertError

# A peer sending more certificates than this is refused before any parsing
# work: real mesh chains are leaf + one or two intermediates.
MAX_PRESENTED_CERTIFICATES = 10
DEFAULT_MAX_CHAIN_DEPTH = 8


class PeerVerificationError(TlsAlertError):
    """The peer's certificate chain or identity was refused.

    ``description`` is the alert to send (``alert`` is its RFC 8446 name, as
    ``meshlet.proxy.transport.HandshakeError`` wants it).
    """

    def __init__(self, alert: AlertDescription | str, message: str) -> None:
        description = alert if isinstance(alert, AlertDescription) else AlertDescription[alert]
        super().__init__(description, message, local=True)

    @property
    def alert(self) -> str:
        return self.description.name


class PeerRole(StrEnum):
    """What the peer is to us; decides the extended key usage it needs."""

    CLIENT = "client"
    SERVER = "server"


_PURPOSE_OF_ROLE = {
    PeerRole.CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH,
    PeerRole.SERVER: ExtendedKeyUsageOID.SERVER_AUTH,
}


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """Whom to accept as peer.

    Trust: ``bundles`` (per trust domain, for SPIFFE IDs) and ``trusted_roots``
    (domain-agnostic). Identity: ``server_name``, when set, must match a DNS
    (or IP) SAN of the leaf. Then the allow-lists — ``spiffe_ids``,
    ``dns_names`` (names the peer's DNS SANs must cover, wildcards honoured)
    and ``san_matchers`` (Envoy's ``match_typed_subject_alt_names``) — are
    alternatives: the peer is accepted when it satisfies any configured one,
    and any verified peer is accepted when none is configured.
    ``require_spiffe`` refuses leaves that are not X.509-SVIDs.
    """

    role: PeerRole
    bundles: TrustBundleSet = field(default_factory=TrustBundleSet)
    trusted_roots: tuple[x509.Certificate, ...] = ()
    spiffe_ids: SpiffeIdMatcher | None = None
    dns_names: tuple[str, ...] = ()
    san_matchers: tuple[SanMatcher, ...] = ()
    server_name: str | None = None
    require_spiffe: bool = False
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    _trusted_store: Store | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.max_chain_depth < 0:
            raise ValueError(f"max_chain_depth must not be negative (got {self.max_chain_depth})")
        if self.server_name == "":
            raise ValueError("server_name is empty (use None to skip the server name check)")
        if self.trusted_roots:
            # Built once per policy: a Store is immutable and costs a copy of every root.
            object.__setattr__(self, "_trusted_store", Store(list(self.trusted_roots)))

    @classmethod
    def from_validation(
        cls,
        validation: CertificateValidation,
        *,
        role: PeerRole,
        server_name: str | None = None,
        bundles: TrustBundleSet | None = None,
    ) -> PeerPolicy:
        """The policy of an Envoy ``CertificateValidationContext`` (compiled):
        ``trusted_ca`` becomes ``trusted_roots``, SAN matchers carry over.
        ``accept_untrusted`` means "do not verify": callers skip ``verify_peer``.
        Raises ``ConfigError`` for a ``trusted_ca`` that is not PEM certificates."""
        roots: tuple[x509.Certificate, ...] = ()
        if validation.trusted_ca_pem:
            try:
                roots = tuple(x509.load_pem_x509_certificates(validation.trusted_ca_pem))
            except ValueError as err:
                raise ConfigError("trusted_ca", f"not PEM certificates ({err})") from None
        return cls(
            role=role,
            bundles=bundles if bundles is not None else TrustBundleSet(),
            trusted_roots=roots,
            san_matchers=validation.san_matchers,
            server_name=server_name,
        )

    def verify(self, chain_der: Sequence[bytes], now: datetime.datetime) -> VerifiedPeer:
        """``verify_peer`` under this policy; fits ``meshlet.tls.config.TlsConfig.verifier``."""
        return verify_peer(chain_der, self, now)

    @property
    def has_allow_list(self) -> bool:
        return self.spiffe_ids is not None or bool(self.dns_names) or bool(self.san_matchers)


@dataclass(frozen=True, slots=True)
class PeerSans:
    """The subject alternative names of a certificate, by type, as text."""

    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()

    @classmethod
    def of(cls, cert: x509.Certificate) -> PeerSans:
        """Raises ``ValueError`` when the SAN extension is malformed."""
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return cls()
        return cls(
            uris=tuple(names.get_values_for_type(x509.UniformResourceIdentifier)),
            dns=tuple(names.get_values_for_type(x509.DNSName)),
            ips=tuple(str(ip) for ip in names.get_values_for_type(x509.IPAddress)),
            emails=tuple(names.get_values_for_type(x509.RFC822Name)),
        )

    def of_type(self, san_type: SanType) -> tuple[str, ...]:
        if san_type is SanType.URI:
            return self.uris
        if san_type is SanType.DNS:
            return self.dns
        if san_type is SanType.IP_ADDRESS:
            return self.ips
        return self.emails


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """A peer whose chain and identity passed ``verify_peer``.

    ``chain`` is the verified path, leaf first, ending at the trusted root.
    """

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    spiffe_id: SpiffeId | None
    sans: PeerSans

    @property
    def uri_sans(self) -> tuple[str, ...]:
        return self.sans.uris

    @property
    def dns_sans(self) -> tuple[str, ...]:
        return self.sans.dns

    @property
    def ip_sans(self) -> tuple[str, ...]:
        return self.sans.ips

    @property
    def subject(self) -> str:
        return self.leaf.subject.rfc4514_string()


# --------------------------------------------------------------------------- #
# verify_peer
# --------------------------------------------------------------------------- #


def verify_peer(chain_der: Sequence[bytes], policy: PeerPolicy, now: datetime.datetime) -> VerifiedPeer:
    """Verify the certificates a peer sent (DER, leaf first) at time ``now``
    (naive values are taken as UTC). Raises ``PeerVerificationError``."""
    now = now if now.tzinfo is not None else now.replace(tzinfo=datetime.UTC)
    certs = _parse_chain(chain_der)
    leaf = certs[0]
    sans = _leaf_sans(leaf)
    spiffe_id = _svid_identity(sans)
    if spiffe_id is not None:
        _check_svid_key_usage(leaf, spiffe_id)
    store, trust_source = _trust_anchors(spiffe_id, policy)
    _check_validity_window(leaf, "peer certificate", now)
    path = _build_path(leaf, certs[1:], store, trust_source, policy, now)
    _check_purpose(leaf, policy.role)
    _check_identity(spiffe_id, sans, policy)
    return VerifiedPeer(leaf=leaf, chain=path, spiffe_id=spiffe_id, sans=sans)


def _parse_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    if not chain_der:
        # TLS 1.3 names this case: the peer answered a certificate request with nothing.
        raise PeerVerificationError(AlertDescription.certificate_required, "peer sent no certificate")
    if len(chain_der) > MAX_PRESENTED_CERTIFICATES:
        raise PeerVerificationError(
            AlertDescription.bad_certificate,
            f"peer sent {len(chain_der)} certificates (at most {MAX_PRESENTED_CERTIFICATES} are accepted)",
        )
    certs = []
    for index, der in enumerate(chain_der):
        try:
            cert = x509.load_der_x509_certificate(der)
            # Parsed lazily by cryptography: touch every part now, so that a malformed
            # name or extension is refused here, with its index, and not deep inside.
            _ = cert.subject, cert.issuer, cert.extensions
            certs.append(cert)
        except Exception as err:
            # Not only ValueError: for DER it cannot represent cryptography also
            # raises TypeError (a commonName encoded as a BIT STRING) and
            # InvalidVersion; whatever a peer sends must end in an alert.
            # The Certificate message itself decoded (the engine checked its framing);
            # a certificate inside that does not parse is "corrupt": bad_certificate.
            raise PeerVerificationError(
                AlertDescription.bad_certificate,
                f"peer certificate [{index}] is not a valid DER X.509 certificate ({err})",
            ) from None
    return certs


def _leaf_sans(leaf: x509.Certificate) -> PeerSans:
    try:
        return PeerSans.of(leaf)
    except ValueError as err:
        raise PeerVerificationError(
            AlertDescription.bad_certificate, f"peer certificate has a malformed subjectAltName ({err})"
        ) from None


def _svid_identity(sans: PeerSans) -> SpiffeId | None:
    """The SPIFFE ID of an X.509-SVID leaf; None when the leaf is not an SVID."""
    spiffe_uris = [uri for uri in sans.uris if uri[:7].lower() == "spiffe:"]
    if not spiffe_uris:
        return None
    if len(sans.uris) != 1:
        listed = ", ".join(sans.uris)
        raise PeerVerificationError(
            AlertDescription.bad_certificate,
            f"an X.509-SVID carries exactly one URI SAN; the peer's has {len(sans.uris)}: {listed}",
        )
    try:
        return SpiffeId.parse(spiffe_uris[0])
    except SpiffeIdError as err:
        raise PeerVerificationError(
            AlertDescription.bad_certificate, f"peer's URI SAN is not a valid SPIFFE ID: {err}"
        ) from None


def _check_svid_key_usage(leaf: x509.Certificate, spiffe_id: SpiffeId) -> None:
    """X.509-SVID spec §4.3 (as go-spiffe enforces it): a leaf SVID asserts
    digitalSignature and neither keyCertSign nor cRLSign."""
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    problem = ""
    if usage is None or not usage.digital_signature:
        problem = "does not assert digitalSignature key usage"
    elif usage.key_cert_sign or usage.crl_sign:
        problem = "asserts keyCertSign or cRLSign key usage, which only CA certificates may"
    if problem:
        raise PeerVerificationError(AlertDescription.bad_certificate, f"X.509-SVID for {spiffe_id} {problem}")


def _trust_anchors(spiffe_id: SpiffeId | None, policy: PeerPolicy) -> tuple[Store, str]:
    """The store to verify against and how to name it in messages."""
    if spiffe_id is not None:
        bundle = policy.bundles.bundle_for(spiffe_id.trust_domain)
        if bundle is not None:
            return bundle.store, f"the trust bundle of {spiffe_id.trust_domain!r}"
    if policy._trusted_store is not None:
        return policy._trusted_store, "the trusted CA roots"
    if spiffe_id is None:
        raise PeerVerificationError(
            AlertDescription.unknown_ca,
            "peer certificate has no SPIFFE ID and no trusted CA roots are configured for non-SPIFFE peers",
        )
    known = ", ".join(policy.bundles.trust_domains) or "none"
    raise PeerVerificationError(
        AlertDescription.unknown_ca,
        f"peer presented {spiffe_id}, but trust domain {spiffe_id.trust_domain!r} is not trusted"
        f" (trust bundles: {known})",
    )


def _check_validity_window(cert: x509.Certificate, what: str, now: datetime.datetime) -> None:
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        raise PeerVerificationError(
            AlertDescription.certificate_expired,
            f"{what} ({cert.subject.rfc4514_string()}) is not valid before {not_before.isoformat()}"
            f" (now {now.isoformat(timespec='seconds')}; check the clocks)",
        )
    if now > not_after:
        raise PeerVerificationError(
            AlertDescription.certificate_expired,
            f"{what} ({cert.subject.rfc4514_string()}) expired at {not_after.isoformat()}"
            f" (now {now.isoformat(timespec='seconds')})",
        )


# --------------------------------------------------------------------------- #
# Path building and its failures
# --------------------------------------------------------------------------- #

_EKU_MARKER = "meshlet-eku:"


def _ca_purpose_validator(purpose: x509.ObjectIdentifier) -> ExtensionPolicy:
    """The webpki CA policy, except that a CA's EKU, when present, must allow
    ``purpose`` (what OpenSSL checks too) rather than the client verifier's clientAuth."""

    def check(policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
        if eku is not None and purpose not in eku:
            raise ValueError(f"{_EKU_MARKER}{cert.subject.rfc4514_string()}")

    return ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, check
    )


# The leaf's EKU is checked after path building (``_check_purpose``), for a clearer message.
_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None
)
_CA_POLICY_OF_ROLE = {role: _ca_purpose_validator(purpose) for role, purpose in _PURPOSE_OF_ROLE.items()}


def _build_path(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    store: Store,
    trust_source: str,
    policy: PeerPolicy,
    now: datetime.datetime,
) -> tuple[x509.Certificate, ...]:
    verifier = (
        PolicyBuilder()
        .store(store)
        .time(now)
        .max_chain_depth(policy.max_chain_depth)
        .extension_policies(ca_policy=_CA_POLICY_OF_ROLE[policy.role], ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        return tuple(verifier.verify(leaf, intermediates).chain)
    except VerificationError as err:
        raise _classify_path_failure(str(err), leaf, intermediates, trust_source, policy, now) from None
    except Exception as err:  # see _parse_chain: hostile certificates raise all sorts
        raise PeerVerificationError(
            AlertDescription.bad_certificate, f"peer certificate chain cannot be processed ({err})"
        ) from None


def _classify_path_failure(
    reason: str,
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    trust_source: str,
    policy: PeerPolicy,
    now: datetime.datetime,
) -> PeerVerificationError:
    """Map ``cryptography``'s failure text to an alert (it has no error codes)."""
    issuer = leaf.issuer.rfc4514_string()
    if "not valid at validation time" in reason:
        for cert in intermediates:
            _check_validity_window(cert, "intermediate certificate", now)
        return PeerVerificationError(
            AlertDescription.certificate_expired,
            f"a certificate on the path to {trust_source} is expired or not yet valid",
        )
    if _EKU_MARKER in reason:
        ca = reason.split(_EKU_MARKER, 1)[1].split(" (encountered", 1)[0].rstrip(")")
        return PeerVerificationError(
            AlertDescription.unsupported_certificate,
            f"CA certificate {ca} restricts its extended key usage and does not allow"
            f" {_purpose_name(_PURPOSE_OF_ROLE[policy.role])}",
        )
    if "signature does not match" in reason:
        return PeerVerificationError(
            AlertDescription.bad_certificate,
            f"peer certificate's signature does not verify with the key of its issuer ({issuer})"
            f" in {trust_source}: forged, or issued by another CA of the same name",
        )
    if "exceeds max depth" in reason:
        return PeerVerificationError(
            AlertDescription.unknown_ca,
            f"no path to {trust_source} within {policy.max_chain_depth} intermediates",
        )
    if "candidates exhausted" in reason:
        return PeerVerificationError(
            AlertDescription.unknown_ca,
            f"peer certificate (issuer {issuer}) does not chain to {trust_source}"
            f" ({len(intermediates)} intermediate(s) sent)",
        )
    return PeerVerificationError(AlertDescription.bad_certificate, f"peer certificate refused: {reason}")


_EKU_NAMES = {
    value: name.lower()
    for name, value in vars(ExtendedKeyUsageOID).items()
    if isinstance(value, x509.ObjectIdentifier)
}
_EKU_NAMES |= {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}


def _purpose_name(oid: x509.ObjectIdentifier) -> str:
    return _EKU_NAMES.get(oid, oid.dotted_string)


def _check_purpose(leaf: x509.Certificate, role: PeerRole) -> None:
    """RFC 5280 §4.2.1.12: without EKU any purpose is fine; with one, it must list ours."""
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    purpose = _PURPOSE_OF_ROLE[role]
    if purpose not in eku:
        listed = ", ".join(_purpose_name(oid) for oid in eku) or "nothing"
        raise PeerVerificationError(
            AlertDescription.unsupported_certificate,
            f"peer certificate's extended key usage ({listed}) does not allow use as a TLS {role.value}"
            f" (needs {_purpose_name(purpose)})",
        )


# --------------------------------------------------------------------------- #
# Identity
# --------------------------------------------------------------------------- #
#
# A chain that verifies but names someone we do not want is refused with
# access_denied: RFC 8446 §6.2 defines it as "a valid certificate ... was
# received, but when access control was applied, the sender decided not to
# proceed", which is exactly this case. certificate_unknown ("some other
# (unspecified) issue") would hide that the certificate itself was fine.


def _check_identity(spiffe_id: SpiffeId | None, sans: PeerSans, policy: PeerPolicy) -> None:
    presented = _describe_presented(spiffe_id, sans)
    if policy.require_spiffe and spiffe_id is None:
        raise PeerVerificationError(
            AlertDescription.access_denied, f"a SPIFFE ID is required; the peer presented {presented}"
        )
    if policy.server_name is not None and not _server_name_matches(policy.server_name, sans):
        raise PeerVerificationError(
            AlertDescription.access_denied,
            f"peer certificate is not valid for server name {policy.server_name!r}; it presented {presented}",
        )
    if policy.has_allow_list and not _allowed(spiffe_id, sans, policy):
        raise PeerVerificationError(
            AlertDescription.access_denied,
            f"peer presented {presented}; allowed: {_describe_allowed(policy)}",
        )


def _allowed(spiffe_id: SpiffeId | None, sans: PeerSans, policy: PeerPolicy) -> bool:
    if policy.spiffe_ids is not None and spiffe_id is not None and policy.spiffe_ids.matches(spiffe_id):
        return True
    if any(dns_name_matches(san, name) for name in policy.dns_names for san in sans.dns):
        return True
    return san_matchers_match(sans, policy.san_matchers)


def _describe_presented(spiffe_id: SpiffeId | None, sans: PeerSans) -> str:
    parts = [f"SPIFFE ID {spiffe_id}"] if spiffe_id is not None else ["no SPIFFE ID"]
    other_uris = [u for u in sans.uris if spiffe_id is None or u != str(spiffe_id)]
    for label, values in (("URI", other_uris), ("DNS", sans.dns), ("IP", sans.ips), ("email", sans.emails)):
        if values:
            parts.append(f"{label} SANs {', '.join(values)}")
    return "; ".join(parts)


def _describe_allowed(policy: PeerPolicy) -> str:
    parts = []
    if policy.spiffe_ids is not None:
        parts.append(f"SPIFFE IDs {policy.spiffe_ids.describe()}")
    if policy.dns_names:
        parts.append(f"DNS names {', '.join(policy.dns_names)}")
    for matcher in policy.san_matchers:
        m = matcher.matcher
        case = " (ignoring case)" if m.ignore_case else ""
        parts.append(f"{matcher.san_type.value} SAN {m.kind.value} {m.value!r}{case}")
    return " or ".join(parts)


def _server_name_matches(server_name: str, sans: PeerSans) -> bool:
    try:
        address = ipaddress.ip_address(server_name)
    except ValueError:
        return any(dns_name_matches(san, server_name) for san in sans.dns)
    return any(ipaddress.ip_address(ip) == address for ip in sans.ips)


def dns_name_matches(presented: str, reference: str) -> bool:
    """RFC 6125 §6.4: does the certificate's DNS SAN ``presented`` cover the
    host ``reference``? Case-insensitive; ``*`` only as the whole left-most
    label of a name with at least three labels, matching exactly one label."""
    presented = presented.lower().rstrip(".")
    reference = reference.lower().rstrip(".")
    if not presented.startswith("*."):
        return "*" not in presented and presented == reference
    suffix = presented[1:]  # ".example.com"
    if "*" in suffix or suffix.count(".") < 2:
        return False
    head, dot, _ = reference.partition(".")
    return bool(head) and bool(dot) and reference[len(head) :] == suffix


# --------------------------------------------------------------------------- #
# SAN matchers (Envoy's match_typed_subject_alt_names)
# --------------------------------------------------------------------------- #


def san_matchers_match(sans: PeerSans, san_matchers: Sequence[SanMatcher]) -> bool:
    """Whether any matcher matches any SAN of its type. As in Envoy, an exact
    DNS matcher is compared with wildcard semantics when the SAN is a wildcard."""
    for san_matcher in san_matchers:
        matcher = san_matcher.matcher
        exact_dns = san_matcher.san_type is SanType.DNS and matcher.kind is StringMatchKind.EXACT
        for san in sans.of_type(san_matcher.san_type):
            if exact_dns and san.startswith("*."):
                if dns_name_matches(san, matcher.value):
                    return True
            elif matcher.match(san):
                return True
    return False


def check_san_matchers(leaf_der: bytes, san_matchers: Sequence[SanMatcher]) -> bool:
    """For transport sockets that verify the chain elsewhere (stdlib ``ssl``):
    does the leaf satisfy ``san_matchers``? True when there are none; False
    for a leaf that does not parse."""
    if not san_matchers:
        return True
    try:
        sans = PeerSans.of(x509.load_der_x509_certificate(leaf_der))
    except Exception:  # any parse failure (see _parse_chain) means "does not match"
        return False
    return san_matchers_match(sans, san_matchers)
