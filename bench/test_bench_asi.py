"""Micro-benchmarks of ASI: translation (TLB hit), a full 4-level walk, asi_enter+asi_exit,
page fault and retry, the core-buffer flush, and a TLB shootdown to a CPU in another process.

Run with ``python -m pytest bench/test_bench_asi.py --benchmark-enable -p no:cacheprovider``.

Targets (issue #3), checked when benchmarks are enabled, medians: translation with a TLB hit
<= 250 ns, a full walk <= 1.5 us, an asi_enter + asi_exit round trip without a flush <= 1 us
(override with ASIRT_TLB_HIT_TARGET_NS, ASIRT_WALK_TARGET_NS, ASIRT_ENTER_EXIT_TARGET_NS).
The fault, flush and shootdown benchmarks report only. The table shows rounds: CALLS calls
in a loop for the fast ones (``extra_info["median_ns"]`` is per call, and is what the
targets are checked against); fault and shootdown need a setup per call, so their rounds are
single calls and include one clock read.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from asirt.asi import Asi, AsiClassId
from asirt.memclass import MemClass
from shm_layout.header import STOP_WORD
from tests.asi_fixtures import asi_region, handles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TLB_HIT_NS = float(os.environ.get("ASIRT_TLB_HIT_TARGET_NS", "250"))
WALK_NS = float(os.environ.get("ASIRT_WALK_TARGET_NS", "1500"))
ENTER_EXIT_NS = float(os.environ.get("ASIRT_ENTER_EXIT_TARGET_NS", "1000"))
CALLS, ROUNDS = 1000, 200    # fast operations: a round is CALLS calls in a loop, so the
                             # clock's cost is spread over them; medians are per call


def _calls(fn, args, n=range(CALLS)):
    """CALLS calls of fn(*args) in a plain loop: one benchmark round."""
    for _ in n:
        fn(*args)


def _median_ns(benchmark, target_ns: float | None = None, per_round: int = 1) -> float | None:
    if benchmark.stats is None:
        return None
    ns = benchmark.stats.stats.median * 1e9 / per_round
    benchmark.extra_info["median_ns"] = round(ns, 1)
    if target_ns is not None:
        benchmark.extra_info["target_ns"] = target_ns
        assert ns <= target_ns, f"median {ns:.0f} ns, target {target_ns:.0f} ns"
    return ns


@pytest.fixture
def vm():
    """(cpu handle, kvm instance of domain 1, pages) on CPU slot 0, inside the instance."""
    with asi_region(ncpus=2, frames=64, tables=64) as region:
        k = Asi(region)
        try:
            inst = k.asi_init(1, AsiClassId.KVM)
            pages = {"global": k.alloc_page(MemClass.GLOBAL),
                     "sensitive": k.alloc_page(MemClass.SENSITIVE),
                     "local": k.alloc_page(MemClass.LOCAL, 1)}
            with handles(region, 0) as (cpu,):
                cpu.asi_enter(inst)                 # the first entry flushes; later ones don't
                yield cpu, inst, pages
        finally:
            k.close()


@pytest.mark.benchmark(group="asi")
def test_walk_tlb_hit(benchmark, vm):
    cpu, _, pages = vm
    va = pages["global"]
    assert cpu.translate(va)
    benchmark.pedantic(_calls, (cpu.translate, (va,)), rounds=ROUNDS)
    assert cpu.stat("tlb_misses") == 1
    _median_ns(benchmark, TLB_HIT_NS, CALLS)


@pytest.mark.benchmark(group="asi")
def test_walk_full(benchmark, vm):
    cpu, inst, pages = vm
    root = int(cpu.insts["root"][inst])
    assert cpu.pt.walk(root, pages["local"])
    benchmark.pedantic(_calls, (cpu.pt.walk, (root, pages["local"])), rounds=ROUNDS)
    _median_ns(benchmark, WALK_NS, CALLS)


@pytest.mark.benchmark(group="asi")
def test_asi_enter_exit(benchmark, vm):
    cpu, inst, _ = vm
    flushes = cpu.stat("flushes")

    def round_trips(enter=cpu.asi_enter, leave=cpu.asi_exit, n=range(CALLS)):
        for _ in n:
            enter(inst)
            leave()

    cpu.asi_exit()
    benchmark.pedantic(round_trips, rounds=ROUNDS)
    assert cpu.stat("flushes") == flushes           # nothing to flush: no flush happened
    _median_ns(benchmark, ENTER_EXIT_NS, CALLS)


@pytest.mark.benchmark(group="asi")
def test_fault_retry(benchmark, vm):
    """Inside the VM's space, load a sensitive page: fault, asi_exit, full walk, load."""
    cpu, inst, pages = vm
    secret = pages["sensitive"]
    benchmark.pedantic(cpu.access, (secret,), setup=lambda: cpu.asi_enter(inst),
                       rounds=2000, warmup_rounds=10)
    _median_ns(benchmark)


@pytest.mark.benchmark(group="asi")
def test_flush(benchmark, vm):
    """Clear the core buffer and evict one L1D of lines (the fixture's: 32 KiB), back to back:
    the eviction buffer stays hot, so this is the best case (workers/asi.py times a cold one)."""
    cpu, _, _ = vm
    benchmark.pedantic(_calls, (cpu.flush, ()), kwargs={"n": range(CALLS // 10)},
                       rounds=ROUNDS)
    benchmark.extra_info["l1d_bytes"] = cpu.buf.l1d_bytes
    _median_ns(benchmark, None, CALLS // 10)


_SERVICER = r"""
import sys, time
import shm_layout.asi
from shm_layout import Region
from shm_layout.header import STOP_WORD
from asirt.asi import Asi
r = Region.attach(sys.argv[1])
a = Asi(r, 1)
try:
    a.online()
    a.asi_enter(int(sys.argv[2]))
    if sys.argv[3] == "0":
        a.asi_exit()           # it used the PCID and left: it flushes lazily, at its next entry
    r.words[r.word_index("slots", 1, "progress")] = 1
    end = time.monotonic() + 120
    while not r.words[STOP_WORD] and time.monotonic() < end:
        a.service()
finally:
    a.offline()
    a.close()
    r.close()
"""


@pytest.mark.benchmark(group="asi")
@pytest.mark.parametrize("inside", [0, 1], ids=["nobody-inside", "one-cpu-inside"])
def test_shootdown(benchmark, inside):
    """Unmap a page from the VM's tree and wait for the CPUs inside to flush. Another process,
    CPU slot 1, polls service() in a loop (a spin-transport IPI): inside the instance (each
    unmap sends it a flush request and waits), or back in the full tree after using it (no
    request: an avoided shootdown)."""
    with asi_region(ncpus=2, frames=64, tables=64) as region:
        k = Asi(region)
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

            with handles(region, 0) as (cpu,):
                benchmark.pedantic(cpu.unmap_restricted, (inst, va), setup=remap,
                                   rounds=1000, warmup_rounds=20)
                sent, avoided = cpu.stat("shootdowns_sent"), cpu.stat("shootdowns_avoided")
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
