"""``meshlet.batch``'s flush rule and routing: a batch leaves when full or
when the loop has no more ready work that could join it, ``poll_delay``
only bounds the wait; key types that batch slower than software go to
software under the default backend. The queue is driven with a recording
``run`` so the rule is checked on any CPU; the last test uses crypto_mb."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from meshlet.keys import crypto_mb
from meshlet.keys.batch import (
    BREAK_EVEN_LANES,
    LANE_UNBATCHED,
    SLOWER_BATCHED,
    BatchKeyProvider,
    BatchQueue,
    plan_for,
)
from meshlet.keys.crypto_mb import Lane, LaneResult, Probe
from meshlet.tls.crypto import SignatureScheme, verify

needs_crypto_mb = pytest.mark.skipif(not crypto_mb.probe().usable, reason=crypto_mb.probe().reason)
ALL_ALGORITHMS = {name: True for name in crypto_mb.ALGORITHMS}
USABLE = Probe(library="libcrypto_mb.so", applicable=True, algorithms=ALL_ALGORITHMS)


class Recorder:
    """A stand-in for the mb8 call: records each call's lane count."""

    def __init__(self, ticks: list[int] | None = None) -> None:
        self.calls: list[int] = []
        self.ticks_at_call: list[int] = []
        self._ticks = ticks

    def __call__(self, lanes: Sequence[Lane]) -> list[LaneResult]:
        self.calls.append(len(lanes))
        if self._ticks is not None:
            self.ticks_at_call.append(self._ticks[0])
        return [bytes(8)] * len(lanes)  # type: ignore[list-item]


def lane(index: int) -> Lane:
    return index  # type: ignore[return-value]  # the recorder never looks inside


async def burst(queue: BatchQueue, count: int) -> None:
    async def one(index: int) -> None:
        await queue.submit(lane(index))

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 0.9)


@pytest.mark.parametrize("count", [1, 3, 8, 9, 20])
@pytest.mark.parametrize("inline", [True, False])
async def test_a_burst_of_concurrent_signs_lands_in_the_fewest_calls(count: int, inline: bool) -> None:
    run = Recorder()
    # A poll_delay far above the wait_for bound: only the idle rule can flush in time.
    queue = BatchQueue(asyncio.get_running_loop(), run, 8, 5.0, 5.0, inline=inline)
    await burst(queue, count)
    assert len(run.calls) == math.ceil(count / 8) and sum(run.calls) == count
    stats = queue.stats.snapshot()
    assert stats["timer_flushes"] == 0 and stats["full_flushes"] == count // 8


async def test_a_lone_sign_waits_one_loop_iteration_at_most() -> None:
    loop = asyncio.get_running_loop()
    ticks = [0]
    stop = False

    def tick() -> None:
        ticks[0] += 1
        if not stop:
            loop.call_soon(tick)

    loop.call_soon(tick)
    await asyncio.sleep(0)
    run = Recorder(ticks)
    queue = BatchQueue(loop, run, 8, 5.0, 5.0, inline=True)
    for _ in range(3):
        submitted_at = ticks[0]
        await asyncio.wait_for(queue.submit(lane(0)), 0.9)
        assert run.ticks_at_call[-1] - submitted_at <= 1
    stop = True
    assert run.calls == [1, 1, 1]


async def test_a_growing_batch_waits_one_more_iteration_for_late_company() -> None:
    run = Recorder()
    queue = BatchQueue(asyncio.get_running_loop(), run, 8, 5.0, 5.0, inline=True)

    async def late(index: int) -> None:
        # A task starts one loop iteration after it is created.
        await queue.submit(lane(index))

    # Two lanes in this iteration: the batch is growing, so the check that
    # would flush it in the next iteration re-arms once and the tasks join.
    early = [queue.submit(lane(0)), queue.submit(lane(1))]
    await asyncio.wait_for(asyncio.gather(*early, late(2), late(3)), 0.9)
    assert run.calls == [4]


async def test_a_lone_lane_does_not_wait_for_a_task_an_iteration_behind() -> None:
    run = Recorder()
    queue = BatchQueue(asyncio.get_running_loop(), run, 8, 5.0, 5.0, inline=True)

    async def late(index: int) -> None:
        await queue.submit(lane(index))

    first = queue.submit(lane(0))
    await asyncio.wait_for(asyncio.gather(first, late(1)), 0.9)
    assert run.calls == [1, 1]


