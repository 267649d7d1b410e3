"""The checkers of S1-S3: each one on its own in-process, then each one shown to fail on a
deliberately broken protocol under randomized delays (and to stay silent on the strict one)."""
from __future__ import annotations

import os
import threading

import pytest

from asirt import invariants
from asirt.invariants import EventRing, Monitor, TransitionChecker
from asirt.stun import ASI, GUEST, HOST, IDLE, STUNNED, StunConfig
from asirt.stun_scenario import run_stress
from shm_layout.stun import COUNTER
from tests.stun_fixtures import cpus, stun_region, test_topology


def counter(cpu, name: str) -> int:
    return cpu.w[cpu.cnt + COUNTER[name]]


# -- (b) the monitor, in-process ----------------------------------------------------------------

def _monitor(r, n):
    """A monitor writing into the last slot (which is no sibling of the core it watches)."""
    return Monitor(r, n, [list(range(n))])


def test_monitor_finds_s1_and_s2_and_nothing_else():
    with stun_region(3) as r:
        a, b = cpus(r, 2)                        # slot 2 is the monitor's
        mon = _monitor(r, 2)
        a._set(GUEST, 1)
        assert mon.sample() == 0                 # b in ASI(1): same domain
        b._set(HOST, 1)
        assert mon.sample() == 1                 # S1
        b._set(STUNNED, 1)
        assert mon.sample() == 0
        b._set(HOST, 2)
        b._set(ASI, 2)
        assert mon.sample() == 1                 # S2
        b._set(IDLE, 0)
        assert mon.sample() == 0
        tot = invariants.counters(r)
        assert (tot["m_s1"], tot["m_s2"]) == (1, 1) and tot["m_samples"] == 5
        kinds = [(e["kind"], e["source"]) for e in invariants.events(r)]
        assert kinds == [("S1", "monitor"), ("S2", "monitor")]


def test_monitor_counts_two_guests_of_different_domains_once():
    with stun_region(4) as r:
        a, b, c = cpus(r, 3)                     # slot 3 is the monitor's
        mon = Monitor(r, 3, [[0, 1, 2]])
        a._set(GUEST, 1)
        b._set(HOST, 2)
        b._set(GUEST, 2)                         # GUEST(1) beside GUEST(2): one S2
        c._set(HOST, 0)
        c._set(IDLE, 0)
        assert mon.sample() == 1
        c._set(HOST, 2)
        c._set(ASI, 2)                           # and ASI(2) beside GUEST(1): one more
        assert mon.sample() == 2
        tot = invariants.counters(r)
        assert (tot["m_s1"], tot["m_s2"]) == (0, 3)
        guests = [(e["guest_slot"], e["other_slot"]) for e in invariants.events(r)]
        assert guests == [(0, 1), (0, 1), (0, 2)]


def test_monitor_never_reports_a_torn_snapshot():
    with stun_region(3) as r:
        a, b = cpus(r, 2)
        mon = _monitor(r, 2)
        a._set(GUEST, 1)
        # b mid-transition: its seqlock is odd and its words look like HOST
        w = r.words
        w[b.i_mseq] += 1
        w[b.i_mode] = HOST
        assert mon.sample() == 0
        tot = invariants.counters(r)
        assert tot["m_retries"] == Monitor.MAX_RETRIES and tot["m_samples"] == 0
        w[b.i_mode] = ASI
        w[b.i_mseq] += 1
        assert mon.sample() == 0


def test_monitor_ignores_fenced_and_dead_cpus():
    from tests.test_stun import _dead_pid
    with stun_region(3, pids=[os.getpid(), _dead_pid(), os.getpid()]) as r:
        a, b = cpus(r, 2)
        mon = _monitor(r, 2)
        a._set(GUEST, 1)
        b._set(HOST, 1)                          # b's process is gone: it runs nothing
        assert mon.sample() == 0
    with stun_region(3) as r:
        a, b = cpus(r, 2)
        mon = _monitor(r, 2)
        a._set(GUEST, 1)
        b._set(HOST, 1)
        a.fence(1, "dead")                       # fenced by a sibling
        assert mon.sample() == 0


# -- (a) transition-time assertions, in-process --------------------------------------------------

def test_transition_checker_sees_s1_s2_s3_and_measures_its_cost():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        b._set(HOST, 1)
        a.enter_guest()                          # GUEST beside HOST: S1, and host data: S3
        assert counter(a, "v_s1") == 1 and counter(a, "v_s3") == 1
        b._set(HOST, 2)
        b._set(ASI, 2)
        b.flush()
        a.exit_guest()
        a.enter_guest()                          # GUEST(1) beside ASI(2): S2
        assert counter(a, "v_s2") >= 1
        a.exit_guest()
        b._set(GUEST, 2)
        a._set(IDLE, 0)
        a.enter_host()                           # HOST beside GUEST: S1 from the HOST side
        assert counter(a, "v_s1") >= 2
        assert counter(a, "checks") >= 4 and counter(a, "check_ns") > 0


def test_transition_checker_with_a_real_fence():
    with stun_region(2) as r:
        a, b = cpus(r, 2, StunConfig(check_fence=True, oversubscribed=True))
        b._set(HOST, 1)
        a.enter_guest()
        assert counter(a, "v_s1") == 1


