"""``meshlet.batch``: multi-buffer signing on AVX-512 IFMA (Intel crypto_mb).

Sign operations are gathered per key type (RSA-2048/3072/4096, P-256,
P-384) and per event loop; a batch leaves when ``max_batch`` operations are
queued or when the loop has no more ready work that could join it (at most
``poll_delay`` after its first one, see ``BatchQueue``), and one ``mb8``
call signs all of it: RSA calls (1 to 26 ms) in a worker thread (ctypes drops the GIL)
while the loop keeps serving; ECDSA calls (0.2 to 0.4 ms) on the loop by
default, where they cost less CPU than the handoff to a thread (see
``measure``). Lanes of one batch may belong to different keys of one type.
While a batch is being computed, a partial flush of the same queue
waits for it to finish, so that a busy queue sends fuller batches instead
of a line of small ones.

RSA: EMSA-PSS is encoded here (``meshlet.keys.pss``, fresh salt) and the
library does the CRT private operation. ECDSA: every signature gets a fresh
nonce from ``secrets``; the library computes (r, s), which is DER-encoded.

Where crypto_mb cannot run (library absent, no AVX-512 IFMA, a key size it
does not do, or ``backend: software``), the provider signs with
``cryptography`` (where the mb8 call would have run), says so once in the log and
reports ``fallback_reason`` in its stats; with ``software_fallback: false``
that is a configuration error instead. A lane the library fails is signed
in software as well and counted. Settings::

    key: PATH                     PEM private key file, or
    private_key: {filename | inline_string | environment_variable}
    poll_delay: "0.2ms" | "200us" | "0.0002s" | seconds   (default 0.2ms)
    max_batch: 1..8               (default 8)
    min_batch: 1..8               (default: the key type's break-even, BREAK_EVEN_LANES;
                                  a batch with fewer lanes is signed in software on the loop)
    software_fallback: bool       (default true)
    backend: crypto_mb | crypto_mb_always | software (default crypto_mb;
                                  crypto_mb leaves to software the key types
                                  that batch slower than they sign alone,
                                  ``SLOWER_BATCHED``; crypto_mb_always batches them too)
    execution: auto | thread | inline   (default auto: P-256/P-384 inline, RSA thread)
    max_in_flight: 1..65536       (default 1024)
    sign_timeout: seconds         (default 5)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError
from meshlet.keys import crypto_mb
from meshlet.keys.base import (
    InFlightLimit,
    KeyProvider,
    KeyProviderError,
    KeyProviderUnavailable,
    ProviderUnavailable,
    Settings,
)
from meshlet.keys.crypto_mb import (
    CryptoMb,
    CryptoMbUnavailable,
    EcdsaCurve,
    EcdsaLane,
    Lane,
    LaneResult,
    RsaCrtKey,
    RsaLane,
)
from meshlet.keys.local import SigningKey, load_signing_key, read_private_key
from meshlet.keys.pss import emsa_pss_encode
from meshlet.tls.crypto import SignatureScheme, sign

__all__ = [
    "BACKENDS",
    "BatchKeyProvider",
    "build_batch",
    "key_type",
    "measure",
    "parse_duration",
    "plan",
    "plan_for",
]

log = logging.getLogger(__name__)

BACKENDS = ("crypto_mb", "crypto_mb_always", "software")
EXECUTIONS = ("auto", "thread", "inline")
# Key types whose 8-lane call is short enough (P-256 ~0.2 ms, P-384 ~0.4 ms
# on AVX-512 IFMA) to run on the loop under ``execution: auto``: the handoff
# to a thread costs about as much CPU as the call. RSA calls take 1 ms
# (2048) to 26 ms (4096) and go to the worker thread.
INLINE_KEY_TYPES = frozenset({"P-256", "P-384"})
DEFAULT_POLL_DELAY = 0.0002
# Key types that full mb8 batches sign with more CPU per signature than
# ``cryptography`` does one at a time on AVX-512 IFMA (``measure``, signatures
# per CPU-second, batched / software): backend ``crypto_mb`` signs them in
# software. The others batch better: RSA-2048 1.69x, RSA-4096 1.22x,
# P-256 1.35x, P-384 6.41x.
SLOWER_BATCHED: dict[str, str] = {
    "RSA-3072": "0.56x",
}
# An mb8 call costs about the same CPU with one lane as with eight, so a
# batch pays only from ceil(8 / speedup) lanes (the speedups above); a
# smaller batch is signed in software, one at a time, on the loop.
BREAK_EVEN_LANES: dict[str, int] = {
    "RSA-2048": 5,
    "RSA-3072": 8,
    "RSA-4096": 7,
    "P-256": 6,
    "P-384": 2,
}
MAX_POLL_DELAY = 1.0

_PSS_HASH: dict[int, str] = {
    SignatureScheme.rsa_pss_rsae_sha256: "sha256",
    SignatureScheme.rsa_pss_rsae_sha384: "sha384",
    SignatureScheme.rsa_pss_rsae_sha512: "sha512",
}
_ECDSA_HASH: dict[int, str] = {
    SignatureScheme.ecdsa_secp256r1_sha256: "sha256",
    SignatureScheme.ecdsa_secp384r1_sha384: "sha384",
}


# --------------------------------------------------------------------------- #
# Which path a key takes
# --------------------------------------------------------------------------- #


def key_type(key: SigningKey) -> str:
    """The queue a key's operations join: ``RSA-2048``, ``P-256``, ..."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "P-256", "secp384r1": "P-384"}.get(key.curve.name, key.curve.name)
    return "Ed25519"


