"""The clock every latency is read from, and the measured cost of reading it.

``now()`` is ``time.perf_counter_ns``: on Linux CPython implements it with
``clock_gettime(CLOCK_MONOTONIC)`` (``time.get_clock_info('perf_counter')`` says so, and
:func:`calibrate` reports what it says). CLOCK_MONOTONIC is one system-wide clock, so readings
taken by different processes on different CPUs can be subtracted from one another; it is read
through the vDSO, without a system call, on the TSC or whatever clocksource the kernel uses.

A timed region ``t0 = now(); op(); t1 = now()`` measures ``op`` plus one clock read: the
overhead :func:`calibrate` measures as the difference of back-to-back reads. Results report
it; callers may subtract it.
"""
from __future__ import annotations

import time
from typing import NamedTuple

__all__ = ["now", "ClockInfo", "calibrate"]

now = time.perf_counter_ns
_NOW_NAME = "perf_counter"      # what time.get_clock_info() calls the clock behind now()


class ClockInfo(NamedTuple):
    """What clock latencies come from and what one reading of it costs (ns)."""
    source: str                 # e.g. 'clock_gettime(CLOCK_MONOTONIC)'
    resolution_ns: float        # as the OS reports it (clock_getres)
    read_overhead_ns: int       # median difference of two back-to-back now() calls
    read_overhead_p99_ns: int   # 99th percentile of the same differences
    monotonic: bool             # the OS says so and no measured difference was negative


def calibrate(samples: int = 20000) -> ClockInfo:
    """Measure the cost of reading the clock from ``samples`` back-to-back pairs of reads."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    info = time.get_clock_info(_NOW_NAME)
    clock = now
    diffs = [0] * samples
    for _ in range(min(samples, 1000)):     # warm up: code paths, caches, CPU frequency
        clock()
    for i in range(samples):
        t0 = clock()
        t1 = clock()
        diffs[i] = t1 - t0
    diffs.sort()
    return ClockInfo(
        source=info.implementation,
        resolution_ns=info.resolution * 1e9,
        read_overhead_ns=diffs[(samples - 1) // 2],
        read_overhead_p99_ns=diffs[min(samples - 1, -(-99 * samples // 100) - 1)],
        monotonic=bool(info.monotonic) and diffs[0] >= 0,
    )
