"""Cipher suites, key-exchange groups and signature schemes, mapped onto
``cryptography``. The engine owns the protocol; every primitive is here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from meshlet.tls.alerts import AlertDescription, TlsAlertError, illegal_parameter

# --------------------------------------------------------------------------- #
# Cipher suites
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class CipherSuite:
    code: int
    name: str
    hash_factory: Callable[[], hashes.HashAlgorithm]
    key_length: int
    aead_factory: Callable[[bytes], AESGCM | ChaCha20Poly1305]
    # Built once: the key schedule asks for the hash some twenty times a handshake.
    hash: hashes.HashAlgorithm = field(init=False, compare=False, repr=False)
    hash_length: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        algorithm = self.hash_factory()
        object.__setattr__(self, "hash", algorithm)
        object.__setattr__(self, "hash_length", algorithm.digest_size)


TLS_AES_128_GCM_SHA256 = CipherSuite(0x1301, "TLS_AES_128_GCM_SHA256", hashes.SHA256, 16, AESGCM)
TLS_AES_256_GCM_SHA384 = CipherSuite(0x1302, "TLS_AES_256_GCM_SHA384", hashes.SHA384, 32, AESGCM)
TLS_CHACHA20_POLY1305_SHA256 = CipherSuite(
    0x1303, "TLS_CHACHA20_POLY1305_SHA256", hashes.SHA256, 32, ChaCha20Poly1305
)
CIPHER_SUITES = {
    s.code: s for s in (TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256)
}
SUITES_BY_NAME = {s.name: s for s in CIPHER_SUITES.values()}
IV_LENGTH = 12
TAG_LENGTH = 16

# --------------------------------------------------------------------------- #
# Key exchange groups
# --------------------------------------------------------------------------- #


class Group(IntEnum):
    secp256r1 = 0x0017
    secp384r1 = 0x0018
    x25519 = 0x001D


GROUPS_BY_NAME = {"X25519": Group.x25519, "P-256": Group.secp256r1, "P-384": Group.secp384r1}
_CURVES: dict[int, ec.EllipticCurve] = {Group.secp256r1: ec.SECP256R1(), Group.secp384r1: ec.SECP384R1()}
_CURVE_ORDER: dict[int, int] = {
    Group.secp256r1: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    Group.secp384r1: int(
        "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973", 16
    ),
}
_POINT_LENGTH: dict[int, int] = {Group.secp256r1: 65, Group.secp384r1: 97, Group.x25519: 32}


class KeyExchange:
    """One ephemeral key pair; the private value comes from the injected
    randomness so that traces are reproducible."""

    __slots__ = ("_private", "group", "public_bytes")

    def __init__(self, group: int, random: Callable[[int], bytes]) -> None:
        self.group = group
        if group == Group.x25519:
            key = x25519.X25519PrivateKey.from_private_bytes(random(32))
            self._private: x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey = key
            self.public_bytes = key.public_key().public_bytes_raw()
        elif group in _CURVES:
            order = _CURVE_ORDER[group]
            scalar = int.from_bytes(random(64), "big") % (order - 1) + 1
            ec_key = ec.derive_private_key(scalar, _CURVES[group])
            self._private = ec_key
            self.public_bytes = ec_key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        else:
            raise ValueError(f"unsupported group {group:#06x}")

    def exchange(self, peer: bytes) -> bytes:
        """The shared secret; a malformed peer share is illegal_parameter."""
        if len(peer) != _POINT_LENGTH[self.group]:
            raise illegal_parameter(f"key share of {len(peer)} bytes for group {self.group:#06x}")
        try:
            if isinstance(self._private, x25519.X25519PrivateKey):
                shared = self._private.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
            else:
                if peer[0] != 4:
                    raise illegal_parameter("EC key share is not an uncompressed point")
                point = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[self.group], peer)
                shared = self._private.exchange(ec.ECDH(), point)
        except ValueError as exc:
            # Invalid point, or an all-zero X25519 result (small-order point).
            raise illegal_parameter(f"bad key share: {exc}") from None
        return shared


# --------------------------------------------------------------------------- #
# Signature schemes
# --------------------------------------------------------------------------- #


class SignatureScheme(IntEnum):
    rsa_pkcs1_sha256 = 0x0401
    rsa_pkcs1_sha384 = 0x0501
    rsa_pkcs1_sha512 = 0x0601
    ecdsa_secp256r1_sha256 = 0x0403
    ecdsa_secp384r1_sha384 = 0x0503
    rsa_pss_rsae_sha256 = 0x0804
    rsa_pss_rsae_sha384 = 0x0805
    rsa_pss_rsae_sha512 = 0x0806
    ed25519 = 0x0807


# Schemes allowed in CertificateVerify (RSA PKCS#1 v1.5 only in certificates).
HANDSHAKE_SCHEMES = (
    SignatureScheme.ecdsa_secp256r1_sha256,
    SignatureScheme.ecdsa_secp384r1_sha384,
    SignatureScheme.ed25519,
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
)
CERTIFICATE_SCHEMES = (
    *HANDSHAKE_SCHEMES,
    SignatureScheme.rsa_pkcs1_sha256,
    SignatureScheme.rsa_pkcs1_sha384,
    SignatureScheme.rsa_pkcs1_sha512,
)

_PSS_HASH: dict[int, Callable[[], hashes.HashAlgorithm]] = {
    SignatureScheme.rsa_pss_rsae_sha256: hashes.SHA256,
    SignatureScheme.rsa_pss_rsae_sha384: hashes.SHA384,
    SignatureScheme.rsa_pss_rsae_sha512: hashes.SHA512,
}
_ECDSA: dict[int, tuple[type[ec.EllipticCurve], Callable[[], hashes.HashAlgorithm]]] = {
    SignatureScheme.ecdsa_secp256r1_sha256: (ec.SECP256R1, hashes.SHA256),
    SignatureScheme.ecdsa_secp384r1_sha384: (ec.SECP384R1, hashes.SHA384),
}


def schemes_for_key(public_key: CertificatePublicKeyTypes) -> tuple[int, ...]:
    """The CertificateVerify schemes a key of this type can produce."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return tuple(_PSS_HASH)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return tuple(s for s, (curve, _) in _ECDSA.items() if isinstance(public_key.curve, curve))
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return (SignatureScheme.ed25519,)
    return ()


