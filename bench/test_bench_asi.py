"""Micro-benchmarks of ASI: translation (TLB hit), a full 4-level walk, asi_exit + asi_enter,
page fault and retry, the core-buffer flush, and a TLB shootdown to a CPU in another process.

Run with ``python -m pytest bench/test_bench_asi.py --benchmark-enable -p no:cacheprovider``.

Targets (issue #3), medians, checked when benchmarks are enabled. The machine is shared and
noisy, so each target is a ratio to a reference measured in the same run, one reference round
before each benchmark round (pytest-benchmark's ``setup``): the two interleave and see the same
load. The absolute targets they stand for:

- translation with a TLB hit <= 250 ns: <= 2.5 POSIX-semaphore acquire+release pairs, which
  DESIGN.md measured at ~0.1 us on the development machine (``ASIRT_TLB_HIT_RATIO``);
- a full walk <= 1.5 us: <= 15 such pairs (``ASIRT_WALK_RATIO``);
- an asi_enter + asi_exit round trip without a flush <= 1 us. That metric is now
  ``asi_exit_enter`` and includes a flush: the HOST period between exit and re-entry taints
  KERNEL, so every re-entry flushes (asirt.cpu.state; workers/asi.py). The target is the
  switch pair's 1 us on top of the flush, against the flush alone (the same ``flush()``, back
  to back, 32 KiB): 1 us over a ~2 us flush is 1.5x (``ASIRT_EXIT_ENTER_FLUSH_RATIO``).

The fault, flush and shootdown benchmarks report only. The table shows rounds: CALLS calls in
a loop for the fast ones (``extra_info["median_ns"]`` is per call, and is what the ratios are
taken of, with the reference's per-call median beside it); fault and shootdown need a setup
per call, so their rounds are single calls and include one clock read.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import pytest

from asirt.clock import now
from asirt.mm.spaces import AddressSpaces, AsiClassId
from asirt.mm.memclass import MemClass
from shm_layout.header import STOP_WORD
from tests.fixtures import asi_handles, counter, cpu_region

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TLB_HIT_RATIO = float(os.environ.get("ASIRT_TLB_HIT_RATIO", "2.5"))
WALK_RATIO = float(os.environ.get("ASIRT_WALK_RATIO", "15"))
EXIT_ENTER_FLUSH_RATIO = float(os.environ.get("ASIRT_EXIT_ENTER_FLUSH_RATIO", "1.5"))
CALLS, ROUNDS = 1000, 200    # fast operations: a round is CALLS calls in a loop, so the
                             # clock's cost is spread over them; medians are per call
SLOW_CALLS = 100             # per round, for the operations that flush


def _calls(fn, args, n=range(CALLS)):
    """CALLS calls of fn(*args) in a plain loop: one benchmark round."""
    for _ in n:
        fn(*args)


class _Reference:
    """A reference round, timed before each benchmark round (pass it as ``setup``): ``calls``
    calls of ``fn`` in a loop; its per-call median is what a target ratio divides by."""

    def __init__(self, fn: Callable[[], None], calls: int) -> None:
        self.fn, self.calls, self.ns = fn, range(calls), []

    def __call__(self) -> None:
        fn = self.fn
        t0 = now()
        for _ in self.calls:
            fn()
        self.ns.append((now() - t0) / len(self.calls))

    @property
    def rounds(self) -> int:
        return len(self.ns)


def _sem_pair(region) -> Callable[[], None]:
    """One acquire+release of an uncontended POSIX semaphore (DESIGN.md: ~0.1 us)."""
    sem = region.semaphore("bench_reference", 1)
    acquire, release = sem.acquire, sem.release

    def pair() -> None:
        acquire(0)
        release()
    return pair


def _median_ns(benchmark, per_round: int = 1) -> float | None:
    if benchmark.stats is None:
        return None
    ns = benchmark.stats.stats.median * 1e9 / per_round
    benchmark.extra_info["median_ns"] = round(ns, 1)
    return ns


def _check_ratio(benchmark, per_round: int, ref: _Reference, what: str, target: float) -> None:
    """The benchmark's per-call median over the reference's, against ``target`` (only when
    benchmarks are enabled: a disabled run times one round, which means nothing)."""
    ns = _median_ns(benchmark, per_round)
    if ns is None:
        return
    ref_ns = statistics.median(ref.ns)
    ratio = ns / ref_ns
    benchmark.extra_info.update({f"{what}_median_ns": round(ref_ns, 1),
                                 f"ratio_to_{what}": round(ratio, 3), "target_ratio": target})
    assert ratio <= target, (f"median {ns:.0f} ns = {ratio:.2f} x the {what} "
                             f"({ref_ns:.0f} ns, same run); target {target} x")


@pytest.fixture
def vm():
    """(cpu handle, kvm instance of domain 1, pages, region) on CPU slot 0, inside the
    instance."""
    with cpu_region(2, asi=True, frames=64, tables=64) as region:
        k = AddressSpaces(region)
        try:
            inst = k.asi_init(1, AsiClassId.KVM)
            pages = {"global": k.alloc_page(MemClass.GLOBAL),
                     "sensitive": k.alloc_page(MemClass.SENSITIVE),
                     "local": k.alloc_page(MemClass.LOCAL, 1)}
            with asi_handles(region, 0) as (cpu,):
                cpu.asi_enter(inst)
                yield cpu, inst, pages, region
        finally:
            k.close()


@pytest.mark.benchmark(group="asi")
def test_walk_tlb_hit(benchmark, vm):
    cpu, _, pages, region = vm
    va = pages["global"]
    assert cpu.translate(va)
    ref = _Reference(_sem_pair(region), CALLS)
    benchmark.pedantic(_calls, (cpu.translate, (va,)), setup=ref, rounds=ROUNDS)
    assert counter(cpu.cpu, "asi.tlb_misses") == 1       # every other call hit
    _check_ratio(benchmark, CALLS, ref, "semaphore_pair", TLB_HIT_RATIO)


@pytest.mark.benchmark(group="asi")
def test_walk_full(benchmark, vm):
    cpu, inst, pages, region = vm
    root = int(cpu.insts["root"][inst])
    assert cpu.pt.walk(root, pages["local"])
    ref = _Reference(_sem_pair(region), CALLS)
    benchmark.pedantic(_calls, (cpu.pt.walk, (root, pages["local"])), setup=ref,
                       rounds=ROUNDS)
    _check_ratio(benchmark, CALLS, ref, "semaphore_pair", WALK_RATIO)


@pytest.mark.benchmark(group="asi")
def test_asi_exit_enter(benchmark, vm):
    """asi_exit and asi_enter back, against the flush alone; both flush every time (the
    re-entry because the HOST period between tainted KERNEL)."""
    cpu, inst, _, _ = vm
    flushes = counter(cpu.cpu, "asi.flushes")

    def round_trips(leave=cpu.asi_exit, enter=cpu.asi_enter, n=range(SLOW_CALLS)):
        for _ in n:
            leave()
            enter(inst)

    ref = _Reference(cpu.flush, SLOW_CALLS)
    benchmark.pedantic(round_trips, setup=ref, rounds=ROUNDS)
    # every re-entry flushed, and so did every reference call: nothing else did
    assert counter(cpu.cpu, "asi.flushes") - flushes == 2 * SLOW_CALLS * ref.rounds
    assert cpu.current == inst and cpu.state.taint == 0
    _check_ratio(benchmark, SLOW_CALLS, ref, "flush", EXIT_ENTER_FLUSH_RATIO)


@pytest.mark.benchmark(group="asi")
def test_fault_retry(benchmark, vm):
    """Inside the VM's space, load a sensitive page: fault, asi_exit, full walk, load."""
    cpu, inst, pages, _ = vm
    secret = pages["sensitive"]
    faults, entries = counter(cpu.cpu, "asi.faults"), []

    def enter() -> None:                  # untimed: back inside (it flushes)
        entries.append(1)
        cpu.asi_enter(inst)

    benchmark.pedantic(cpu.access, (secret,), setup=enter, rounds=2000, warmup_rounds=10)
    assert counter(cpu.cpu, "asi.faults") - faults == len(entries)   # each call faulted
    _median_ns(benchmark)