@dataclass(frozen=True)
class Plan:
    """The path one key's signatures take, and why."""

    key_type: str
    batched: bool
    reason: str
    # Software by choice (batching would be slower), not for want of the library.
    deliberate: bool = False


def plan_for(kind: str, backend: str = "crypto_mb", report: crypto_mb.Probe | None = None) -> Plan:
    """The path keys of type ``kind`` (``key_type``'s names) take on this machine."""
    if backend == "software":
        return Plan(kind, False, "software backend chosen by the 'backend' setting")
    report = report if report is not None else crypto_mb.probe()
    if not report.usable:
        return Plan(kind, False, report.reason)
    if kind not in crypto_mb.ALGORITHMS:
        return Plan(kind, False, f"crypto_mb does not batch {kind} keys (RSA-2048/3072/4096, P-256, P-384)")
    if not report.supports(kind):
        return Plan(kind, False, f"crypto_mb reports {kind} unsupported on this CPU")
    if backend != "crypto_mb_always" and kind in SLOWER_BATCHED:
        return Plan(
            kind,
            False,
            f"{kind} batches slower than software here (full batches do {SLOWER_BATCHED[kind]} the signatures"
            " per CPU-second); backend crypto_mb_always batches it anyway",
            deliberate=True,
        )
    return Plan(kind, True, f"crypto_mb applies: AVX-512 IFMA present and enabled, {kind} supported")


def plan(key: SigningKey, backend: str = "crypto_mb", report: crypto_mb.Probe | None = None) -> Plan:
    """The path this key's signatures take, and why."""
    chosen = plan_for(key_type(key), backend, report)
    if chosen.batched and isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        half = key.key_size // 2
        if numbers.p.bit_length() != half or numbers.q.bit_length() != half:
            return Plan(chosen.key_type, False, f"crypto_mb needs both RSA primes of {half} bits")
    return chosen


# --------------------------------------------------------------------------- #
# The worker thread
# --------------------------------------------------------------------------- #

_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    """One thread per process signs every batch: mb8 calls use one core each
    and the library's scratch buffers are reused between calls."""
    global _executor
    executor = _executor
    if executor is not None:
        return executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="meshlet-batch")
        return _executor


def _forget_worker_after_fork() -> None:
    # A forked worker process does not inherit the thread, only its object.
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_worker_after_fork)