def sign(private_key: PrivateKeyTypes, scheme: int, data: bytes) -> bytes:
    """Sign ``data`` with an in-process key (used by the local key handle)."""
    if scheme in _PSS_HASH and isinstance(private_key, rsa.RSAPrivateKey):
        hash_alg = _PSS_HASH[scheme]()
        pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
        return private_key.sign(data, pss, hash_alg)
    if scheme in _ECDSA and isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(data, ec.ECDSA(_ECDSA[scheme][1]()))
    if scheme == SignatureScheme.ed25519 and isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    raise ValueError(f"key {type(private_key).__name__} cannot sign with scheme {scheme:#06x}")


def verify(public_key: CertificatePublicKeyTypes, scheme: int, signature: bytes, data: bytes) -> None:
    """Check a CertificateVerify signature; decrypt_error when it is wrong."""
    if scheme not in schemes_for_key(public_key):
        raise illegal_parameter(f"signature scheme {scheme:#06x} does not match the certificate key")
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            hash_alg = _PSS_HASH[scheme]()
            pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
            public_key.verify(signature, data, pss, hash_alg)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(_ECDSA[scheme][1]()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
    except InvalidSignature:
        raise TlsAlertError(
            AlertDescription.decrypt_error, "CertificateVerify signature is invalid"
        ) from None


def signed_content(transcript_hash: bytes, *, server: bool) -> bytes:
    """What CertificateVerify signs (RFC 8446 section 4.4.3)."""
    context = b"TLS 1.3, server CertificateVerify" if server else b"TLS 1.3, client CertificateVerify"
    return b" " * 64 + context + b"\x00" + transcript_hash
