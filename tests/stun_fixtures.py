"""Shared helpers of the stun, barrier, core-scheduling, invariants and stress tests.

``stun_region(n)`` is an in-process region with the stun sections, whose n "CPUs" are
:class:`StunCpu` handles built in this one process: unit tests drive the steps of the
handshake one by one (a requester that must wait runs in a thread). ``test_topology()`` is
the emulated grouping of this process's CPUs that the multi-process tests run on.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

import pytest

import shm_layout.stun  # noqa: F401 - registers the stun sections
from asirt.barrier import init_core
from asirt.stun import IDLE, StunConfig, StunCpu
from asirt.topology import Topology, read_topology, select_topology
from shm_layout import Region, Section


def test_topology() -> Topology:
    """The usable cores of this host; emulated siblings where there is no SMT."""
    return select_topology(read_topology(), "auto")


test_topology.__test__ = False  # type: ignore[attr-defined]  # not a test


@contextlib.contextmanager
def stun_region(n: int = 2, pids: list[int] | None = None) -> Iterator[Region]:
    """An in-process region for one core of ``n`` lanes (slots 0..n-1); unlinked on exit.
    Every slot's pid is this process's unless ``pids`` says otherwise."""
    r = Region.create([Section("slots", n), Section("cores", 1), Section("metrics", 1),
                       Section("hist", n), Section("stun_cpu", n), Section("stun_buf", n),
                       Section("stun_core", 1), Section("stun_events", n)])
    try:
        slots = r.array("slots")
        for s in range(n):
            slots[s]["cpu"] = s
            slots[s]["pid"] = os.getpid() if pids is None else pids[s]
            r.semaphore(f"wake{s}")
        init_core(r, 0, n)
        yield r
    finally:
        r.close()
        r.unlink()


def cpus(region: Region, n: int, cfg: StunConfig | None = None, domain: int = 1,
         mode: int | None = None) -> list[StunCpu]:
    """One StunCpu per lane, all in ASI(domain) (or IDLE when domain is 0)."""
    from asirt.stun import ASI
    cfg = cfg or StunConfig(oversubscribed=True, ack_timeout_ns=20_000_000,
                            give_up_ns=2_000_000_000)
    m = mode if mode is not None else (ASI if domain else IDLE)
    out = [StunCpu(region, s, list(range(n)), cfg, domain=domain, mode=m) for s in range(n)]
    for c in out:
        c.start()
    return out


class Background:
    """Run ``fn`` in a thread; ``result()`` joins it (with a timeout) and returns its value."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.value: object = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.value = fn()
            except BaseException as err:  # noqa: BLE001 - re-raised in result()
                self.error = err

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 10.0) -> object:
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"background step did not finish in {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()