# --------------------------------------------------------------------------- #
# Queues: one per (event loop, key type, batch settings)
# --------------------------------------------------------------------------- #

# The status given to lanes of a batch whose call raised (no library status).
LANE_FAILED = 0x10
# The status given to lanes of a batch too small to pay for an mb8 call: the
# provider signs them in software. Negative: never a library status.
LANE_UNBATCHED = -1


class QueueStats:
    __slots__ = ("batches", "full_flushes", "idle_flushes", "lanes", "timer_flushes", "unbatched")

    def __init__(self) -> None:
        self.batches = 0
        self.lanes = 0
        self.unbatched = 0
        self.full_flushes = 0
        self.idle_flushes = 0
        self.timer_flushes = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "batched_ops": self.lanes,
            "mean_batch": round(self.lanes / self.batches, 2) if self.batches else 0.0,
            "full_flushes": self.full_flushes,
            "idle_flushes": self.idle_flushes,
            "timer_flushes": self.timer_flushes,
            "unbatched_ops": self.unbatched,
        }


class _Pending:
    __slots__ = ("future", "lane")

    def __init__(self, lane: Lane, future: asyncio.Future[LaneResult]) -> None:
        self.lane = lane
        self.future = future


class _Batch:
    """The operations of one mb8 call; ``expired`` once it has been given up on."""

    __slots__ = ("expired", "expiry", "items")

    def __init__(self, items: list[_Pending]) -> None:
        self.items = items
        self.expired = False
        self.expiry: asyncio.TimerHandle | None = None

    def deliver(self, outcome: list[LaneResult] | BaseException) -> None:
        for index, pending in enumerate(self.items):
            if pending.future.done():  # its caller went away
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome[index])