async def test_poll_delay_still_bounds_the_wait_when_the_worker_is_busy() -> None:
    loop = asyncio.get_running_loop()
    calls: list[int] = []

    def slow(lanes: Sequence[Lane]) -> list[LaneResult]:
        calls.append(len(lanes))
        time.sleep(0.05)
        return [bytes(8)] * len(lanes)  # type: ignore[list-item]

    queue = BatchQueue(loop, slow, 8, 0.01, 5.0)
    first = queue.submit(lane(0))
    await asyncio.sleep(0.01)  # the first batch is in the worker
    rest = [queue.submit(lane(i)) for i in range(1, 4)]
    await asyncio.wait_for(asyncio.gather(first, *rest), 0.9)
    assert calls == [1, 3]  # the three gathered while the worker was busy


def test_key_types_that_batch_slower_go_to_software_by_default() -> None:
    assert "RSA-3072" in SLOWER_BATCHED
    chosen = plan_for("RSA-3072", "crypto_mb", USABLE)
    assert not chosen.batched and chosen.deliberate
    assert "RSA-3072 batches slower than software" in chosen.reason
    assert plan_for("RSA-3072", "crypto_mb_always", USABLE).batched
    for kind in ("RSA-2048", "RSA-4096", "P-256", "P-384"):
        assert plan_for(kind, "crypto_mb", USABLE).batched


async def test_a_deliberate_software_route_is_no_error_without_fallback() -> None:
    key = rsa.generate_private_key(65537, 3072)
    provider = BatchKeyProvider(key, report=USABLE, software_fallback=False)
    assert not provider.batched and provider.stats()["path"] == "software"
    scheme = SignatureScheme.rsa_pss_rsae_sha256
    verify(provider.public_key, scheme, await provider.sign(scheme, b"hello"), b"hello")


@needs_crypto_mb
async def test_twenty_concurrent_rsa_signs_take_three_mb8_calls() -> None:
    provider = BatchKeyProvider(rsa.generate_private_key(65537, 2048), min_batch=1, poll_delay=1.0)
    scheme = SignatureScheme.rsa_pss_rsae_sha256
    started = time.monotonic()
    signatures = await asyncio.gather(*(provider.sign(scheme, b"m%d" % i) for i in range(20)))
    assert time.monotonic() - started < 0.9
    for index, signature in enumerate(signatures):
        verify(provider.public_key, scheme, signature, b"m%d" % index)
    queue = provider.stats()["queue"]
    assert queue["batches"] == 3 and queue["batched_ops"] == 20 and queue["timer_flushes"] == 0


async def test_a_batch_below_min_lanes_is_handed_back_for_software() -> None:
    run = Recorder()
    queue = BatchQueue(asyncio.get_running_loop(), run, 8, 5.0, 5.0, inline=True, min_lanes=5)

    async def one(index: int) -> LaneResult:
        return await queue.submit(lane(index))

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(12))), 0.9)
    # Eight leave as a full batch; the four left over would not pay for a call.
    assert run.calls == [8]
    assert results[8:] == [LANE_UNBATCHED] * 4 and LANE_UNBATCHED not in results[:8]
    assert queue.stats.snapshot()["unbatched_ops"] == 4


@needs_crypto_mb
async def test_the_provider_signs_small_batches_in_software_by_default() -> None:
    provider = BatchKeyProvider(rsa.generate_private_key(65537, 2048), poll_delay=1.0)
    assert provider.stats()["min_batch"] == BREAK_EVEN_LANES["RSA-2048"]
    scheme = SignatureScheme.rsa_pss_rsae_sha256
    signatures = await asyncio.gather(*(provider.sign(scheme, b"m%d" % i) for i in range(10)))
    for index, signature in enumerate(signatures):
        verify(provider.public_key, scheme, signature, b"m%d" % index)
    stats = provider.stats()
    assert stats["queue"]["batched_ops"] == 8 and stats["queue"]["unbatched_ops"] == 2
    assert stats["software_ops"] == 2 and stats["lane_errors"] == 0
