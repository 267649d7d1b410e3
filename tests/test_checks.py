"""The checkers of S1-S3: each one on its own in-process (on stun-driven and ASI-driven CPUs),
then each one shown to fail on a deliberately broken protocol under randomized delays (and to
stay silent on the strict one)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from asirt import collect
from asirt.cpu import ASI, GUEST, HOST, IDLE, STUNNED
from asirt.cpu.checks import Monitor, sample_leaks
from asirt.cpu.cpu import ALIVE_FOR_NS
from asirt.mm.spaces import AddressSpaces, AsiClassId
from asirt.mm.memclass import MemClass
from asirt.params import CpuParams
from asirt.proc import Life
from asirt.scenarios.stress import run_stress
from asirt.sync.barrier import Result, SpinBarrier
from shm_layout.cpu import MemClass as TokenClass, make_token
from tests.fixtures import (Background, asi_handles, counter, cpu_region, make_cpus, make_stuns,
                            test_topology)
from tests.test_stun import _dead_pid


def _monitor(r, n):
    """A monitor writing into the last slot (which is no sibling of the core it watches)."""
    return Monitor(r, n, [list(range(n))])


def totals(r) -> dict[str, int]:
    return collect.counters(r)


# -- (b) the monitor, in-process ----------------------------------------------------------------

def test_monitor_finds_s1_and_s2_and_nothing_else():
    with cpu_region(2, ncores=2) as r:           # slots 0,1: the core; 2,3: another
        a, b = make_cpus(r, 2)
        mon = _monitor(r, 2)
        a.state.set(GUEST, 1)
        assert mon.sample() == 0                 # b in ASI(1): same domain
        b.state.set(HOST, 1)
        assert mon.sample() == 1                 # S1
        b.state.set(STUNNED, 1)
        assert mon.sample() == 0
        b.state.set(HOST, 2)
        b.state.set(ASI, 2)
        assert mon.sample() == 1                 # S2
        b.state.set(IDLE, 0)
        assert mon.sample() == 0
        tot = totals(r)
        assert (tot["monitor.s1"], tot["monitor.s2"]) == (1, 1) and tot["monitor.samples"] == 5
        kinds = [(e["kind"], e["source"]) for e in collect.events(r)]
        assert kinds == [("S1", "monitor"), ("S2", "monitor")]


def test_monitor_counts_two_guests_of_different_domains_once():
    with cpu_region(3, ncores=2) as r:
        a, b, c = make_cpus(r, 3)
        mon = Monitor(r, 3, [[0, 1, 2]])
        a.state.set(GUEST, 1)
        b.state.set(HOST, 2)
        b.state.set(GUEST, 2)                    # GUEST(1) beside GUEST(2): one S2
        c.state.set(HOST, 0)
        c.state.set(IDLE, 0)
        assert mon.sample() == 1
        c.state.set(HOST, 2)
        c.state.set(ASI, 2)                      # and ASI(2) beside GUEST(1): one more
        assert mon.sample() == 2
        tot = totals(r)
        assert (tot["monitor.s1"], tot["monitor.s2"]) == (0, 3)
        guests = [(e["guest_slot"], e["other_slot"]) for e in collect.events(r)]
        assert guests == [(0, 1), (0, 1), (0, 2)]


def test_monitor_never_reports_a_torn_snapshot():
    with cpu_region(2, ncores=2) as r:
        a, b = make_cpus(r, 2)
        mon = _monitor(r, 2)
        a.state.set(GUEST, 1)
        # b mid-transition: its seqlock is odd and its words look like HOST
        w = r.words
        w[b.state.i_mseq] += 1
        w[b.state.i_mode] = HOST
        assert mon.sample() == 0
        tot = totals(r)
        assert tot["monitor.samples"] == 0 and tot["monitor.retries"] > 0
        w[b.state.i_mode] = ASI
        w[b.state.i_mseq] += 1
        assert mon.sample() == 0


def test_monitor_ignores_fenced_and_dead_cpus():
    with cpu_region(2, ncores=2, pids=[os.getpid(), _dead_pid()] + [os.getpid()] * 2) as r:
        a, b = make_cpus(r, 2)
        mon = _monitor(r, 2)
        a.state.set(GUEST, 1)
        b.state.set(HOST, 1)                     # b's process is gone: it runs nothing
        assert mon.sample() == 0
    with cpu_region(2, ncores=2) as r:
        a, b = make_cpus(r, 2)
        mon = _monitor(r, 2)
        a.state.set(GUEST, 1)
        b.state.set(HOST, 1)
        a.fence(1, Life.DEAD)                    # fenced by a sibling
        assert mon.sample() == 0


def test_a_dead_lane_stuck_mid_transition_does_not_blind_the_monitor():
    """A worker killed half-way through a transition keeps its seqlock odd forever; the
    monitor must still see an S1 between the live siblings of its core."""
    with cpu_region(3, ncores=2, pids=[os.getpid(), os.getpid(), _dead_pid()]
                    + [os.getpid()] * 3) as r:
        a, b, c = make_cpus(r, 3)
        mon = Monitor(r, 3, [[0, 1, 2]])
        r.words[c.state.i_mseq] += 1             # c died inside a mode change
        a.state.set(GUEST, 1)
        b.state.set(HOST, 1)                     # a real S1 between the live two
        assert mon.sample() == 1
        assert totals(r)["monitor.s1"] == 1


# -- (a) transition-time assertions, in-process --------------------------------------------------

def test_transition_checker_sees_s1_s2_s3_and_measures_its_cost():
    with cpu_region(2) as r:
        a, b = make_cpus(r, 2)
        b.state.set(HOST, 1)
        a.state.enter_guest()                    # GUEST beside HOST: S1, and host data: S3
        assert counter(a, "check.s1") == 1 and counter(a, "check.s3") == 1
        b.state.set(HOST, 2)
        b.state.set(ASI, 2)
        b.state.flush(b.c("stun.flushes"))
        a.state.exit_guest()
        a.state.enter_guest()                    # GUEST(1) beside ASI(2): S2 (and its data: S3)
        assert counter(a, "check.s2") >= 1
        a.state.exit_guest()
        b.state.set(GUEST, 2)
        a.state.set(IDLE, 0)
        a.state.enter_host()                     # HOST beside GUEST: S1 from the HOST side
        assert counter(a, "check.s1") >= 2
        assert counter(a, "check.checks") >= 4 and counter(a, "check.ns") > 0


def test_transition_checker_with_a_real_fence():
    with cpu_region(2) as r:
        a, b = make_cpus(r, 2, CpuParams(check_fence=True, oversubscribed=True))
        b.state.set(HOST, 1)
        a.state.enter_guest()
        assert counter(a, "check.s1") == 1


def test_torn_reads_are_not_reported():
    with cpu_region(2) as r:
        a, b = make_cpus(r, 2)
        b.state.set(GUEST, 2)
        # b half-way from GUEST(2) to IDLE(0): the domain word already 0, the seqlock odd
        w = r.words
        w[b.state.i_mseq] += 1
        w[b.state.i_dom] = 0

        def finish_b():                          # the writer completes its transition
            w[b.state.i_mode] = IDLE
            w[b.state.i_dom] = 0
            w[b.state.i_mseq] += 1
        a.state.set(GUEST, 1)
        t = threading.Timer(0.01, finish_b)
        t.start()
        a.checker.guest_exit()                   # sees (GUEST, 1) torn, confirms under the seqlock
        t.join()
        assert counter(a, "check.s2") == 0


def _returns_promptly(fn, timeout: float = 5.0) -> None:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn.__name__} still waiting after {timeout}s"


def test_a_sibling_stuck_mid_transition_does_not_hang_the_checker():
    """A sibling killed or stopped inside a mode change keeps its seqlock odd for good: the
    assertions give up on a consistent read of it (the monitor covers that instant)."""
    with cpu_region(2) as r:
        a, b = make_cpus(r, 2)
        b.state.set(HOST, 2)
        b.state.set(GUEST, 2)
        r.words[b.state.i_mseq] += 1             # b stopped half-way through its next change
        a.state.set(GUEST, 1)                    # GUEST(1) beside what reads as GUEST(2)
        _returns_promptly(a.checker.guest_exit)
        _returns_promptly(a.checker.host_entry)
        assert counter(a, "check.s2") == 0       # never read consistently: not reported
        assert counter(a, "check.checks") == 2


def test_a_dead_siblings_violations_stop_counting_once_its_death_is_seen():
    """counts() reuses a live answer for ALIVE_FOR_NS; after that a dead sibling (by pidfd:
    a recycled pid cannot revive it) no longer counts."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with cpu_region(2, pids=[os.getpid(), p.pid]) as r:
            a, b = make_cpus(r, 2)
            b.state.enter_guest()
            a.state.enter_host()                 # b in GUEST beside HOST: S1, b alive
            assert counter(a, "check.s1") == 1
            a.state.set(ASI, 1)
            p.kill()
            p.wait()
            time.sleep(2 * ALIVE_FOR_NS / 1e9)
            a.state.enter_host()
            assert counter(a, "check.s1") == 1, "a dead sibling's stale GUEST counted"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_events_are_named_and_ordered():
    with cpu_region(2) as r:
        a, b = make_cpus(r, 2)
        b.state.set(HOST, 1)
        a.state.enter_guest()
        evs = collect.events(r, cpus=[4, 5])
        assert [e["kind"] for e in evs] == ["S1", "S3"]
        assert evs[0]["cpu"] == 4 and evs[0]["other_cpu"] == 5
        assert evs[0]["mode"] == "GUEST" and evs[0]["other_mode"] == "HOST"
        assert evs[1]["saw"].startswith("host data")
        assert evs[0]["ns"] <= evs[1]["ns"]