class BatchQueue:
    """Gathers lanes of one key type on one loop and runs them in batches.

    A batch leaves when it is full, or when the loop has run out of ready
    work that could still add to it: the first lane schedules a check with
    ``call_soon``, which runs after every callback already queued in this
    loop iteration (the other connections whose data came in the same
    poll). If lanes joined meanwhile, the check runs once more (their
    neighbours may be one callback behind); then the batch leaves. A lone
    lane is therefore held one loop iteration at most, and under load the
    batch fills from whatever the loop is handling. ``poll_delay`` bounds the
    wait whatever the loop does. While a batch is being computed in the
    worker thread, the next one keeps gathering until the worker is free.

    A batch that has not come back ``timeout`` s after it left fails its
    operations with ``KeyProviderUnavailable`` (one timer per batch rather
    than one per operation), so a lane waits at most ``poll_delay``, plus
    the time allowed to the batch ahead of it, plus its own batch's."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        run: Callable[[Sequence[Lane]], list[LaneResult]],
        max_batch: int,
        poll_delay: float,
        timeout: float,
        *,
        inline: bool = False,
        min_lanes: int = 1,
    ) -> None:
        self._loop = loop
        self._run = run
        self._max_batch = max_batch
        self._min_lanes = min(min_lanes, max_batch)
        self._poll_delay = poll_delay
        self._timeout = timeout
        self._inline = inline
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._idle_check: asyncio.Handle | None = None
        # Lanes queued when the pending idle check was scheduled, and whether
        # it has been re-armed already.
        self._seen_at_check = 0
        self._rearmed = False
        self._in_flight = 0
        self._flush_when_idle = False
        self._deferred_by_timer = False
        self.stats = QueueStats()

    def submit(self, lane: Lane) -> asyncio.Future[LaneResult]:
        future: asyncio.Future[LaneResult] = self._loop.create_future()
        self._pending.append(_Pending(lane, future))
        if len(self._pending) >= self._max_batch:
            self.stats.full_flushes += 1
            self._flush()
        elif not self._flush_when_idle:
            self._arm()
        return future

    def _arm(self) -> None:
        """Start waiting for company: an idle check now, ``poll_delay`` at most."""
        if self._idle_check is None:
            self._schedule_idle_check(rearmed=False)
        if self._timer is None:
            self._timer = self._loop.call_later(self._poll_delay, self._on_timer)

    def _schedule_idle_check(self, *, rearmed: bool) -> None:
        self._seen_at_check = len(self._pending)
        self._rearmed = rearmed
        self._idle_check = self._loop.call_soon(self._on_idle)

    def _on_idle(self) -> None:
        self._idle_check = None
        if not self._pending:
            return
        if not self._rearmed and len(self._pending) > self._seen_at_check:
            self._schedule_idle_check(rearmed=True)
            return
        self._flush_or_defer(by_timer=False)

    def _on_timer(self) -> None:
        self._timer = None
        if self._pending:
            self._flush_or_defer(by_timer=True)

    def _flush_or_defer(self, *, by_timer: bool) -> None:
        if self._in_flight:
            # The worker is still on the previous batch: keep gathering
            # until it is back, then send what has accumulated.
            self._cancel_waits()
            self._flush_when_idle = True
            self._deferred_by_timer = by_timer
            return
        self._count_flush(by_timer=by_timer)
        self._flush()

    def _count_flush(self, *, by_timer: bool) -> None:
        if by_timer:
            self.stats.timer_flushes += 1
        else:
            self.stats.idle_flushes += 1

    def _cancel_waits(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None

    def _flush_if_deferred(self) -> None:
        if self._flush_when_idle and not self._in_flight:
            self._flush_when_idle = False
            if self._pending:
                self._count_flush(by_timer=self._deferred_by_timer)
                self._flush()

    def _flush(self) -> None:
        self._cancel_waits()
        self._flush_when_idle = False
        items = [p for p in self._pending[: self._max_batch] if not p.future.done()]
        del self._pending[: self._max_batch]
        if self._pending:
            self._arm()
        if not items:
            return
        if len(items) < self._min_lanes:
            self.stats.unbatched += len(items)
            _Batch(items).deliver([LANE_UNBATCHED] * len(items))
            return
        self.stats.batches += 1
        self.stats.lanes += len(items)
        batch = _Batch(items)
        lanes = [p.lane for p in items]
        if self._inline:
            batch.deliver(self._call(lanes))
            return
        self._in_flight += 1
        batch.expiry = self._loop.call_later(self._timeout, self._expire, batch)
        work = self._loop.run_in_executor(_worker(), self._call, lanes)
        work.add_done_callback(lambda done: self._finished(batch, done))

    def _call(self, lanes: Sequence[Lane]) -> list[LaneResult]:
        try:
            return self._run(lanes)
        except Exception as exc:
            # A binding failure fails this batch only: every lane reports an
            # error and is signed in software by its provider.
            log.warning("meshlet.batch: a %d-lane batch failed: %s", len(lanes), exc)
            return [LANE_FAILED] * len(lanes)

    def _expire(self, batch: _Batch) -> None:
        # The call is stuck in the library or behind one that is: give up on
        # it (its late results are dropped) and stop holding the queue back.
        batch.expired = True
        self._in_flight -= 1
        batch.deliver(KeyProviderUnavailable(f"meshlet.batch: no signature within {self._timeout:g} s"))
        self._flush_if_deferred()

    def _finished(self, batch: _Batch, done: asyncio.Future[list[LaneResult]]) -> None:
        if batch.expired:
            return
        if batch.expiry is not None:
            batch.expiry.cancel()
        self._in_flight -= 1
        outcome: list[LaneResult] | BaseException
        if done.cancelled():
            outcome = KeyProviderUnavailable("meshlet.batch: the batch worker stopped")
        elif (error := done.exception()) is not None:
            outcome = KeyProviderUnavailable(f"meshlet.batch: the batch worker failed: {error}")
        else:
            outcome = done.result()
        batch.deliver(outcome)
        self._flush_if_deferred()


# Queues outlive no loop: a loop that goes away takes its queues with it.
_QueueKey = tuple[str, int, float, float, bool, int]
_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_QueueKey, BatchQueue]]
_queues = weakref.WeakKeyDictionary()


def queue_for(
    kind: str,
    run: Callable[[Sequence[Lane]], list[LaneResult]],
    max_batch: int,
    poll_delay: float,
    timeout: float,
    *,
    inline: bool = False,
    min_lanes: int = 1,
) -> BatchQueue:
    """This loop's queue for ``kind`` with these settings (created on first use)."""
    loop = asyncio.get_running_loop()
    per_loop = _queues.setdefault(loop, {})
    key = (kind, max_batch, poll_delay, timeout, inline, min_lanes)
    queue = per_loop.get(key)
    if queue is None:
        queue = per_loop[key] = BatchQueue(
            loop, run, max_batch, poll_delay, timeout, inline=inline, min_lanes=min_lanes
        )
    return queue


