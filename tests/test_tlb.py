"""PCID/TLB: hits and misses, switches without flushes, lazy flushes, shootdowns in-process
(threads) and across real processes; the TLB answers at its CPU's safe point, and a CPU that
sends a shootdown waits with its CPU's waiter, answering at its own safe point meanwhile."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from asirt import fence as fence_mod
from asirt.mm import tlb as tlb_mod
from asirt.mm.asi import Asi
from asirt.mm.spaces import AddressSpaces, AsiClassId, parent_counters
from asirt.mm.memclass import MemClass
from asirt.mm.pagetable import PRESENT
from shm_layout.cpu import Phase
from shm_layout.header import STOP_WORD
from shm_layout.region import list_leftovers
from tests.fixtures import Background, asi_handles, counter, cpu_region

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVM = AsiClassId.KVM


def _seen(a: Asi, pcid: int) -> int:
    return a.q[a.tlb.seen + pcid]


def _gen(a: Asi, inst: int) -> int:
    return int(a.insts["gen"][inst])


def _count(a: Asi, name: str) -> int:
    return counter(a.cpu, f"asi.{name}")


def test_hit_after_miss(kernel, cpu0):
    g = kernel.alloc_page(MemClass.GLOBAL)
    assert cpu0.translate(g) == cpu0.translate(g) != 0
    assert _count(cpu0, "tlb_misses") == 1


def test_switching_trees_keeps_entries_while_generations_are_current(kernel, cpu0):
    vm = kernel.asi_init(1, KVM)
    g, mine = kernel.alloc_page(MemClass.GLOBAL), kernel.alloc_page(MemClass.LOCAL, 1)
    cpu0.asi_enter(vm)
    cpu0.translate(mine)
    cpu0.asi_exit()
    cpu0.translate(g)
    flushes, misses = _count(cpu0, "tlb_flushes"), _count(cpu0, "tlb_misses")
    for _ in range(5):
        cpu0.asi_enter(vm)
        assert cpu0.translate(mine)
        cpu0.asi_exit()
        assert cpu0.translate(g)
    assert (_count(cpu0, "tlb_flushes"), _count(cpu0, "tlb_misses")) == (flushes, misses)


def test_a_cpu_outside_flushes_lazily_at_its_next_enter(kernel, cpu0):
    vm = kernel.asi_init(1, KVM)
    mine = kernel.alloc_page(MemClass.LOCAL, 1)
    cpu0.asi_enter(vm)
    assert cpu0.translate(mine)
    cpu0.asi_exit()
    kernel.unmap_restricted(vm, mine)             # nobody inside: nobody waited for
    assert parent_counters(kernel.region) == {"asi.shootdowns_sent": 0,
                                              "asi.shootdowns_avoided": 1}
    assert _seen(cpu0, vm) == _gen(kernel, vm) - 1
    flushes = _count(cpu0, "tlb_flushes")
    cpu0.asi_enter(vm)
    assert _seen(cpu0, vm) == _gen(kernel, vm) and _count(cpu0, "tlb_flushes") == flushes + 1
    assert cpu0.translate(mine) == 0


def test_a_stale_entry_never_matches_again_when_the_epoch_wraps(kernel, cpu0):
    vm = kernel.asi_init(1, KVM)
    p, other = kernel.alloc_page(MemClass.LOCAL, 1), kernel.alloc_page(MemClass.LOCAL, 1)
    cpu0.asi_enter(vm)
    assert cpu0.translate(p)
    cpu0.unmap_restricted(vm, p)                   # p's entry is stale: epoch of gen g
    for _ in range(2 ** tlb_mod.EPOCH_BITS - 1):    # to gen g + 32: the same epoch bits again
        cpu0.unmap_restricted(vm, other)
        cpu0.map_restricted(vm, other)
    assert cpu0.translate(p) == 0


def test_a_cpu_inside_uses_its_stale_entry_until_it_answers(kernel, aregion):
    """The shootdown in two halves: after the unmap the CPU inside still hits its stale
    entry (as hardware would), until it reaches a safe point; then the sender is done."""
    vm = kernel.asi_init(1, KVM)
    mine = kernel.alloc_page(MemClass.LOCAL, 1)
    with asi_handles(aregion, 1) as (c1,):
        c1.asi_enter(vm)
        stale = c1.translate(mine)
        with kernel.pt:
            kernel.pt.clear_pte(int(kernel.insts["root"][vm]), mine, vm)
            targets = kernel.shootdowns.prepare([vm])
        assert targets == [(1, vm, _gen(kernel, vm))]
        assert c1.translate(mine) == stale            # not yet flushed
        assert c1.cpu.safepoint() is False            # answers (and changed no mode)
        assert c1.translate(mine) == 0
        kernel.shootdowns.wait(targets)               # returns at once


class _Servicer:
    """CPU ``a`` at its safe point in a loop, in a thread, as a worker between operations."""

    def __init__(self, a: Asi) -> None:
        self.a, self.stop = a, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.a.cpu.safepoint()
            time.sleep(0)

    def __enter__(self) -> "_Servicer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_shootdown_waits_for_the_cpus_inside(kernel, aregion):
    vm = kernel.asi_init(1, KVM)
    mine = kernel.alloc_page(MemClass.LOCAL, 1)
    with asi_handles(aregion, 0, 1) as (c0, c1):
        c1.asi_enter(vm)
        c1.translate(mine)
        with _Servicer(c1):
            c0.unmap_restricted(vm, mine)
        assert _seen(c1, vm) == _gen(kernel, vm) and c1.translate(mine) == 0
        assert (_count(c0, "shootdowns_sent"), _count(c0, "shootdowns_avoided")) == (1, 0)


def test_full_tree_unmaps_reach_every_online_cpu(kernel, aregion):
    vm = kernel.asi_init(1, KVM)
    s = kernel.alloc_page(MemClass.SENSITIVE)
    with asi_handles(aregion, 0, 1) as (c0, c1):
        c1.access(s)                                   # a pcid-0 entry, then into the VM
        c1.asi_enter(vm)
        with _Servicer(c1):
            c0.free_page(s)
        assert _seen(c1, 0) == _gen(kernel, 0)
        c1.asi_exit()
        assert c1.translate(s) == 0
        assert _count(c0, "shootdowns_sent") == 1


def test_a_cpu_that_never_answers_times_out(kernel, aregion, monkeypatch):
    monkeypatch.setattr(tlb_mod, "SHOOTDOWN_TIMEOUT_S", 0.2)
    vm = kernel.asi_init(1, KVM)
    mine = kernel.alloc_page(MemClass.LOCAL, 1)
    with asi_handles(aregion, 1) as (c1,):
        c1.asi_enter(vm)
        with pytest.raises(tlb_mod.ShootdownTimeout, match="CPU slot 1 .*alive but not"):
            kernel.unmap_restricted(vm, mine)
        c1.service()
    assert kernel.verify() == []                   # the unmap itself is complete


def test_a_cpu_senders_wait_times_out_through_its_waiter(kernel, aregion, monkeypatch):
    """A CPU that sends waits with its CPU's waiter: past the ack timeout it counts a slow
    tick (cpu.timeouts) and publishes where it waits, and gives up at the shootdown's deadline,
    back in its main phase."""
    monkeypatch.setattr(tlb_mod, "SHOOTDOWN_TIMEOUT_S", 0.5)     # 25 ack timeouts (FAST)
    vm = kernel.asi_init(1, KVM)
    mine = kernel.alloc_page(MemClass.LOCAL, 1)
    with asi_handles(aregion, 0, 1) as (c0, c1):
        c1.asi_enter(vm)
        phases = []

        def note_phase() -> bool:
            phases.append(c0.cpu.w[c0.cpu.i_phase])
            return False

        c0.cpu.safepoint.register(note_phase)
        with pytest.raises(tlb_mod.ShootdownTimeout, match="CPU slot 1 .*alive but not"):
            c0.unmap_restricted(vm, mine)
        assert counter(c0.cpu, "cpu.timeouts") >= 1 and Phase.SHOOTDOWN in phases
        assert c0.cpu.w[c0.cpu.i_phase] == Phase.MAIN
        c1.cpu.safepoint()
        assert c1.translate(mine) == 0


def test_a_stopped_sibling_inside_is_fenced_not_waited_out():
    """A sibling inside the tree whose process is stopped never answers: the sender checks its
    liveness as the handshake does (found stopped twice: killed, fenced off) instead of
    waiting SHOOTDOWN_TIMEOUT_S and failing (asirt stress --strategy asi --faults stop)."""
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        with cpu_region(2, asi=True, pids=[os.getpid(), stopped.pid]) as region:
            kernel = AddressSpaces(region)
            try:
                vm = kernel.asi_init(1, KVM)
                mine = kernel.alloc_page(MemClass.LOCAL, 1)
                with asi_handles(region, 0, 1) as (c0, c1):
                    c1.asi_enter(vm)
                    assert c1.translate(mine)
                    c0.unmap_restricted(vm, mine)     # c1 never answers: its pid is stopped
                    assert c0.cpu.fenced_mask >> 1 & 1   # (not ShootdownTimeout)
                    assert stopped.wait(5) == -signal.SIGKILL
            finally:
                kernel.close()
    finally:
        if stopped.poll() is None:
            stopped.kill()
            stopped.wait()


def test_a_dead_cpu_still_online_in_its_record_is_not_waited_for():
    """A CPU that died inside a tree stays online there (only it writes its record): a later
    shootdown finds it dead at its first slow tick, before any ack timeout (each shootdown
    into that VM used to wait one out: stress --strategy asi with a stop fault limped)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with cpu_region(2, ncores=2, asi=True) as region:
        kernel = AddressSpaces(region)
        try:
            vm = kernel.asi_init(1, KVM)
            mine = kernel.alloc_page(MemClass.LOCAL, 1)
            with asi_handles(region, 0, 2) as (c0, c2):     # slot 2: another core's CPU
                c2.asi_enter(vm)
                assert c2.translate(mine)
                c2.q[c2.shootdowns.cbase + 2 * tlb_mod.CPU_WORDS + tlb_mod.PID] = dead.pid
                c0.unmap_restricted(vm, mine)
                assert counter(c0.cpu, "cpu.timeouts") == 0
                assert _count(c0, "shootdowns_sent") == 1
        finally:
            kernel.close()


