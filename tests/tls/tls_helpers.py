"""Certificates and in-memory connection pairs for the TLS engine's tests."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from meshlet.tls.connection import TlsConnection
from meshlet.tls.events import Event, SignatureRequired
from meshlet.tls.keys_local import LocalKey


def self_signed(
    key: CertificateIssuerPrivateKeyTypes, name: str = "localhost", *, days: int = 1
) -> tuple[tuple[bytes, ...], bytes]:
    """(DER chain, PEM certificate) of a self-signed certificate for ``name``."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, algorithm)  # type: ignore[arg-type]
    )
    return (cert.public_bytes(serialization.Encoding.DER),), cert.public_bytes(serialization.Encoding.PEM)


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pump(
    client: TlsConnection, server: TlsConnection, keys: Sequence[LocalKey], *, rounds: int = 12
) -> list[tuple[str, Event]]:
    """Shuttle bytes both ways, signing whenever asked; returns (side, event)."""
    seen: list[tuple[str, Event]] = []
    for _ in range(rounds):
        moved = False
        for sender, receiver, side in ((client, server, "server"), (server, client, "client")):
            data = sender.data_to_send()
            if not data:
                continue
            moved = True
            events = receiver.receive_data(data)
            while events:
                follow: list[Event] = []
                for event in events:
                    seen.append((side, event))
                    if isinstance(event, SignatureRequired):
                        key = keys[0] if side == "server" else keys[-1]
                        follow += receiver.provide_signature(key.sign_now(event.scheme, event.data))
                events = follow
        if not moved:
            break
    return seen