# --------------------------------------------------------------------------- #
# Per-key lane builders
# --------------------------------------------------------------------------- #


class _RsaSigner:
    """Turns (scheme, data) into an RSA lane and a lane result into a signature."""

    def __init__(self, key: rsa.RSAPrivateKey, engine: CryptoMb) -> None:
        numbers = key.private_numbers()
        self.bits = key.key_size
        self.crt = RsaCrtKey.from_numbers(
            self.bits,
            numbers.p,
            numbers.q,
            numbers.dmp1,
            numbers.dmq1,
            numbers.iqmp,
            e=numbers.public_numbers.e,
        )
        self.run = engine.run

    def lane(self, scheme: int, data: bytes) -> Lane:
        return RsaLane(self.crt, emsa_pss_encode(data, self.bits, _PSS_HASH[scheme]))

    @staticmethod
    def signature(result: LaneResult) -> bytes:
        assert isinstance(result, bytes)
        return result


class _EcdsaSigner:
    def __init__(self, key: ec.EllipticCurvePrivateKey, engine: CryptoMb) -> None:
        self.curve: EcdsaCurve = crypto_mb.ECDSA_CURVES[key_type(key)]
        self.private = EcdsaLane.private_limbs(self.curve, key.private_numbers().private_value)
        self.run = engine.run

    def lane(self, scheme: int, data: bytes) -> Lane:
        digest = hashlib.new(_ECDSA_HASH[scheme], data).digest()
        e = int.from_bytes(digest, "big")
        excess = 8 * len(digest) - self.curve.bits
        if excess > 0:  # the leftmost curve-size bits of the hash (SEC 1, 4.1.3)
            e >>= excess
        order = self.curve.order
        # A fresh nonce from the OS CSPRNG for every signature, never reused.
        nonce = secrets.randbelow(order - 1) + 1
        return EcdsaLane(self.curve, self.private, nonce, e % order)

    @staticmethod
    def signature(result: LaneResult) -> bytes:
        assert isinstance(result, tuple)
        return encode_dss_signature(*result)


# --------------------------------------------------------------------------- #
# The provider
# --------------------------------------------------------------------------- #