def test_a_shootdown_wait_answers_at_the_senders_safe_point(kernel, aregion):
    """The only thing that makes c1 answer here is another mechanism's answerer on c0's safe
    point: the wait completes because it calls that safe point on every poll."""
    vm = kernel.asi_init(1, KVM)
    mine = kernel.alloc_page(MemClass.LOCAL, 1)
    with asi_handles(aregion, 0, 1) as (c0, c1):
        c1.asi_enter(vm)
        assert c1.translate(mine)
        calls = []

        def answer() -> bool:
            calls.append(1)
            c1.cpu.safepoint()
            return False

        c0.cpu.safepoint.register(answer)
        c0.unmap_restricted(vm, mine)
        assert calls and _seen(c1, vm) == _gen(kernel, vm) and c1.translate(mine) == 0
        assert (_count(c0, "shootdowns_sent"), _count(c0, "shootdowns_avoided")) == (1, 0)


def test_two_cpus_shooting_down_each_other_both_finish(kernel, aregion):
    """Both inside the VM, each unmaps a page and waits for the other to flush, at the same
    time; like a worker, each goes on answering at its safe point once its own unmap is done
    (the one that prepared first may finish first, and the other then still waits for it)."""
    vm = kernel.asi_init(1, KVM)
    a_page, b_page = kernel.alloc_page(MemClass.LOCAL, 1), kernel.alloc_page(MemClass.LOCAL, 1)
    done = threading.Event()
    finished: list[int] = []

    def cpu_loop(c: Asi, page: int) -> None:
        c.unmap_restricted(vm, page)
        finished.append(c.cpu.slot)
        while not done.is_set():
            c.cpu.safepoint()
            time.sleep(0)

    with asi_handles(aregion, 0, 1) as (c0, c1):
        for c in (c0, c1):
            c.asi_enter(vm)
            assert c.translate(a_page) and c.translate(b_page)
        jobs = [Background(lambda: cpu_loop(c0, a_page)),
                Background(lambda: cpu_loop(c1, b_page))]
        try:
            deadline = time.monotonic() + 30
            while (len(finished) < 2 and time.monotonic() < deadline
                   and not any(j.done for j in jobs)):
                time.sleep(0.001)
        finally:
            done.set()
            for j in jobs:
                j.result(30)
        assert sorted(finished) == [0, 1]
        for c in (c0, c1):
            assert c.translate(a_page) == c.translate(b_page) == 0
            assert _seen(c, vm) == _gen(kernel, vm)
            assert _count(c, "shootdowns_sent") == 1
        assert kernel.verify() == []


