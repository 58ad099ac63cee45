"""``meshlet.offload``: signing off the event loop, the QAT model.

Each operation is submitted to a thread pool (``cryptography`` releases the
GIL while OpenSSL computes RSA and ECDSA signatures, so threads run them in
parallel) or to a process pool; the handshake awaits its completion while the
loop keeps serving. At most ``max_in_flight`` operations are submitted at
once; further ``sign`` calls wait up to ``queue_timeout`` s for a slot and
then fail, rather than queueing without bound. Settings::

    private_key: {filename: PATH} | {inline_string: PEM} | {environment_variable: NAME}
    mode: thread | process      (default thread)
    workers: 1..256             (default: CPU count, at most 8)
    max_in_flight: 1..65536     (default 64 per worker)
    queue_timeout: seconds      (default 1)
    sign_timeout: seconds       (default 5)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from cryptography.hazmat.primitives import serialization

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.keys.base import InFlightLimit, KeyProvider, KeyProviderError, KeyProviderUnavailable, Settings
from meshlet.keys.local import SigningKey, load_signing_key, read_private_key
from meshlet.tls.crypto import sign

MODES = ("thread", "process")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# A process-pool worker's key, loaded once by the pool initializer.
_worker_key: SigningKey | None = None


def _load_worker_key(pem: bytes) -> None:
    global _worker_key
    _worker_key = load_signing_key(pem, "offload worker")


def _sign_in_worker(scheme: int, data: bytes) -> bytes:
    if _worker_key is None:
        raise RuntimeError("offload worker has no key")
    return sign(_worker_key, scheme, data)


class OffloadKeyProvider(KeyProvider):
    provider_name = "meshlet.offload"

    def __init__(
        self,
        private_key: SigningKey,
        *,
        mode: str = "thread",
        workers: int | None = None,
        max_in_flight: int | None = None,
        queue_timeout: float = 1.0,
        sign_timeout: float = 5.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"offload mode must be one of {MODES}")
        super().__init__(private_key.public_key())
        self.mode = mode
        self.workers = workers or default_workers()
        self._limit = InFlightLimit(max_in_flight or 64 * self.workers, queue_timeout)
        self._sign_timeout = sign_timeout
        self._private = private_key
        self._executor = self._make_executor(private_key)

    def _make_executor(self, private_key: SigningKey) -> Executor:
        if self.mode == "thread":
            return ThreadPoolExecutor(self.workers, thread_name_prefix="meshlet-offload")
        pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # spawn, not fork: forking a process that runs an event loop and
        # threads copies their state half-way through.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_load_worker_key,
            initargs=(pem,),
        )

    def _submit(self, scheme: int, data: bytes) -> concurrent.futures.Future[bytes]:
        if self.mode == "thread":
            return self._executor.submit(sign, self._private, scheme, data)
        return self._executor.submit(_sign_in_worker, scheme, data)

    async def _sign(self, scheme: int, data: bytes) -> bytes:
        await self._limit.acquire()
        loop = asyncio.get_running_loop()
        try:
            future = self._submit(scheme, data)
        except RuntimeError as exc:  # the pool is shut down or broken
            self._limit.release()
            raise KeyProviderUnavailable(f"{self.provider_name}: {exc}") from None
        # The slot stays taken until the work really ends, even if we stop
        # waiting for it: that is what keeps the pool's queue bounded.
        future.add_done_callback(lambda _: _call_soon(loop, self._limit.release))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future, loop=loop), self._sign_timeout)
        except TimeoutError:
            raise KeyProviderUnavailable(
                f"{self.provider_name}: no signature within {self._sign_timeout:g} s"
            ) from None
        except concurrent.futures.BrokenExecutor as exc:
            raise KeyProviderUnavailable(f"{self.provider_name}: worker pool broken: {exc}") from None
        except ValueError as exc:
            raise KeyProviderError(f"{self.provider_name}: {exc}") from None

    def stats(self) -> dict[str, Any]:
        extra = {
            "mode": self.mode,
            "workers": self.workers,
            "max_in_flight": self._limit.limit,
            "submitted": self._limit.active,  # in the pool now: at most max_in_flight
        }
        return {**super().stats(), **extra}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed: nobody is left waiting
        pass


def build_offload(config: PrivateKeyProviderConfig) -> OffloadKeyProvider:
    settings = Settings(config.settings, OffloadKeyProvider.provider_name)
    settings.only("private_key", "mode", "workers", "max_in_flight", "queue_timeout", "sign_timeout")
    mode = settings.choice("mode", MODES, "thread")
    workers = settings.integer("workers", default_workers(), minimum=1, maximum=256)
    max_in_flight = settings.integer("max_in_flight", 64 * workers, minimum=1, maximum=65536)
    queue_timeout = settings.number("queue_timeout", 1.0, minimum=0.001, maximum=60.0)
    sign_timeout = settings.number("sign_timeout", 5.0, minimum=0.001, maximum=60.0)
    return OffloadKeyProvider(
        read_private_key(settings),
        mode=mode,
        workers=workers,
        max_in_flight=max_in_flight,
        queue_timeout=queue_timeout,
        sign_timeout=sign_timeout,
    )
