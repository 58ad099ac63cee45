"""The private key provider interface shared by every ``meshlet.*`` provider.

A provider is a ``KeyHandle`` (see ``meshlet.tls.config``) the TLS engine
awaits during the handshake's ``SignatureRequired`` pause, plus what an
operator needs: ``stats()`` and ``close()``. ``KeyProvider`` does the common
part (scheme check, counters, latency histogram); subclasses implement
``_sign``. Providers are built from ``PrivateKeyProviderConfig.settings``
(a TypedStruct as a dict) through ``Settings``, whose errors name the field.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from meshlet.errors import ConfigError, MeshletError
from meshlet.tls.config import KeyHandle
from meshlet.tls.crypto import schemes_for_key

__all__ = [
    "LATENCY_BUCKETS_MS",
    "InFlightLimit",
    "KeyHandle",
    "KeyProvider",
    "KeyProviderError",
    "KeyProviderUnavailable",
    "ProviderStats",
    "ProviderUnavailable",
    "Settings",
]

SETTINGS_PATH = "private_key_provider.typed_config"

# Upper bounds (ms) of the sign latency histogram; the last bucket is +Inf.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)


class KeyProviderError(MeshletError):
    """A signing operation failed; the handshake that asked for it fails."""


class KeyProviderUnavailable(KeyProviderError):
    """The provider's backend (key server, token, pool) cannot take the operation now."""


class ProviderUnavailable(ConfigError):
    """At build time: the provider's backend cannot be reached, so it cannot be used.

    Distinct from a bad setting so that ``fallback: true`` can fall back on it."""


# --------------------------------------------------------------------------- #
# Stats
# --------------------------------------------------------------------------- #


class ProviderStats:
    """Counters and a latency histogram for one provider."""

    __slots__ = ("buckets", "errors", "in_flight", "ops", "total_ms")

    def __init__(self) -> None:
        self.ops = 0
        self.errors = 0
        self.in_flight = 0
        self.total_ms = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)

    def started(self) -> float:
        self.in_flight += 1
        return time.perf_counter()

    def finished(self, started: float, *, ok: bool) -> None:
        self.in_flight -= 1
        if not ok:
            self.errors += 1
            return
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self.ops += 1
        self.total_ms += elapsed_ms
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, elapsed_ms)] += 1

    def snapshot(self) -> dict[str, Any]:
        histogram = {f"le_{bound:g}ms": n for bound, n in zip(LATENCY_BUCKETS_MS, self.buckets)}
        histogram["le_inf"] = self.buckets[-1]
        return {
            "ops": self.ops,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "latency_ms_sum": round(self.total_ms, 3),
            "latency_ms": histogram,
        }


# --------------------------------------------------------------------------- #
# The provider base
# --------------------------------------------------------------------------- #


class KeyProvider(ABC):
    """A ``KeyHandle`` with stats; subclasses implement ``_sign``.

    ``sign`` refuses schemes the key cannot produce before any work is done,
    and counts every operation (ok or failed) and its latency."""

    provider_name = ""

    def __init__(self, public_key: CertificatePublicKeyTypes) -> None:
        self._public = public_key
        self._schemes = schemes_for_key(public_key)
        if not self._schemes:
            raise ValueError(f"no TLS 1.3 signature scheme for a {type(public_key).__name__}")
        self._stats = ProviderStats()

    @property
    def public_key(self) -> CertificatePublicKeyTypes:
        return self._public

    @property
    def schemes(self) -> Sequence[int]:
        return self._schemes

    async def sign(self, scheme: int, data: bytes) -> bytes:
        if scheme not in self._schemes:
            self._stats.errors += 1
            raise KeyProviderError(f"{self.provider_name}: this key cannot sign with scheme {scheme:#06x}")
        started = self._stats.started()
        ok = False
        try:
            signature = await self._sign(scheme, data)
            ok = True
            return signature
        finally:
            self._stats.finished(started, ok=ok)

    @abstractmethod
    async def _sign(self, scheme: int, data: bytes) -> bytes:
        """Produce the signature (TLS wire form: RSA-PSS bytes, ECDSA DER, Ed25519 raw)."""

    def stats(self) -> dict[str, Any]:
        return {"provider": self.provider_name, **self._stats.snapshot()}

    def close(self) -> None:  # noqa: B027 - most providers hold nothing to release
        """Release pools, sessions and connections; ``sign`` must not be called afterwards."""


# --------------------------------------------------------------------------- #
# A bounded in-flight count with a timed wait
# --------------------------------------------------------------------------- #


class InFlightLimit:
    """At most ``limit`` operations at once; others wait up to ``timeout`` s.

    Not an ``asyncio.Semaphore``: a provider outlives event loops (tests, worker
    restarts), and a semaphore binds itself to the first loop it waits on."""

    __slots__ = ("_waiters", "active", "limit", "timeout")

    def __init__(self, limit: int, timeout: float) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be at least 1")
        self.limit = limit
        self.timeout = timeout
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we gave up
            else:
                waiter.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise KeyProviderUnavailable(
                    f"{self.limit} operations already in flight; none finished within {self.timeout:g} s"
                ) from None
            raise

    def release(self) -> None:
        # Hand the slot straight to the oldest live waiter, so a newcomer
        # cannot overtake it.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #


class Settings:
    """Typed access to a provider's TypedStruct settings; errors name the field.

    TypedStruct numbers arrive as floats (protobuf ``Value``), so integers are
    accepted as integral floats."""

    def __init__(self, values: dict[str, object], provider: str, path: str = SETTINGS_PATH) -> None:
        if not isinstance(values, dict):
            raise ConfigError(path, f"{provider} settings must be a struct")
        self.values = values
        self.provider = provider
        self.path = path

    def field_path(self, name: str) -> str:
        return f"{self.path}.{name}"

    def only(self, *names: str) -> None:
        unknown = sorted(set(self.values) - set(names))
        if unknown:
            raise ConfigError(
                self.field_path(unknown[0]),
                f"unknown {self.provider} setting (known: {', '.join(sorted(names))})",
            )

    def string(self, name: str, default: str | None = None) -> str:
        value = self.values.get(name, default)
        if value is None:
            raise ConfigError(self.field_path(name), f"is required by {self.provider}")
        if not isinstance(value, str) or not value:
            raise ConfigError(self.field_path(name), "must be a non-empty string")
        return value

    def optional_string(self, name: str) -> str | None:
        return self.string(name) if name in self.values else None

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self.values.get(name, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.field_path(name), f"must be an integer (got {value!r})")
        if not minimum <= value <= maximum:
            raise ConfigError(self.field_path(name), f"must be in [{minimum}, {maximum}] (got {value})")
        return value

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.values.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.field_path(name), f"must be a number (got {value!r})")
        if not minimum <= value <= maximum:
            raise ConfigError(self.field_path(name), f"must be in [{minimum:g}, {maximum:g}] (got {value:g})")
        return float(value)

    def choice(self, name: str, choices: Sequence[str], default: str) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise ConfigError(self.field_path(name), f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    def struct(self, name: str) -> Settings:
        value = self.values.get(name)
        if value is None:
            raise ConfigError(self.field_path(name), f"is required by {self.provider}")
        if not isinstance(value, dict):
            raise ConfigError(self.field_path(name), "must be a struct")
        return Settings(value, self.provider, self.field_path(name))