def _fence_with_held(held: int) -> BaseException | None:
    """fence() with the first ``held`` fence locks taken, as if that many fences had been
    interrupted by a handler: run in a thread, so that a fence that blocks instead of moving
    on to the next lock fails here rather than hanging the test. Returns what it raised."""
    locks = fence_mod._FENCES
    for lock in locks[:held]:
        assert lock.acquire(False)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fence_mod.fence()
        except BaseException as err:  # noqa: BLE001 - returned to the test
            raised.append(err)

    t = threading.Thread(target=run, daemon=True)
    try:
        t.start()
        t.join(10)
        assert not t.is_alive(), f"fence() blocked with {held} fence locks held"
    finally:
        for lock in locks[:held]:
            lock.release()
    assert not any(lock.locked() for lock in locks), "fence() left a lock taken"
    return raised[0] if raised else None


@pytest.mark.parametrize("held", [0, 1, 2, 3])
def test_fence_survives_nesting(held):
    assert _fence_with_held(held) is None


def test_fence_nested_too_deep_fails_instead_of_blocking():
    err = _fence_with_held(len(fence_mod._FENCES))
    assert isinstance(err, AssertionError) and "nested" in str(err)


# -- across processes ---------------------------------------------------------------------
_WALKER = r"""
import sys, time
from shm_layout import Region
from shm_layout.header import STOP_WORD
from asirt.cpu import Cpu
from asirt.mm.asi import Asi
from asirt.params import CpuParams
name, slot, inst, va, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = Region.attach(name)
cpu = Cpu(r, slot, CpuParams(oversubscribed=True))
a = Asi(r, cpu)
w = r.words
done = r.word_index("slots", 0, "ping")
prog, stale = r.word_index("slots", slot, "progress"), r.word_index("slots", slot, "err")
after, unmapped = r.word_index("slots", slot, "samples"), r.word_index("slots", slot, "pong")
deadline = time.monotonic() + 50
try:
    a.online()
    a.asi_enter(inst)
    assert a.translate(va)
    if mode == "lazy":
        a.asi_exit()
    w[prog] = 1
    while not w[STOP_WORD] and time.monotonic() < deadline:
        d = w[done]                         # read before translating: the shootdown was over
        if mode == "lazy":
            if d and not w[after]:
                a.asi_enter(inst)
                w[stale] += a.translate(va) != 0
                w[unmapped] = a.translate(va) == 0
                w[after] = 1
                a.asi_exit()
        else:
            pte = a.translate(va)
            if d:
                w[after] += 1
                w[stale] += pte != 0
            if not pte:
                w[unmapped] = 1
        cpu.safepoint()
        w[prog] += 1
finally:
    a.offline()
    a.close()
    cpu.close()
    r.close()
"""