class BatchKeyProvider(KeyProvider):
    provider_name = "meshlet.batch"

    def __init__(
        self,
        private_key: SigningKey,
        *,
        poll_delay: float = DEFAULT_POLL_DELAY,
        max_batch: int = crypto_mb.LANES,
        min_batch: int | None = None,
        software_fallback: bool = True,
        backend: str = "crypto_mb",
        max_in_flight: int = 1024,
        sign_timeout: float = 5.0,
        execution: str = "auto",
        report: crypto_mb.Probe | None = None,
    ) -> None:
        """``execution``: where mb8 calls (and software signs) run, see
        ``EXECUTIONS``; ``report`` replaces this machine's crypto_mb probe."""
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
        if not 1 <= max_batch <= crypto_mb.LANES:
            raise ValueError(f"max_batch must be in [1, {crypto_mb.LANES}]")
        if min_batch is not None and not 1 <= min_batch <= crypto_mb.LANES:
            raise ValueError(f"min_batch must be in [1, {crypto_mb.LANES}]")
        if not 0 <= poll_delay <= MAX_POLL_DELAY:
            raise ValueError(f"poll_delay must be in [0, {MAX_POLL_DELAY:g}] s")
        super().__init__(private_key.public_key())
        self._private = private_key
        self._poll_delay = poll_delay
        self._max_batch = max_batch
        kind = key_type(private_key)
        chosen_min = min_batch if min_batch is not None else BREAK_EVEN_LANES.get(kind, 1)
        self._min_batch = min(chosen_min, max_batch)
        self._inline = execution == "inline" or (execution == "auto" and kind in INLINE_KEY_TYPES)
        self._limit = InFlightLimit(max_in_flight, sign_timeout)
        self._sign_timeout = sign_timeout
        self._closed = False
        self.lane_errors = 0
        self.software_ops = 0
        self.plan = plan(private_key, backend, report)
        self._signer = self._make_signer() if self.plan.batched else None
        if self._signer is None:
            if not software_fallback and backend != "software" and not self.plan.deliberate:
                raise ProviderUnavailable("", f"{self.provider_name}: cannot batch: {self.plan.reason}")
            log.warning(
                "%s: %s key signs in software: %s", self.provider_name, self.plan.key_type, self.plan.reason
            )

    def _make_signer(self) -> _RsaSigner | _EcdsaSigner | None:
        try:
            engine = crypto_mb.load()
            if isinstance(self._private, rsa.RSAPrivateKey):
                return _RsaSigner(self._private, engine)
            if isinstance(self._private, ec.EllipticCurvePrivateKey):
                return _EcdsaSigner(self._private, engine)
        except (CryptoMbUnavailable, ValueError) as exc:
            self.plan = Plan(self.plan.key_type, False, str(exc))
        return None

    @property
    def batched(self) -> bool:
        return self._signer is not None

    @property
    def fallback_reason(self) -> str | None:
        return None if self.batched else self.plan.reason

    async def _sign(self, scheme: int, data: bytes) -> bytes:
        if self._closed:
            raise KeyProviderError(f"{self.provider_name}: the provider is closed")
        await self._limit.acquire()
        try:
            signer = self._signer
            if signer is None:
                return await self._sign_in_software(scheme, data)
            # No per-operation timer: the queue times out whole batches.
            result = await self._queue(signer).submit(signer.lane(scheme, data))
            if type(result) is int and result == LANE_UNBATCHED:
                return self._sign_unbatched(scheme, data)
            if isinstance(result, int):
                # A lane the library refused: still a signature, from software.
                self.lane_errors += 1
                return await self._sign_in_software(scheme, data)
            return signer.signature(result)
        finally:
            self._limit.release()

    def _queue(self, signer: _RsaSigner | _EcdsaSigner) -> BatchQueue:
        return queue_for(
            self.plan.key_type,
            signer.run,
            self._max_batch,
            self._poll_delay,
            self._sign_timeout,
            inline=self._inline,
            min_lanes=self._min_batch,
        )

    def _sign_unbatched(self, scheme: int, data: bytes) -> bytes:
        """A lane of a batch too small to pay: signed here on the loop, as
        ``meshlet.local`` does. A small batch means a light load, so the loop
        has the time, and a thread handoff would cost more CPU than it saves."""
        self.software_ops += 1
        try:
            return sign(self._private, scheme, data)
        except ValueError as exc:
            raise KeyProviderError(f"{self.provider_name}: {exc}") from None

    async def _sign_in_software(self, scheme: int, data: bytes) -> bytes:
        self.software_ops += 1
        try:
            if self._inline:
                return sign(self._private, scheme, data)
            work = asyncio.get_running_loop().run_in_executor(_worker(), sign, self._private, scheme, data)
            return await asyncio.wait_for(work, self._sign_timeout)
        except TimeoutError:
            raise KeyProviderUnavailable(
                f"{self.provider_name}: no signature within {self._sign_timeout:g} s"
            ) from None
        except ValueError as exc:
            raise KeyProviderError(f"{self.provider_name}: {exc}") from None

    def stats(self) -> dict[str, Any]:
        out = {
            **super().stats(),
            "path": "crypto_mb" if self.batched else "software",
            "key_type": self.plan.key_type,
            "fallback_reason": self.fallback_reason,
            "lane_errors": self.lane_errors,
            "software_ops": self.software_ops,
            "max_batch": self._max_batch,
            "min_batch": self._min_batch,
            "poll_delay_ms": self._poll_delay * 1000.0,
            "execution": "inline" if self._inline else "thread",
        }
        queue = self._current_queue()
        if queue is not None:
            out["queue"] = queue.stats.snapshot()
        return out

    def _current_queue(self) -> BatchQueue | None:
        """The running loop's queue for this key, if it has one yet."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        key = (
            self.plan.key_type,
            self._max_batch,
            self._poll_delay,
            self._sign_timeout,
            self._inline,
            self._min_batch,
        )
        return _queues.get(loop, {}).get(key) if self._signer is not None else None

    def close(self) -> None:
        self._closed = True


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|µs|ms|s)?\s*$")
_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}


def parse_duration(value: object, path: str) -> float:
    """Seconds from a number of seconds or a string such as ``0.2ms``,
    ``200us`` or ``0.0002s`` (a protobuf Duration's JSON form)."""
    if isinstance(value, bool):
        raise ConfigError(path, f"must be a duration (got {value!r})")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ConfigError(path, f"must be a duration such as '0.2ms', '200us' or '0.0002s' (got {value!r})")
    if not 0 <= seconds <= MAX_POLL_DELAY:
        raise ConfigError(path, f"must be between 0 and {MAX_POLL_DELAY:g} s (got {value!r})")
    return seconds


def _boolean(settings: Settings, name: str, default: bool) -> bool:
    value = settings.values.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(settings.field_path(name), f"must be true or false (got {value!r})")
    return value


def _read_key(settings: Settings) -> SigningKey:
    given = [name for name in ("key", "private_key") if name in settings.values]
    if len(given) != 1:
        raise ConfigError(
            settings.path, "meshlet.batch needs exactly one of key (a PEM file path), private_key"
        )
    if given[0] == "private_key":
        return read_private_key(settings)
    path = settings.string("key")
    try:
        with open(path, "rb") as f:
            pem = f.read(1 << 20)
    except OSError as exc:
        raise ConfigError(settings.field_path("key"), f"cannot read {path}: {exc.strerror}") from None
    return load_signing_key(pem, settings.field_path("key"))


def build_batch(config: PrivateKeyProviderConfig) -> BatchKeyProvider:
    """The ``meshlet.batch`` registry factory."""
    settings = Settings(config.settings, BatchKeyProvider.provider_name)
    settings.only(
        "key",
        "private_key",
        "poll_delay",
        "max_batch",
        "min_batch",
        "software_fallback",
        "backend",
        "max_in_flight",
        "sign_timeout",
        "execution",
    )
    key = _read_key(settings)
    poll_delay = parse_duration(
        settings.values.get("poll_delay", DEFAULT_POLL_DELAY), settings.field_path("poll_delay")
    )
    try:
        return BatchKeyProvider(
            key,
            poll_delay=poll_delay,
            max_batch=settings.integer("max_batch", crypto_mb.LANES, minimum=1, maximum=crypto_mb.LANES),
            min_batch=(
                settings.integer("min_batch", 1, minimum=1, maximum=crypto_mb.LANES)
                if "min_batch" in settings.values
                else None
            ),
            software_fallback=_boolean(settings, "software_fallback", True),
            backend=settings.choice("backend", BACKENDS, "crypto_mb"),
            max_in_flight=settings.integer("max_in_flight", 1024, minimum=1, maximum=65536),
            sign_timeout=settings.number("sign_timeout", 5.0, minimum=0.001, maximum=60.0),
            execution=settings.choice("execution", EXECUTIONS, "auto"),
        )
    except ProviderUnavailable as exc:
        raise ProviderUnavailable(settings.path, exc.message) from None
    except ValueError as exc:
        raise ConfigError(settings.path, str(exc)) from None


# --------------------------------------------------------------------------- #
# Micro-benchmark
# --------------------------------------------------------------------------- #

_BENCH_SCHEME = {
    "RSA-2048": SignatureScheme.rsa_pss_rsae_sha256,
    "RSA-3072": SignatureScheme.rsa_pss_rsae_sha256,
    "RSA-4096": SignatureScheme.rsa_pss_rsae_sha256,
    "P-256": SignatureScheme.ecdsa_secp256r1_sha256,
    "P-384": SignatureScheme.ecdsa_secp384r1_sha384,
}


def _bench_key(kind: str) -> SigningKey:
    if kind.startswith("RSA-"):
        return rsa.generate_private_key(65537, int(kind[4:]))
    if kind == "P-256":
        return ec.generate_private_key(ec.SECP256R1())
    return ec.generate_private_key(ec.SECP384R1())


@dataclass(frozen=True)
class Rate:
    """Operations done, wall time and process CPU time (all threads) spent."""

    ops: int
    wall: float
    cpu: float

    def as_dict(self) -> dict[str, float]:
        return {
            "signs_per_s": round(self.ops / self.wall) if self.wall else 0.0,
            # Per CPU-second of the whole process: what one core would do,
            # and robust against other load on the machine.
            "signs_per_cpu_s": round(self.ops / self.cpu) if self.cpu else 0.0,
        }


def _software_rate(key: SigningKey, scheme: int, seconds: float) -> Rate:
    count = 0
    started, cpu = time.perf_counter(), time.process_time()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        sign(key, scheme, b"meshlet batch benchmark")
        count += 1
    return Rate(count, time.perf_counter() - started, time.process_time() - cpu)


async def _provider_rate(provider: BatchKeyProvider, scheme: int, seconds: float, concurrency: int) -> Rate:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await provider.sign(scheme, b"meshlet batch benchmark")
            done += 1

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Rate(done, time.perf_counter() - started, time.process_time() - cpu)


def measure(key_type: str, seconds: float = 2.0, *, concurrency: int = 64) -> dict[str, Any]:
    """Signatures per second and per CPU-second: ``meshlet.batch`` with
    ``concurrency`` signs in flight (mb8 calls in the worker thread, and
    inline on the loop) against ``cryptography`` signing one at a time, all
    in this run with the time split evenly. Not for use on a running loop."""
    if key_type not in _BENCH_SCHEME:
        raise ValueError(f"unknown key type {key_type!r} (one of {', '.join(_BENCH_SCHEME)})")
    key = _bench_key(key_type)
    scheme = _BENCH_SCHEME[key_type]
    part = seconds / 3
    # crypto_mb_always: the figure is what decides ``SLOWER_BATCHED``.
    threaded = BatchKeyProvider(key, execution="thread", backend="crypto_mb_always")
    inline = BatchKeyProvider(key, execution="inline", backend="crypto_mb_always")
    runs = {
        "batch_thread": asyncio.run(_provider_rate(threaded, scheme, part, concurrency)).as_dict(),
        "batch_inline": asyncio.run(_provider_rate(inline, scheme, part, concurrency)).as_dict(),
        "cryptography": _software_rate(key, scheme, part).as_dict(),
    }
    baseline = runs["cryptography"]["signs_per_cpu_s"]
    best = max(runs["batch_thread"]["signs_per_cpu_s"], runs["batch_inline"]["signs_per_cpu_s"])
    return {
        "key_type": key_type,
        "path": "crypto_mb" if threaded.batched else "software",
        "reason": threaded.plan.reason,
        "seconds": seconds,
        "concurrency": concurrency,
        **runs,
        "lane_errors": threaded.lane_errors + inline.lane_errors,
        "speedup_per_cpu": round(best / baseline, 2) if baseline else None,
    }
