"""Test PKI: a CA plus server and client certificates, written to a tmp dir.

Usage::

    from certs import make_pki  # tests/ is on sys.path (rootdir conftest)
    pki = make_pki(tmp_path)
    pki.ca_cert, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key  # Paths
    extra = pki.issue("other", dns=["other.local"], uris=["spiffe://mesh.local/ns/x/sa/y"])
    extra.cert, extra.key  # Paths; extra.cert_pem / extra.key_pem are the bytes

The server certificate carries DNS SANs ``localhost`` and ``server.mesh.local``,
IP SAN 127.0.0.1 and URI SAN ``spiffe://mesh.local/ns/default/sa/server``; the
client certificate carries DNS ``client.mesh.local`` and URI
``spiffe://mesh.local/ns/default/sa/client``. Keys are ECDSA P-256 (fast).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "mesh.local"
SERVER_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/server"
CLIENT_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/client"


@dataclass(frozen=True)
class Issued:
    """One issued certificate and its key, as files and as PEM bytes."""

    name: str
    cert: Path
    key: Path
    cert_pem: bytes
    key_pem: bytes


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Pki:
    directory: Path
    ca_cert: Path
    ca_key_obj: ec.EllipticCurvePrivateKey
    ca_obj: x509.Certificate
    server: Issued = field(init=False)
    client: Issued = field(init=False)

    # Flat paths, the common case.
    @property
    def server_cert(self) -> Path:
        return self.server.cert

    @property
    def server_key(self) -> Path:
        return self.server.key

    @property
    def client_cert(self) -> Path:
        return self.client.cert

    @property
    def client_key(self) -> Path:
        return self.client.key

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.read_bytes()

    def issue(
        self,
        name: str,
        *,
        dns: list[str] | None = None,
        uris: list[str] | None = None,
        ips: list[str] | None = None,
        server: bool = True,
        client: bool = True,
        days: int = 30,
    ) -> Issued:
        """Issue a leaf certificate signed by this CA, written as ``<name>.pem`` / ``<name>-key.pem``."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
        sans += [x509.UniformResourceIdentifier(u) for u in uris or []]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_obj.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key_obj.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key_obj, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _pem_key(key)
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}-key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
        return Issued(name, cert_path, key_path, cert_pem, key_pem)


def _make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_pki(directory: Path, *, ca_name: str = "meshlet test CA") -> Pki:
    """A fresh CA with a server and a client certificate, under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_obj = _make_ca(ca_name)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_obj.public_bytes(serialization.Encoding.PEM))
    pki = Pki(directory, ca_path, ca_key, ca_obj)
    pki.server = pki.issue(
        "server", dns=["localhost", "server.mesh.local"], uris=[SERVER_SPIFFE_ID], ips=["127.0.0.1"]
    )
    pki.client = pki.issue("client", dns=["client.mesh.local"], uris=[CLIENT_SPIFFE_ID])
    return pki
