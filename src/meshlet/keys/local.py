"""``meshlet.local``: the key in this process, signed with ``cryptography``.

The baseline the other providers are measured against. Settings::

    private_key: {filename: PATH} | {inline_string: PEM} | {environment_variable: NAME}
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError
from meshlet.keys.base import KeyProvider, Settings
from meshlet.tls.crypto import sign

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_SOURCES = ("filename", "inline_string", "environment_variable")


def read_private_key(settings: Settings, name: str = "private_key") -> SigningKey:
    """The PEM private key named by an Envoy-style data source under ``name``."""
    source = settings.struct(name)
    given = [s for s in _SOURCES if s in source.values]
    if len(given) != 1:
        raise ConfigError(source.path, f"needs exactly one of {', '.join(_SOURCES)}")
    kind = given[0]
    value = source.string(kind)
    if kind == "filename":
        try:
            with open(value, "rb") as f:
                pem = f.read(1 << 20)
        except OSError as exc:
            raise ConfigError(source.field_path(kind), f"cannot read {value}: {exc.strerror}") from None
    elif kind == "environment_variable":
        env = os.environ.get(value)
        if env is None:
            raise ConfigError(source.field_path(kind), f"environment variable {value} is not set")
        pem = env.encode()
    else:
        pem = value.encode()
    return load_signing_key(pem, source.field_path(kind))


def load_signing_key(pem: bytes, path: str) -> SigningKey:
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(path, "encrypted private keys are not supported") from None
    except ValueError:
        raise ConfigError(path, "not a valid PEM private key") from None
    if not isinstance(key, SigningKey):
        kind = type(key).__name__
        raise ConfigError(path, f"unsupported private key type {kind} (RSA, P-256, P-384, Ed25519)")
    return key


class LocalKeyProvider(KeyProvider):
    provider_name = "meshlet.local"

    def __init__(self, private_key: SigningKey) -> None:
        super().__init__(private_key.public_key())
        self._private = private_key

    async def _sign(self, scheme: int, data: bytes) -> bytes:
        return sign(self._private, scheme, data)


def build_local(config: PrivateKeyProviderConfig) -> LocalKeyProvider:
    settings = Settings(config.settings, LocalKeyProvider.provider_name)
    settings.only("private_key")
    key = read_private_key(settings)
    try:
        return LocalKeyProvider(key)
    except ValueError as exc:
        raise ConfigError(settings.field_path("private_key"), str(exc)) from None