def test_torn_reads_are_not_reported():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        b._set(GUEST, 2)
        # b half-way from GUEST(2) to IDLE(0): the domain word already 0, the seqlock odd
        w = r.words
        w[b.i_mseq] += 1
        w[b.i_dom] = 0
        chk = TransitionChecker(a, EventRing(r, 0))

        def finish_b():                          # the writer completes its transition
            w[b.i_mode] = IDLE
            w[b.i_dom] = 0
            w[b.i_mseq] += 1
        a._set(GUEST, 1)
        t = threading.Timer(0.01, finish_b)
        t.start()
        chk.guest_exit()                         # sees (GUEST, 1) torn, confirms under the seqlock
        t.join()
        assert counter(a, "v_s2") == 0


def _returns_promptly(fn, timeout: float = 5.0) -> None:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn.__name__} still waiting after {timeout}s"


def test_a_sibling_stuck_mid_transition_does_not_hang_the_checker():
    """A sibling killed or stopped inside ``_set`` keeps its seqlock odd for good: the
    assertions give up on a consistent read of it (the monitor covers that instant)."""
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        w = r.words
        b._set(HOST, 2)
        b._set(GUEST, 2)
        w[b.i_mseq] += 1                         # b stopped half-way through its next _set
        a._set(GUEST, 1)                         # GUEST(1) beside what reads as GUEST(2)
        _returns_promptly(a.checker.guest_entry)
        _returns_promptly(a.checker.guest_exit)
        _returns_promptly(a.checker.host_entry)
        assert counter(a, "v_s2") == 0           # never read consistently: not reported
        assert counter(a, "checks") == 3


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
    assert strict.failures == [] and strict.extra["ok"]
    c = strict.counters
    assert c["violations"] == 0, strict.violations[:3]
    assert c["m_samples"] > 100                  # the monitor did look
    assert strict.extra["check_cost"]["checks"] > 0
    assert strict.extra["check_cost"]["mean_ns"] > 0


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_transition_assertions_catch_naive_stun():
    e = _stress("naive", monitor=False)
    assert e.counters["transition_s1"] > 0
    assert any(v["source"] == "transition" and v["kind"] == "S1" for v in e.violations)


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_monitor_alone_catches_naive_stun():
    e = _stress("naive", check=False)            # no transition-time assertions at all
    assert e.counters["transition_s1"] == 0 and e.counters["monitor_s1"] > 0
    assert any(v["source"] == "monitor" for v in e.violations)


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_buffer_checks_catch_a_missing_flush():
    e = _stress("noflush")
    assert e.counters["buffer_leaks"] > 0          # (c) the guests' buffer sampling
    assert e.counters["transition_s3"] > 0         # (a) S3 at VM entry
    assert e.counters["transition_s1"] == 0        # the stun itself is still strict


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_checkers_catch_a_missing_barrier():
    e = _stress("nobarrier")
    c = e.counters
    assert c["transition_s1"] + c["transition_s2"] + c["transition_s3"] > 0
    assert c["monitor_s1"] + c["monitor_s2"] > 0


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_fenced_assertions_strict_zero_naive_caught():
    s = _stress("strict", check_fence=True, monitor=False)
    n = _stress("naive", check_fence=True, monitor=False)
    assert s.counters["violations"] == 0 and n.counters["transition_s1"] > 0


def test_events_are_named_and_ordered():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        b._set(HOST, 1)
        a.enter_guest()
        evs = invariants.events(r, cpus=[4, 5])
        assert [e["kind"] for e in evs] == ["S1", "S3"]
        assert evs[0]["cpu"] == 4 and evs[0]["other_cpu"] == 5
        assert evs[0]["mode"] == "GUEST" and evs[0]["other_mode"] == "HOST"
        assert evs[0]["ns"] <= evs[1]["ns"]


# -- (c) with the ASI model's core buffer ---------------------------------------------------------

def test_leak_hook_reads_the_uarch_buffer_when_the_region_has_one():
    from asirt import memclass, uarch
    from shm_layout import Region, Section
    from asirt.invariants import uarch_hook
    from asirt.stun import StunCpu
    r = Region.create([Section("slots", 2), Section("stun_cpu", 2), Section("stun_buf", 2),
                       Section("stun_events", 2), Section("asi_uarch", 1)])
    try:
        uarch.setup(r, [[0, 1]], 4096)
        hooks = [uarch_hook(r, 0, lane) for lane in (0, 1)]
        cfg = StunConfig(oversubscribed=True)
        a = StunCpu(r, 0, [0, 1], cfg, domain=1, mode=ASI, leak_hook=hooks[0])
        b = StunCpu(r, 1, [0, 1], cfg, domain=1, mode=ASI, leak_hook=hooks[1])
        hooks[1].deposit(memclass.make_token(memclass.MemClass.SENSITIVE, 0, 5))
        a._set(GUEST, 1)
        assert a.sample_leaks() >= 1 and counter(a, "leaks") >= 1
        b.flush()                                 # flushes both records, and the uarch buffer
        assert a.sample_leaks() == 0
        for h in hooks:
            h.close()
    finally:
        r.close()
        r.unlink()


def test_a_dead_siblings_violations_stop_counting_once_its_death_is_seen():
    """sibling_counts reuses a live answer for ALIVE_FOR_NS (a /proc read per report was
    most of the checker's cost under naive); after that a dead sibling no longer counts."""
    import time

    from asirt.stun import ALIVE_FOR_NS
    from tests.test_stun import _dead_pid
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        b.enter_guest()
        s1 = a.cnt + COUNTER["v_s1"]
        a.enter_host()                         # b in GUEST beside HOST: S1, b alive
        assert a.w[s1] == 1
        a.leave_host()
        a.w[a.s_pid[1]] = _dead_pid()
        time.sleep(2 * ALIVE_FOR_NS / 1e9)
        a.enter_host()
        assert a.w[s1] == 1, "a dead sibling's stale GUEST counted as a violation"
