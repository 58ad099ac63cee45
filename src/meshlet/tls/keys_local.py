"""The in-process key handle: the private key lives in this process.

Other providers (offload, batch, key server, PKCS#11) implement the same
``KeyHandle`` shape in ``meshlet.keys``."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes

from meshlet.tls.crypto import schemes_for_key, sign


class LocalKey:
    __slots__ = ("_private", "_public", "_schemes")

    def __init__(self, private_key: PrivateKeyTypes) -> None:
        if not isinstance(
            private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise ValueError(f"unsupported private key type {type(private_key).__name__}")
        self._private = private_key
        self._public: CertificatePublicKeyTypes = private_key.public_key()
        self._schemes = schemes_for_key(self._public)
        if not self._schemes:
            raise ValueError("no TLS 1.3 signature scheme for this key (unsupported curve?)")

    @classmethod
    def from_pem(cls, pem: bytes, password: bytes | None = None) -> LocalKey:
        return cls(serialization.load_pem_private_key(pem, password))

    @property
    def public_key(self) -> CertificatePublicKeyTypes:
        return self._public

    @property
    def schemes(self) -> Sequence[int]:
        return self._schemes

    def sign_now(self, scheme: int, data: bytes) -> bytes:
        return sign(self._private, scheme, data)

    async def sign(self, scheme: int, data: bytes) -> bytes:
        return sign(self._private, scheme, data)