def _wait(cond, what: str, timeout: float = 40.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_unmap_is_seen_by_walkers_in_other_processes():
    """Two walkers inside the VM's instance translate a page in a loop while a third CPU
    waits outside. The parent unmaps it from the VM's tree: the shootdown waits for the two
    inside; once it has returned, no walker ever translates the page again, and the one
    outside flushes lazily when it re-enters."""
    procs: list[subprocess.Popen] = []
    with cpu_region(2, ncores=2, asi=True) as region:
        k = AddressSpaces(region)
        try:
            vm = k.asi_init(1, KVM)
            va = k.alloc_page(MemClass.LOCAL, 1)
            for slot, mode in ((1, "inside"), (2, "inside"), (3, "lazy")):
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", _WALKER, region.name, str(slot), str(vm), str(va),
                     mode], cwd=ROOT, stdin=subprocess.DEVNULL))
            w = region.words
            word = region.word_index
            _wait(lambda: all(w[word("slots", s, "progress")] > 100 for s in (1, 2))
                  and w[word("slots", 3, "progress")] > 0, "walkers to start")
            k.unmap_restricted(vm, va)
            w[word("slots", 0, "ping")] = 1                       # shootdown complete
            _wait(lambda: all(w[word("slots", s, "samples")] > 200 for s in (1, 2))
                  and w[word("slots", 3, "samples")], "walkers to run after the unmap")
            w[STOP_WORD] = 1
            for p in procs:
                assert p.wait(30) == 0
            slots = region.array("slots")
            assert slots["err"][1:].tolist() == [0, 0, 0], "a stale translation was used"
            assert slots["pong"][1:].tolist() == [1, 1, 1]
            assert parent_counters(region) == {"asi.shootdowns_sent": 2,
                                               "asi.shootdowns_avoided": 1}
            assert k.pt.walk(k.full_root, va) & PRESENT and k.verify() == []   # full tree kept it
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            k.close()
    assert not [lo for lo in list_leftovers() if lo.creator_pid == os.getpid()]
