"""What a worker program gets: its attached region, its slot, its typed parameters, and the
helpers every program uses (its pinned CPU, injected delays, histogram recorders).

Layering: workers import shm_layout and asirt's layers (cpu, mm, sync, kvm) and host modules
below them, never the CLI, the scenarios or the orchestrator (tests/test_layering.py).
A program is a module ``workers.<role>`` with ``PARAMS`` (its parameter dataclass, from
asirt.params), an optional ``prepare(ctx) -> object`` run before READY (install signal
handlers there), and ``run(ctx, prepared) -> None``.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from asirt.cpu import Cpu
from asirt.histogram import recorder
from asirt.params import CpuParams, DelayParams
from asirt.sync.barrier import RendezvousBarrier, SpinBarrier, make_barrier
from asirt.sync.corelock import CoreLock
from asirt.sync.stun import Stun
from shm_layout import Region
from shm_layout.header import STOP_WORD


@dataclass
class WorkerContext:
    region: Region
    slot: int                    # index of this worker's slot in the "slots" section
    cpu: int                     # the logical CPU it is pinned to
    role: str
    params: Any                  # the program's PARAMS dataclass (asirt.params)
    metric_names: list[str]      # names of the histogram metrics, in region order
    oversubscribed: bool = False  # the orchestrator's decision for the run
    words: memoryview = field(init=False)
    parent_pid: int = field(default_factory=os.getppid)

    def __post_init__(self) -> None:
        self.words = self.region.words

    def slot_word(self, slot: int, fieldname: str) -> int:
        """int64 word index of a field of any CPU's slot (offsets from SLOT_DTYPE)."""
        return self.region.word_index("slots", slot, fieldname)

    def hist_base(self, metric: str) -> int:
        """Word index of bucket 0 of this worker's histogram for ``metric``."""
        m = self.metric_names.index(metric)
        return self.region.word_index("hist", self.slot * len(self.metric_names) + m)

    def recorder(self, metric: str) -> Callable[[int], None] | None:
        """A histogram recorder for ``metric``, or None when the run does not measure it."""
        if metric not in self.metric_names:
            return None
        return recorder(self.words, self.hist_base(metric))

    def stop_requested(self) -> bool:
        """The parent asked every worker to finish, or the parent died (we were orphaned)."""
        return self.words[STOP_WORD] != 0 or os.getppid() != self.parent_pid

    def cpu_params(self, p: CpuParams) -> CpuParams:
        """``p`` with the run's oversubscription filled in where the parent left it open."""
        if p.oversubscribed is None:
            return replace(p, oversubscribed=self.oversubscribed)
        return p

    def make_cpu(self, p: CpuParams, delay: Callable[[], None] | None = None,
                 mode: int = 0, domain: int = 0) -> Cpu:
        """This worker's pinned CPU (asirt.cpu.Cpu)."""
        return Cpu(self.region, self.slot, self.cpu_params(p), delay, mode, domain)

    def make_stun(self, p: CpuParams, protocol: str, delay: Callable[[], None] | None = None,
                  mode: int = 0, domain: int = 0) -> Stun:
        """This worker's CPU with the stun handshake plugged in (before READY: the signal
        transport's handler is installed here, so that no early IPI is lost)."""
        stun = Stun(self.make_cpu(p, delay, mode, domain), protocol)
        if p.transport == "signal":
            stun.cpu.transport.install_handler()
        return stun

    @contextlib.contextmanager
    def running(self, stun: Stun, barrier: str) -> Iterator[SpinBarrier | RendezvousBarrier]:
        """The run of a stun-driven CPU: its VM-entry barrier (recording ``barrier_wait``)
        over the CPU, started; on the way out, its progress published and everything closed."""
        cpu = stun.cpu
        lock = CoreLock(cpu) if barrier == "rendezvous" else None
        cpu.start()
        try:
            yield make_barrier(barrier, stun, lock, self.recorder("barrier_wait"))
        finally:
            cpu.transport.steady = False
            cpu.publish_progress()
            if lock is not None:
                lock.close()
            cpu.close()

    def rng(self, seed: int) -> random.Random:
        """A per-worker random stream: the same seed gives every worker its own sequence."""
        return random.Random(seed * 1000003 + self.slot)


def make_delay(rng: random.Random, p: DelayParams) -> Callable[[], None]:
    """The injected delay: at each protocol step, maybe yield the CPU, maybe sleep a while."""
    r, sleep, sched_yield = rng.random, time.sleep, os.sched_yield
    max_sleep = p.max_sleep_us / 1e6
    p_sleep, edge = p.p_sleep, p.p_sleep + p.p_yield

    def delay() -> None:
        x = r()
        if x < p_sleep:
            sleep(r() * max_sleep)
        elif x < edge:
            sched_yield()
    return delay