# -- (c) the guest's sampling of the one core buffer ---------------------------------------------

def test_leak_sampling_reads_the_core_buffer_each_deposit_once():
    with cpu_region(2) as r:
        a, b = make_cpus(r, 2)
        b.state.load(make_token(TokenClass.SENSITIVE, 0, 5))      # host data, a frame's token
        a.state.enter_guest()
        assert sample_leaks(a) == 1 and counter(a, "check.leak_host") == 1
        assert sample_leaks(a) == 0              # the same token: counted once
        b.state.load(make_token(TokenClass.LOCAL, 2, 6))          # another domain's data
        assert sample_leaks(a) == 1 and counter(a, "check.leak_domain") == 1
        b.state.flush(b.c("stun.flushes"))       # flushes the whole core
        b.state.load(make_token(TokenClass.LOCAL, 1, 7))          # a's own domain: no leak
        assert sample_leaks(a) == 0
        assert counter(a, "check.samples") == 4 and counter(a, "check.leaks") == 2


# -- an ASI-driven CPU (no stun) under the same checkers -----------------------------------------

def test_asi_driven_cpus_are_checked_like_any_other():
    """ASI switches modes through the one state writer, so the transition assertions and the
    monitor see its transitions. Without the stun (the ASI class hooks unbound: broken for
    SMT), a sibling's asi_exit beside a guest is S1, and its sensitive load is S3 evidence."""
    with cpu_region(2, asi=True) as r:
        kernel = AddressSpaces(r)
        inst = kernel.asi_init(1, AsiClassId.KVM)
        secret = kernel.alloc_page(MemClass.SENSITIVE)
        with asi_handles(r, 0, 1) as (a, b):
            mon = Monitor(r, 0, [[0, 1]])        # slot 0's counters: a monitor in-process
            for x in (a, b):
                x.asi_enter(inst)
            a.cpu.state.enter_guest()            # a runs the VM's guest
            assert counter(b.cpu, "check.s1") == 0
            b.access(secret)                     # fault, asi_exit: HOST beside a's GUEST
            assert counter(b.cpu, "check.s1") == 1
            assert mon.sample() == 1             # and the monitor sees the same instant
            a.cpu.state.exit_guest()
            before = counter(b.cpu, "asi.flushes")     # (online() started it in HOST: 1)
            b.asi_enter(inst)                    # b's own taints: flushes before re-entry ...
            b.access(secret)
            b.asi_enter(inst)                    # ... every time
            assert counter(b.cpu, "asi.flushes") == before + 2
            b.access(secret)                     # and now leaves its load unflushed
            a.cpu.state.enter_guest()            # VM entry beside host data: S3 evidence
            assert counter(a.cpu, "check.s3") == 1
            assert sample_leaks(a.cpu) >= 1
        kernel.close()


