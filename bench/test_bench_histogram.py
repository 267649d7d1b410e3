"""Micro-benchmarks of the histogram: recording one sample (the hot path), summaries, bulk bucketing.

Run with ``python -m pytest bench/test_bench_histogram.py --benchmark-enable -p no:cacheprovider``.

The record benchmarks time rounds of 1000 samples recorded in a plain ``for`` loop, so their
times in microseconds per round read directly as nanoseconds per sample; ``extra_info`` carries
the per-sample median too. Target (the issue): recording one latency sample costs <= 100 ns
median. The machine is shared and noisy, so the target is checked as a ratio to a reference
measured in the same run, one reference round before each benchmark round (pytest-benchmark's
``setup``), so that both see the same load: an uncontended POSIX-semaphore acquire+release,
which DESIGN.md measured at ~0.1 us on the development machine, so 100 ns is 1.0 of them.
``test_recorder_target`` (the closure from ``recorder()``, what a measuring loop should use)
fails above ``ASIRT_RECORD_RATIO`` (default 1.0) when benchmarks are enabled; ``test_record``
reports ``record()`` itself.
"""
from __future__ import annotations

import mmap
import os
import statistics

import numpy as np
import pytest

from asirt import histogram as h
from asirt.clock import now

SAMPLES_PER_ROUND = 1000
TARGET_RATIO = float(os.environ.get("ASIRT_RECORD_RATIO", "1.0"))


def _samples(median_ns: float, sigma: float = 0.5, seed: int = 0) -> list[int]:
    """Latency-like values (lognormal) as Python ints, what a worker's t1 - t0 produces."""
    rng = np.random.default_rng(seed)
    return [int(v) for v in rng.lognormal(np.log(median_ns), sigma, SAMPLES_PER_ROUND)]


@pytest.fixture
def words():
    """An anonymous shared mapping viewed as int64 words, like Region.words."""
    m = mmap.mmap(-1, 8 * 4 * h.NBUCKETS)
    w = memoryview(m).cast("q")
    yield w
    w.release()
    m.close()


def _per_sample(benchmark, **info) -> float | None:
    """Record the per-sample median (ns) in extra_info; None when benchmarks are disabled."""
    if benchmark.stats is None:
        return None
    ns = benchmark.stats.stats.median / SAMPLES_PER_ROUND * 1e9
    benchmark.extra_info["per_sample_median_ns"] = round(ns, 1)
    benchmark.extra_info.update(info)
    return ns


def _record_loop(words, base, vals, record=h.record):
    for v in vals:
        record(words, base, v)


def _recorder_loop(rec, vals):
    for v in vals:
        rec(v)


def _empty_loop(words, base, vals):
    for v in vals:
        pass


GROUP = "record: 1000 samples/round (us/round = ns/sample)"


class _SemaphorePairs:
    """The reference: SAMPLES_PER_ROUND acquire+release pairs of an uncontended POSIX semaphore,
    timed as one round before each benchmark round (pass it as ``setup``)."""

    def __init__(self, region) -> None:
        sem = region.semaphore("bench_reference", 1)
        self.acquire, self.release, self.ns = sem.acquire, sem.release, []

    def __call__(self) -> None:
        acquire, release = self.acquire, self.release
        t0 = now()
        for _ in range(SAMPLES_PER_ROUND):
            acquire(0)
            release()
        self.ns.append((now() - t0) / SAMPLES_PER_ROUND)


@pytest.mark.benchmark(group=GROUP)
def test_recorder_target(benchmark, words, region):
    """The closure from recorder() on typical latencies (lognormal, median 3 us): the target,
    as a ratio to a semaphore acquire+release measured round by round beside it."""
    vals = _samples(3000)
    rec = h.recorder(words, h.NBUCKETS)
    ref = _SemaphorePairs(region)
    benchmark.pedantic(_recorder_loop, (rec, vals), setup=ref, rounds=300, warmup_rounds=5)
    recorded = int(sum(words[h.NBUCKETS:2 * h.NBUCKETS]))
    assert recorded == len(ref.ns) * len(vals)     # one setup per round: every sample counted
    ns = _per_sample(benchmark, values="lognormal median 3us sigma 0.5")
    if ns is not None:
        ref_ns = statistics.median(ref.ns)
        ratio = ns / ref_ns
        benchmark.extra_info.update(semaphore_pair_median_ns=round(ref_ns, 1),
                                    ratio_to_semaphore_pair=round(ratio, 3),
                                    target_ratio=TARGET_RATIO)
        assert ratio <= TARGET_RATIO, (
            f"recording costs {ns:.1f} ns per sample = {ratio:.2f} x a semaphore "
            f"acquire+release ({ref_ns:.1f} ns, same run); target {TARGET_RATIO} x")


@pytest.mark.benchmark(group=GROUP)
def test_record(benchmark, words):
    """record(words, base, v), same values: ~10 ns more than the closure (two more arguments)."""
    vals = _samples(3000)
    benchmark(_record_loop, words, h.NBUCKETS, vals)
    _per_sample(benchmark, values="lognormal median 3us sigma 0.5")


@pytest.mark.benchmark(group=GROUP)
def test_record_exact_small(benchmark, words):
    """Values below 128 ns (exact buckets)."""
    vals = [v % 128 for v in _samples(60)]
    benchmark(_record_loop, words, h.NBUCKETS, vals)
    _per_sample(benchmark, values="< 128 ns")


@pytest.mark.benchmark(group=GROUP)
def test_record_beyond_table(benchmark, words):
    """Values of 65.5 us and more take the int.bit_length() path (slower; rare)."""
    vals = [v + h.TABLE_LIMIT for v in _samples(200_000)]
    benchmark(_record_loop, words, h.NBUCKETS, vals)
    _per_sample(benchmark, values=">= 65.5 us")


@pytest.mark.benchmark(group=GROUP)
def test_loop_overhead(benchmark, words):
    """The same for-loop with no recording: what every per-sample figure above includes."""
    vals = _samples(3000)
    benchmark(_empty_loop, words, h.NBUCKETS, vals)
    _per_sample(benchmark)


@pytest.mark.benchmark(group="bulk")
def test_summarize_full_histogram(benchmark):
    counts = np.random.default_rng(1).integers(1, 1000, h.NBUCKETS).astype(np.int64)
    s = benchmark(h.summarize, counts)
    assert s.count == counts.sum() and s.min == 0 and s.max == h.MAX_VALUE


@pytest.mark.benchmark(group="bulk")
def test_bucket_indices_1m(benchmark):
    vals = np.random.default_rng(2).lognormal(9, 2, 1_000_000).astype(np.int64)
    idx = benchmark(h.bucket_indices, vals)
    assert idx.shape == vals.shape


@pytest.mark.benchmark(group="bulk")
def test_record_many_1m(benchmark):
    vals = np.random.default_rng(3).lognormal(9, 2, 1_000_000).astype(np.int64)
    counts = np.zeros(h.NBUCKETS, dtype=np.int64)
    benchmark(h.record_many, counts, vals)
    assert counts.sum() % len(vals) == 0
