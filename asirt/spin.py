"""Spin-then-yield waiting on a word of the region.

Hot loops poll a memoryview word inline (a function call per poll would double the
round trip) and call :func:`wait_slow` only after ``limit`` polls without progress. Past
that point the waiter yields the CPU on every poll, so a run never live-locks when workers
outnumber CPUs or share them with other processes, and it gives up when the parent asks
every worker to stop (a dead or stopped peer is the parent's to detect, never waited for
forever).
"""
from __future__ import annotations

import os
import time

from shm_layout.header import STOP_WORD

#: polls before falling back to yielding: about a millisecond of polling on current CPUs
SPIN_LIMIT = 1 << 14
#: when workers outnumber CPUs a spinning waiter only delays the CPU it waits for
SPIN_LIMIT_OVERSUBSCRIBED = 64


def spin_limit(oversubscribed: bool) -> int:
    return SPIN_LIMIT_OVERSUBSCRIBED if oversubscribed else SPIN_LIMIT


def wait_slow(words: memoryview, idx: int, value: int, timeout_ns: int | None = None) -> bool:
    """Yield between polls until ``words[idx] == value``; False if stopped or timed out first."""
    deadline = None if timeout_ns is None else time.monotonic_ns() + timeout_ns
    sched_yield = os.sched_yield
    while words[idx] != value:
        if words[STOP_WORD]:
            return False
        if deadline is not None and time.monotonic_ns() > deadline:
            return False
        sched_yield()
    return True