# -- S3 after a fenced sibling -------------------------------------------------------------------

def _dead_requester_in_host(protocol: str):
    """b dies while in HOST with its request active; a, parked for it, times out, fences it,
    and goes on to enter GUEST. Returns a's counters of interest."""
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2, protocol)
        a.cpu.state.enter_guest()
        b.g += 1
        b.w[b.i_gen] = b.g                       # R1
        parked = Background(a.cpu.safepoint)     # a parks, acks
        b.wait_acks()
        b.enter_host()                           # ... and b "dies" in HOST:
        r.words[r.word_index("slots", 1, "pid")] = _dead_pid()
        a.cpu.procs[1] = None
        assert parked.result(timeout=20) is True # a's P1 wait fences the dead requester
        assert a.cpu.fenced_mask == 0b10
        assert SpinBarrier(a).enter(2_000_000_000) == Result.OK
        return counter(a.cpu, "check.s3"), counter(a.cpu, "barrier.flushes"), sample_leaks(a.cpu)


def test_a_fenced_requesters_host_data_is_flushed_before_the_next_guest():
    s3, flushes, leaks = _dead_requester_in_host("strict")
    assert flushes == 1, "the fencer must flush what the dead lane left"
    assert s3 == 0 and leaks == 0


def test_without_that_flush_the_checkers_see_the_dead_lanes_data():
    """The same run under a protocol that never flushes: the dead requester's open HOST period
    must still count as dirty (a fenced lane's period is visible until a flush covers it)."""
    s3, flushes, leaks = _dead_requester_in_host("noflush")
    assert flushes == 0 and s3 == 1 and leaks >= 1


