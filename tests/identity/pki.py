"""Test helper: SPIFFE PKIs built in memory (roots, intermediates, X.509-SVIDs).

Usage::

    from identity.pki import CertAuthority  # tests/ is on sys.path

    root = CertAuthority.root("cluster.local")
    inter = root.intermediate("cluster.local intermediate")
    leaf = inter.issue_svid("spiffe://cluster.local/ns/default/sa/web")
    leaf.der, leaf.pem, leaf.key_pem          # the leaf
    leaf.chain_der                              # (leaf, intermediate) DER, what a peer sends
    root.pem                                    # the trust anchor

``issue_svid`` / ``issue`` take keyword overrides to make the broken
certificates verification tests need: validity window, EKUs (or none), extra
URI/DNS SANs, ``ca=True`` leaves, a different signature key. Keys are ECDSA
P-256 (fast to generate).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
BOTH_AUTH = (SERVER_AUTH, CLIENT_AUTH)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def key_usage(**flags: bool) -> x509.KeyUsage:
    """A KeyUsage with only ``flags`` set, e.g. ``key_usage(digital_signature=True)``."""
    names = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )  # fmt: skip
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class Issued:
    """A certificate, its key, and the intermediates between it and its root (nearest first)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        """What a TLS peer sends: the leaf then its intermediates."""
        return (self.der, *(c.public_bytes(serialization.Encoding.DER) for c in self.intermediates))

    @property
    def chain_pem(self) -> bytes:
        return self.pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.intermediates)

    @property
    def intermediates_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.intermediates)

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``<name>.pem`` (the leaf only) and ``<name>-key.pem``; returns both paths."""
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_path.write_bytes(self.pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


@dataclass(frozen=True)
class CertAuthority:
    """A CA (root or intermediate) that can issue intermediates and leaves.

    ``path`` holds the intermediates from this CA up to (not including) the
    root, nearest first: empty for a root, ``(self.cert, ...)`` otherwise.
    """

    issued: Issued
    path: tuple[x509.Certificate, ...] = ()

    @property
    def cert(self) -> x509.Certificate:
        return self.issued.cert

    @property
    def pem(self) -> bytes:
        return self.issued.pem

    @property
    def der(self) -> bytes:
        return self.issued.der

    @classmethod
    def root(
        cls,
        common_name: str = "meshlet test root",
        *,
        trust_domain: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> CertAuthority:
        """A self-signed root. With ``trust_domain`` it carries the SPIFFE trust
        domain ID as URI SAN, as SPIRE and the SPIFFE spec suggest for CAs."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = utc_now()
        builder = _base_builder(
            _name(common_name),
            _name(common_name),
            key,
            key,
            not_before or now - datetime.timedelta(hours=1),
            not_after or now + datetime.timedelta(days=365),
        )
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(_key_usage(ca=True), critical=True)
        if trust_domain is not None:
            uri = x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")
            builder = builder.add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        return cls(Issued(builder.sign(key, hashes.SHA256()), key))

    def intermediate(
        self,
        common_name: str = "meshlet test intermediate",
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        ekus: Sequence[x509.ObjectIdentifier] | None = None,
    ) -> CertAuthority:
        """An intermediate CA under this one; ``ekus`` restricts its extended key usage."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = utc_now()
        builder = _base_builder(
            _name(common_name),
            self.cert.subject,
            key,
            self.issued.key,
            not_before or now - datetime.timedelta(hours=1),
            not_after or now + datetime.timedelta(days=180),
        )
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(_key_usage(ca=True), critical=True)
        if ekus is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        cert = builder.sign(self.issued.key, hashes.SHA256())
        return CertAuthority(Issued(cert, key, self.path), (cert, *self.path))

    def issue(
        self,
        *,
        uris: Sequence[str] = (),
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        emails: Sequence[str] = (),
        ekus: Sequence[x509.ObjectIdentifier] | None = BOTH_AUTH,
        ca: bool = False,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        common_name: str = "",
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        usage: x509.KeyUsage | None = None,
        omit_key_usage: bool = False,
    ) -> Issued:
        """A leaf signed by this CA. ``ekus=None`` leaves the EKU extension out;
        ``ca=True`` makes a CA certificate presented as a leaf; ``signing_key``
        signs with another key than this CA's (a forged signature); ``usage``
        replaces the key usage (see ``key_usage``), ``omit_key_usage`` drops it."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = utc_now()
        builder = _base_builder(
            _name(common_name or (uris[0] if uris else dns[0] if dns else "leaf")),
            self.cert.subject,
            key,
            self.issued.key,
            not_before or now - datetime.timedelta(hours=1),
            not_after or now + datetime.timedelta(days=1),
        )
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if not omit_key_usage:
            builder = builder.add_extension(usage or _key_usage(ca=ca), critical=True)
        if ekus is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.RFC822Name(e) for e in emails]
        if sans:
            # An SVID with only URI SANs and an empty subject marks the SAN critical
            # (RFC 5280 §4.2.1.6); here the subject always has a CN, so non-critical.
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(signing_key or self.issued.key, hashes.SHA256())
        return Issued(cert, key, self.path)

    def issue_svid(self, spiffe_id: str, *, extra_uris: Sequence[str] = (), **overrides: Any) -> Issued:
        """An X.509-SVID for ``spiffe_id`` (one URI SAN, clientAuth + serverAuth);
        ``overrides`` are ``issue``'s keywords."""
        return self.issue(uris=(spiffe_id, *extra_uris), **overrides)


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
