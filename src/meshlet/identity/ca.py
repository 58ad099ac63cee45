"""The mesh CA: a root, or an intermediate under a root the user brings
(Istio's "plug-in CA"), issuing X.509-SVIDs.

Every signature goes through a ``KeyHandle``, so the CA's key may live in any
key provider (in process, a key server, a PKCS#11 token). An SVID carries its
SPIFFE ID as the only URI SAN and an empty subject (so the SAN is critical,
RFC 5280 §4.2.1.6; nothing relies on the CN), key usage digitalSignature
(plus keyEncipherment for RSA keys), extended key usage serverAuth and
clientAuth, a default lifetime of 24 h, and starts ``backdate`` before now so
that peers whose clocks lag accept it at once. No certificate outlives the CA
certificate that signed it.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlet.errors import MeshletError
from meshlet.identity import der
from meshlet.identity.bundle import TrustBundle
from meshlet.identity.signing import builder_arguments, scheme_for, sign_with
from meshlet.identity.spiffe import SpiffeId
from meshlet.tls.config import KeyHandle

DEFAULT_SVID_TTL = datetime.timedelta(hours=24)
MAX_SVID_TTL = datetime.timedelta(days=90)
MIN_SVID_TTL = datetime.timedelta(seconds=1)
DEFAULT_ROOT_TTL = datetime.timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = datetime.timedelta(days=365)
DEFAULT_BACKDATE = datetime.timedelta(minutes=5)

Clock = Callable[[], float]


class CaError(MeshletError):
    """The CA refused or failed to issue a certificate; the message says why."""


def _now(clock: Clock) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock(), datetime.UTC).replace(microsecond=0)


def _serial() -> int:
    # 127 random bits: positive, and well inside RFC 5280's 20 octets.
    return secrets.randbits(127) | 1


def _key_id(public_key: CertificatePublicKeyTypes) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _ca_name(trust_domain: str, role: str, public_key: CertificatePublicKeyTypes) -> x509.Name:
    # A distinct name per key keeps path building unambiguous while an old and a
    # new root (or intermediate) are trusted side by side.
    tag = _key_id(public_key).digest[:4].hex()
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"meshlet {role} CA {tag}"),
    ])


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    )


def _leaf_key_usage(public_key: CertificatePublicKeyTypes) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False,
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )


async def sign_certificate(builder: x509.CertificateBuilder, signer: KeyHandle) -> x509.Certificate:
    """``builder`` (complete but for the signature) signed by ``signer``."""
    scheme = scheme_for(signer.public_key, list(signer.schemes))
    stand_in, algorithm, rsa_padding = builder_arguments(scheme)
    template = builder.sign(stand_in, algorithm, rsa_padding=rsa_padding)
    tbs = template.tbs_certificate_bytes
    signature = await sign_with(signer, scheme, tbs)
    encoded = der.signed(tbs, der.signature_algorithm(template.public_bytes(serialization.Encoding.DER)),
                         signature)
    return x509.load_der_x509_certificate(encoded)


def _validity(
    builder: x509.CertificateBuilder, now: datetime.datetime, ttl: datetime.timedelta,
    backdate: datetime.timedelta, cap: datetime.datetime | None,
) -> x509.CertificateBuilder:
    not_after = now + ttl
    if cap is not None and not_after > cap:
        not_after = cap
    return builder.not_valid_before(now - backdate).not_valid_after(not_after)


async def create_root(
    trust_domain: str,
    key: KeyHandle,
    *,
    ttl: datetime.timedelta = DEFAULT_ROOT_TTL,
    clock: Clock = time.time,
) -> x509.Certificate:
    """A self-signed root CA certificate for ``trust_domain`` over ``key``."""
    name = _ca_name(trust_domain, "root", key.public_key)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name)
    builder = _validity(builder.serial_number(_serial()).public_key(key.public_key), _now(clock), ttl,
                        DEFAULT_BACKDATE, None)
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_key_id(key.public_key), critical=False)
    )
    return await sign_certificate(builder, key)


async def create_intermediate(
    trust_domain: str,
    public_key: CertificatePublicKeyTypes,
    parent: x509.Certificate,
    parent_key: KeyHandle,
    *,
    ttl: datetime.timedelta = DEFAULT_INTERMEDIATE_TTL,
    clock: Clock = time.time,
) -> x509.Certificate:
    """An intermediate CA for ``trust_domain`` over ``public_key``, signed by
    ``parent`` (the user's root, or another intermediate). It may sign only
    leaves (pathLenConstraint 0)."""
    _check_signs_for(parent, parent_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_ca_name(trust_domain, "intermediate", public_key))
        .issuer_name(parent.subject)
        .serial_number(_serial())
        .public_key(public_key)
    )
    builder = _validity(builder, _now(clock), ttl, DEFAULT_BACKDATE, parent.not_valid_after_utc)
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_key_id(public_key), critical=False)
        .add_extension(_authority_key_id(parent), critical=False)
    )
    return await sign_certificate(builder, parent_key)


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _check_signs_for(cert: x509.Certificate, key: KeyHandle) -> None:
    if _spki(cert.public_key()) != _spki(key.public_key):
        raise CaError(f"the CA key does not match the CA certificate {cert.subject.rfc4514_string()!r}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        subject = cert.subject.rfc4514_string()
        raise CaError(f"{subject!r} is not a CA certificate (basicConstraints cA is not set)")


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """An SVID and the certificates that lead from it to a root (root excluded)."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.leaf, *self.intermediates)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in self.chain)


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    default_ttl: datetime.timedelta = DEFAULT_SVID_TTL
    max_ttl: datetime.timedelta = MAX_SVID_TTL
    backdate: datetime.timedelta = DEFAULT_BACKDATE


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """Signs SVIDs of ``trust_domain`` with ``certificate`` / ``key``.

    ``intermediates`` lead from ``certificate`` to a root of ``bundle``
    (empty when ``certificate`` is itself a root); ``bundle`` is what peers
    trust, and may hold more roots than the one this CA chains to (during a
    root rotation)."""

    trust_domain: str
    certificate: x509.Certificate
    key: KeyHandle
    bundle: TrustBundle
    intermediates: tuple[x509.Certificate, ...] = ()
    policy: IssuancePolicy = field(default_factory=IssuancePolicy)
    clock: Clock = time.time

    def __post_init__(self) -> None:
        _check_signs_for(self.certificate, self.key)
        if self.bundle.trust_domain != self.trust_domain:
            raise CaError(f"trust bundle is for {self.bundle.trust_domain!r}, not {self.trust_domain!r}")

    @property
    def is_root(self) -> bool:
        return self.bundle.contains(self.certificate)

    @property
    def signing_chain(self) -> tuple[x509.Certificate, ...]:
        """The CA certificates an SVID carries after its leaf (roots excluded)."""
        own = () if self.is_root else (self.certificate,)
        above = (c for c in self.intermediates if c != self.certificate and not self.bundle.contains(c))
        return (*own, *above)

    def ttl_of(self, requested: datetime.timedelta | None) -> datetime.timedelta:
        ttl = self.policy.default_ttl if requested is None else requested
        if ttl < MIN_SVID_TTL:
            raise CaError(f"requested lifetime {ttl.total_seconds():g} s is below the minimum of 1 s")
        if ttl > self.policy.max_ttl:
            raise CaError(
                f"requested lifetime {ttl.total_seconds():g} s exceeds the CA's maximum of"
                f" {self.policy.max_ttl.total_seconds():g} s"
            )
        return ttl

    async def issue(
        self,
        spiffe_id: SpiffeId,
        public_key: CertificatePublicKeyTypes,
        *,
        ttl: datetime.timedelta | None = None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> IssuedCertificate:
        """An X.509-SVID for ``spiffe_id`` over ``public_key``. DNS and IP SANs
        are for servers that clients reach by name (e.g. the CA service itself)."""
        if not spiffe_id.member_of(self.trust_domain):
            raise CaError(
                f"{spiffe_id} is not in trust domain {self.trust_domain!r}; this CA signs only for it"
            )
        if not spiffe_id.path:
            raise CaError(f"{spiffe_id} is a trust domain ID; an SVID needs a workload path")
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        sans += [x509.DNSName(name) for name in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.certificate.subject)
            .serial_number(_serial())
            .public_key(public_key)
        )
        builder = _validity(builder, _now(self.clock), self.ttl_of(ttl), self.policy.backdate,
                            self.certificate.not_valid_after_utc)
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(public_key), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(_key_id(public_key), critical=False)
            .add_extension(_authority_key_id(self.certificate), critical=False)
        )
        leaf = await sign_certificate(builder, self.key)
        return IssuedCertificate(leaf, self.signing_chain)