@pytest.mark.benchmark(group="asi")
def test_flush(benchmark, vm):
    """Clear the core buffer and evict one L1D of lines (the fixture's: 32 KiB), back to back:
    the eviction buffer stays hot, so this is the best case (workers/asi.py times a cold one)."""
    cpu, _, _, _ = vm
    before = counter(cpu.cpu, "buffer.flushes")
    benchmark.pedantic(_calls, (cpu.flush, ()), kwargs={"n": range(SLOW_CALLS)},
                       rounds=ROUNDS)
    assert (counter(cpu.cpu, "buffer.flushes") - before) % SLOW_CALLS == 0
    benchmark.extra_info["l1d_bytes"] = cpu.cpu.buffer.l1d_bytes
    _median_ns(benchmark, SLOW_CALLS)


_SERVICER = r"""
import sys, time
from shm_layout import Region
from shm_layout.header import STOP_WORD
from asirt.cpu import Cpu
from asirt.mm.asi import Asi
from asirt.params import CpuParams
r = Region.attach(sys.argv[1])
cpu = Cpu(r, 1, CpuParams(oversubscribed=True))
a = Asi(r, cpu)
try:
    a.online()
    a.asi_enter(int(sys.argv[2]))
    if sys.argv[3] == "0":
        a.asi_exit()           # it used the PCID and left: it flushes lazily, at its next entry
    r.words[r.word_index("slots", 1, "progress")] = 1
    end = time.monotonic() + 120
    while not r.words[STOP_WORD] and time.monotonic() < end:
        cpu.safepoint()        # where the TLB answers shootdowns
finally:
    a.offline()
    a.close()
    cpu.close()
    r.close()
"""


