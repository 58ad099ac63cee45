"""``meshlet.pkcs11``: keys in a PKCS#11 token (SoftHSM2, a real HSM), via python-pkcs11.

The private key never leaves the token: we hold a session and an object
handle. TLS 1.3 needs RSA-PSS with MGF1 on the same hash and a salt as long as
the hash (CKM_RSA_PKCS_PSS over a digest we compute) and ECDSA in DER (the
token's CKM_ECDSA gives raw r||s over the digest; we DER-encode it). PKCS#11
calls block, so they run in worker threads, each with its own session (a
session must not be used by two threads at once). Settings::

    module: PATH                (default /usr/lib/softhsm/libsofthsm2.so)
    token_label: LABEL          (required)
    pin: PIN | pin_env: NAME    (one required)
    key_label: LABEL            (required)
    workers: 1..64              (default 2)
    max_in_flight: 1..65536     (default 64)
    sign_timeout: seconds       (default 5)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError
from meshlet.keys.base import (
    InFlightLimit,
    KeyProvider,
    KeyProviderError,
    KeyProviderUnavailable,
    ProviderUnavailable,
    Settings,
)
from meshlet.tls.crypto import SignatureScheme

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"

# TLS scheme -> hashlib name of the digest the token signs.
_SCHEME_HASH: dict[int, str] = {
    SignatureScheme.rsa_pss_rsae_sha256: "sha256",
    SignatureScheme.rsa_pss_rsae_sha384: "sha384",
    SignatureScheme.rsa_pss_rsae_sha512: "sha512",
    SignatureScheme.ecdsa_secp256r1_sha256: "sha256",
    SignatureScheme.ecdsa_secp384r1_sha384: "sha384",
}


# Every call into the PKCS#11 module goes through this lock. Concurrent
# C_OpenSession/C_Login/C_Sign from several threads failed (CKR_GENERAL_ERROR)
# and once crashed the interpreter with SoftHSM2 through python-pkcs11, so
# the worker threads take turns at the token; signing off the event loop is
# what they are for. Reentrant: public_key() opens a session through
# _private_key().
_MODULE_LOCK = threading.RLock()


class TokenKey:
    """A private key in a token, reached through one session per thread."""

    def __init__(self, token: Any, pin: str, key_label: str) -> None:
        self._token = token
        self._pin = pin
        self.key_label = key_label
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._lock = threading.Lock()

    def _private_key(self) -> Any:
        key = getattr(self._local, "key", None)
        if key is None:
            import pkcs11

            with _MODULE_LOCK:
                session = self._open_session()
                with self._lock:
                    self._sessions.append(session)
                key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=self.key_label)
            self._local.key = key
        return key

    def _open_session(self) -> Any:
        import pkcs11

        # Login is per application, not per session: once one session has
        # logged in, the others share it and a second C_Login is refused.
        # (So within one process the PIN is checked by the first login.)
        try:
            return self._token.open(user_pin=self._pin)
        except pkcs11.UserAlreadyLoggedIn:
            return self._token.open()

    def public_key(self) -> CertificatePublicKeyTypes:
        """From the token's public key object; for RSA, the private object's modulus will do."""
        with _MODULE_LOCK:
            return self._public_key_locked()

    def _public_key_locked(self) -> CertificatePublicKeyTypes:
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        private = self._private_key()
        session = private.session
        if private.key_type == KeyType.RSA:
            n = int.from_bytes(private[Attribute.MODULUS], "big")
            e = int.from_bytes(private[Attribute.PUBLIC_EXPONENT], "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if private.key_type == KeyType.EC:
            try:
                public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=self.key_label)
            except pkcs11.NoSuchKey:
                raise ValueError("an EC key needs its public key object in the token (same label)") from None
            key = serialization.load_der_public_key(encode_ec_public_key(public))
            assert isinstance(key, ec.EllipticCurvePublicKey)
            return key
        raise ValueError(f"unsupported token key type {private.key_type!r} (RSA and EC)")

    def sign(self, scheme: int, data: bytes) -> bytes:
        """Blocking: call from a worker thread."""
        from pkcs11 import MGF, Mechanism

        hash_name = _SCHEME_HASH.get(scheme)
        if hash_name is None:
            raise KeyProviderError(f"meshlet.pkcs11: scheme {scheme:#06x} is not supported")
        digest = hashlib.new(hash_name, data).digest()
        key = self._private_key()
        if scheme in (SignatureScheme.ecdsa_secp256r1_sha256, SignatureScheme.ecdsa_secp384r1_sha384):
            with _MODULE_LOCK:
                raw = key.sign(digest, mechanism=Mechanism.ECDSA)
            half = len(raw) // 2
            return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
        hash_mechanism, mgf = {
            "sha256": (Mechanism.SHA256, MGF.SHA256),
            "sha384": (Mechanism.SHA384, MGF.SHA384),
            "sha512": (Mechanism.SHA512, MGF.SHA512),
        }[hash_name]
        # TLS 1.3: salt length equals the hash length (RFC 8446 section 4.2.3).
        with _MODULE_LOCK:
            signature: bytes = key.sign(
                digest, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=(hash_mechanism, mgf, len(digest))
            )
        return signature

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            try:
                with _MODULE_LOCK:
                    session.close()
            except Exception:  # closing a dead session is not worth failing over
                pass


class Pkcs11KeyProvider(KeyProvider):
    provider_name = "meshlet.pkcs11"

    def __init__(
        self, key: TokenKey, *, workers: int = 2, max_in_flight: int = 64, sign_timeout: float = 5.0
    ) -> None:
        # The public key is read on a worker thread too: that thread's
        # session is then ready for the first signature.
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="meshlet-pkcs11")
        self._key = key
        try:
            public = self._executor.submit(key.public_key).result(timeout=sign_timeout)
        except BaseException:
            self._executor.submit(key.close)
            self._executor.shutdown(wait=True)
            raise
        super().__init__(public)
        self._limit = InFlightLimit(max_in_flight, sign_timeout)
        self._sign_timeout = sign_timeout

    async def _sign(self, scheme: int, data: bytes) -> bytes:
        await self._limit.acquire()
        try:
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(self._executor, self._key.sign, scheme, data)
            try:
                return await asyncio.wait_for(work, self._sign_timeout)
            except TimeoutError:
                raise KeyProviderUnavailable(
                    f"{self.provider_name}: the token gave no signature within {self._sign_timeout:g} s"
                ) from None
            except KeyProviderError:
                raise
            except Exception as exc:  # python-pkcs11 raises its own PKCS11Error tree
                raise KeyProviderError(f"{self.provider_name}: {type(exc).__name__}: {exc}") from None
        finally:
            self._limit.release()

    def close(self) -> None:
        # Wait for the sessions to close: the token logs out with the last one.
        self._executor.submit(self._key.close)
        self._executor.shutdown(wait=True)


def _pin(settings: Settings) -> str:
    pin = settings.optional_string("pin")
    env = settings.optional_string("pin_env")
    if (pin is None) == (env is None):
        raise ConfigError(settings.field_path("pin"), "set exactly one of pin, pin_env")
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(settings.field_path("pin_env"), f"environment variable {env} is not set")
        return value
    assert pin is not None
    return pin


def open_token(module: str, token_label: str, settings: Settings) -> Any:
    try:
        import pkcs11
    except ImportError:
        raise ProviderUnavailable(
            settings.path, "python-pkcs11 is not installed (pip install 'meshlet[hsm]')"
        ) from None
    if not os.path.exists(module):
        raise ProviderUnavailable(settings.field_path("module"), f"PKCS#11 module {module} does not exist")
    try:
        lib = pkcs11.lib(module)
        return lib.get_token(token_label=token_label)
    except pkcs11.NoSuchToken:
        raise ProviderUnavailable(
            settings.field_path("token_label"), f"no token labelled {token_label!r}"
        ) from None
    except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
        raise ProviderUnavailable(settings.field_path("module"), f"cannot use {module}: {exc!r}") from None


def build_pkcs11(config: PrivateKeyProviderConfig) -> Pkcs11KeyProvider:
    settings = Settings(config.settings, Pkcs11KeyProvider.provider_name)
    settings.only("module", "token_label", "pin", "pin_env", "key_label", "workers", "max_in_flight",
                  "sign_timeout")
    module = settings.string("module", DEFAULT_MODULE)
    token_label = settings.string("token_label")
    key_label = settings.string("key_label")
    pin = _pin(settings)
    workers = settings.integer("workers", 2, minimum=1, maximum=64)
    max_in_flight = settings.integer("max_in_flight", 64, minimum=1, maximum=65536)
    sign_timeout = settings.number("sign_timeout", 5.0, minimum=0.01, maximum=60.0)
    token = open_token(module, token_label, settings)
    import pkcs11

    try:
        return Pkcs11KeyProvider(
            TokenKey(token, pin, key_label), workers=workers, max_in_flight=max_in_flight,
            sign_timeout=sign_timeout,
        )
    except pkcs11.NoSuchKey:
        raise ConfigError(
            settings.field_path("key_label"), f"no private key labelled {key_label!r}"
        ) from None
    except pkcs11.PinIncorrect:
        raise ConfigError(settings.field_path("pin"), "the token refused the PIN") from None
    except ValueError as exc:
        raise ConfigError(settings.field_path("key_label"), str(exc)) from None
    except pkcs11.PKCS11Error as exc:
        raise ProviderUnavailable(settings.path, f"token error: {exc!r}") from None