# -- every checker fails on a broken protocol under randomized delays ---------------------------

STRESS = dict(transitions=15_000, seed=11)


def _stress(protocol: str, **kw):
    e = run_stress(test_topology(), protocol, **STRESS, **kw)
    assert e.failures == [], e.failures
    assert not e.extra["liveness"], e.extra["liveness"]
    return e


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_strict_shows_zero_on_every_checker():
    # Inside the test, not a module fixture: the per-test leak check must see this run too.
    strict = run_stress(test_topology(), "strict", **STRESS)
    assert strict.failures == [] and strict.problems == []
    c = strict.counters
    assert c["violations"] == 0, strict.violations[:3]
    assert c["monitor.samples"] > 100            # the monitor did look
    assert c["check.samples"] > 100              # the guests did sample the buffer
    assert strict.extra["check_cost"]["checks"] > 0
    assert strict.extra["check_cost"]["mean_ns"] > 0


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_transition_assertions_catch_naive_stun():
    e = _stress("naive", monitor=False)
    assert e.counters["check.s1"] > 0
    assert any(v["source"] == "transition" and v["kind"] == "S1" for v in e.violations)


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_monitor_alone_catches_naive_stun():
    e = _stress("naive", check=False)            # no transition-time assertions at all
    assert e.counters["check.s1"] == 0 and e.counters["monitor.s1"] > 0
    assert any(v["source"] == "monitor" for v in e.violations)


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_buffer_checks_catch_a_missing_flush():
    e = _stress("noflush")
    assert e.counters["check.leaks"] > 0         # (c) the guests' buffer sampling
    assert e.counters["check.s3"] > 0            # (a) S3 at VM entry
    assert e.counters["check.s1"] == 0           # the stun itself is still strict


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_buffer_checks_catch_a_release_before_the_flush():
    """The model's own S3 mutation (R7 before R6): invisible to any check that reads the
    protocol's bookkeeping, caught by the buffer's evidence."""
    e = _stress("lateflush")
    assert e.counters["check.s3"] + e.counters["check.leaks"] > 0
    assert e.counters["check.s1"] == 0


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_checkers_catch_a_missing_barrier():
    e = _stress("nobarrier")
    c = e.counters
    assert c["check.s1"] + c["check.s2"] + c["check.s3"] > 0
    assert c["monitor.s1"] + c["monitor.s2"] > 0


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_fenced_assertions_strict_zero_naive_caught():
    s = _stress("strict", check_fence=True, monitor=False)
    n = _stress("naive", check_fence=True, monitor=False)
    assert s.counters["violations"] == 0 and n.counters["check.s1"] > 0