@pytest.mark.benchmark(group="asi")
@pytest.mark.parametrize("inside", [0, 1], ids=["nobody-inside", "one-cpu-inside"])
def test_shootdown(benchmark, inside):
    """Unmap a page from the VM's tree and wait for the CPUs inside to flush. Another process,
    CPU slot 1, calls its safe point in a loop (a spin-transport IPI): inside the instance
    (each unmap sends it a flush request and waits), or back in the full tree after using it
    (no request: an avoided shootdown)."""
    with cpu_region(2, asi=True, frames=64, tables=64) as region:
        k = AddressSpaces(region)
        proc = None
        try:
            inst = k.asi_init(1, AsiClassId.KVM)
            va = k.alloc_page(MemClass.LOCAL, 1)
            k.alloc_page(MemClass.LOCAL, 1)          # keeps the page table from emptying
            proc = subprocess.Popen([sys.executable, "-c", _SERVICER, region.name, str(inst),
                                     str(inside)], cwd=ROOT, stdin=subprocess.DEVNULL)
            ready = region.word_index("slots", 1, "progress")
            end = time.monotonic() + 60
            while not region.words[ready]:
                assert proc.poll() is None and time.monotonic() < end, "servicer died"
                time.sleep(0.01)
            calls = 0

            def remap() -> None:            # untimed, once before each timed unmap
                nonlocal calls
                calls += 1
                cpu.map_restricted(inst, va)

            with asi_handles(region, 0) as (cpu,):
                benchmark.pedantic(cpu.unmap_restricted, (inst, va), setup=remap,
                                   rounds=1000, warmup_rounds=20)
                sent = counter(cpu.cpu, "asi.shootdowns_sent")
                avoided = counter(cpu.cpu, "asi.shootdowns_avoided")
            assert calls >= 1                # 1 with --benchmark-disable (the default)
            assert (sent, avoided) == ((calls, 0) if inside else (0, calls))
            _median_ns(benchmark)
        finally:
            region.words[STOP_WORD] = 1
            if proc is not None:
                try:
                    proc.wait(30)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            k.close()
