"""The key server's key store: PEM files in a 0700 directory, loaded at start.

Keys are addressed by name (the "handle" proxies hold). Nothing here returns
private key bytes: callers get signatures and public keys only.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from meshlet.keys.local import SigningKey
from meshlet.tls.crypto import schemes_for_key, sign

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SUFFIX = ".key.pem"

KEY_TYPES: dict[str, Callable[[], SigningKey]] = {
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
    "rsa3072": lambda: rsa.generate_private_key(65537, 3072),
    "rsa4096": lambda: rsa.generate_private_key(65537, 4096),
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


class KeyStoreError(ValueError):
    pass


class UnknownKey(KeyStoreError):
    pass


class KeyExists(KeyStoreError):
    pass


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise KeyStoreError(f"bad key name {name!r}: 1-64 of A-Z a-z 0-9 _ . - (not starting with . _ -)")
    return name


def spki_der(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class KeyStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys: dict[str, SigningKey] = {}
        self._prepare_directory()
        self._load()

    def _prepare_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self.directory.stat()
        if info.st_uid != os.geteuid():
            raise KeyStoreError(f"key directory {self.directory} is not owned by this user")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(self.directory, 0o700)

    def _load(self) -> None:
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise KeyStoreError(f"{path}: not a usable PEM private key ({exc})") from None
            if not isinstance(key, SigningKey) or not schemes_for_key(key.public_key()):
                raise KeyStoreError(f"{path}: unsupported key type")
            self._keys[check_name(name)] = key

    def names(self) -> list[str]:
        return sorted(self._keys)

    def public_key(self, name: str) -> CertificatePublicKeyTypes:
        return self._key(name).public_key()

    def sign(self, name: str, scheme: int, data: bytes) -> bytes:
        return sign(self._key(name), scheme, data)

    def generate(self, key_type: str, name: str) -> CertificatePublicKeyTypes:
        make = KEY_TYPES.get(key_type)
        if make is None:
            raise KeyStoreError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})")
        self._reserve(name)
        return self._add(name, make())

    def import_pem(self, name: str, pem: bytes) -> CertificatePublicKeyTypes:
        self._reserve(name)
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except TypeError:
            raise KeyStoreError("encrypted private keys are not supported") from None
        except ValueError:
            raise KeyStoreError("not a valid PEM private key") from None
        if not isinstance(key, SigningKey) or not schemes_for_key(key.public_key()):
            raise KeyStoreError(f"unsupported key type {type(key).__name__} (RSA, P-256, P-384, Ed25519)")
        return self._add(name, key)

    def _key(self, name: str) -> SigningKey:
        key = self._keys.get(name)
        if key is None:
            raise UnknownKey(f"no key named {name!r}")
        return key

    def _reserve(self, name: str) -> None:
        check_name(name)
        if name in self._keys:
            raise KeyExists(f"a key named {name!r} already exists")

    def _add(self, name: str, key: SigningKey) -> CertificatePublicKeyTypes:
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = self.directory / f"{name}{SUFFIX}"
        # O_EXCL: never overwrite a key; 0600 from the start, not chmod after.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._keys[name] = key
        return key.public_key()
