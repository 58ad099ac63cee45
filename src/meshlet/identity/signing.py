"""Signing X.509 structures with a ``KeyHandle`` (a key that may live in a
key server or an HSM).

The signature algorithm follows the key: ECDSA P-256 with SHA-256, P-384 with
SHA-384, Ed25519, and RSA-PSS with SHA-256 (MGF1-SHA-256, 32-byte salt) —
the schemes every key provider implements, because they are TLS 1.3's.
``cryptography``'s builders need a private key in process, so they sign with
a stand-in key of the same family; only the algorithm identifier of that
result is kept (see ``meshlet.identity.der``).
"""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from meshlet.errors import MeshletError
from meshlet.tls.config import KeyHandle
from meshlet.tls.crypto import SignatureScheme

StandInKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
CertificateHash = hashes.SHA256 | hashes.SHA384


class SigningError(MeshletError):
    """A key cannot sign certificates (unsupported type) or its provider failed."""


def scheme_for(public_key: CertificatePublicKeyTypes, available: tuple[int, ...] | list[int]) -> int:
    """The one scheme used for certificates and CSRs made with this key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        wanted = {
            "secp256r1": SignatureScheme.ecdsa_secp256r1_sha256,
            "secp384r1": SignatureScheme.ecdsa_secp384r1_sha384,
        }.get(public_key.curve.name)
    elif isinstance(public_key, rsa.RSAPublicKey):
        wanted = SignatureScheme.rsa_pss_rsae_sha256
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        wanted = SignatureScheme.ed25519
    else:
        wanted = None
    if wanted is None or wanted not in available:
        raise SigningError(
            f"a {type(public_key).__name__} key cannot sign certificates here "
            "(supported: RSA with PSS-SHA256, ECDSA P-256, ECDSA P-384, Ed25519)"
        )
    return int(wanted)


def _hash_of(scheme: int) -> CertificateHash | None:
    if scheme in (SignatureScheme.ecdsa_secp256r1_sha256, SignatureScheme.rsa_pss_rsae_sha256):
        return hashes.SHA256()
    if scheme == SignatureScheme.ecdsa_secp384r1_sha384:
        return hashes.SHA384()
    return None  # Ed25519 hashes internally


def builder_arguments(scheme: int) -> tuple[StandInKey, CertificateHash | None, padding.PSS | None]:
    """What to pass to a ``cryptography`` builder's ``sign`` so that the result
    carries the algorithm identifier of ``scheme``."""
    algorithm = _hash_of(scheme)
    rsa_padding = None
    if scheme == SignatureScheme.rsa_pss_rsae_sha256:
        rsa_padding = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    return _stand_in_key(scheme), algorithm, rsa_padding


@functools.cache
def _stand_in_key(scheme: int) -> StandInKey:
    # Made once per process: its signatures are always thrown away.
    if scheme == SignatureScheme.rsa_pss_rsae_sha256:
        return rsa.generate_private_key(65537, 2048)
    if scheme == SignatureScheme.ed25519:
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


async def sign_with(key: KeyHandle, scheme: int, data: bytes) -> bytes:
    """``key.sign``, with provider failures named as signing failures."""
    try:
        return await key.sign(scheme, data)
    except Exception as exc:
        raise SigningError(f"the key provider could not sign: {exc}") from exc
