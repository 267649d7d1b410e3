"""The stun handshake: its steps one by one in-process, then between pinned workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from asirt import histogram
from asirt.errors import BadInput
from asirt.stun import ASI, GUEST, HOST, IDLE, STUNNED, Phase, StunConfig, liveness
from asirt.stun_scenario import run_stun
from shm_layout.stun import COUNTER
from tests.stun_fixtures import Background, cpus, stun_region, test_topology

FAST = dict(oversubscribed=True, ack_timeout_ns=20_000_000, give_up_ns=2_000_000_000)
#: a requester that does not give up before the test has had every chance to answer it
PATIENT = StunConfig(oversubscribed=True, ack_timeout_ns=20_000_000, give_up_ns=30_000_000_000)


def counter(cpu, name: str) -> int:
    return cpu.w[cpu.cnt + COUNTER[name]]


def mode(cpu) -> int:
    return cpu.w[cpu.i_mode]


def wait_until(cond, what: str, timeout_s: float = 10.0) -> None:
    """Poll ``cond()`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s}s")
        time.sleep(0.001)


def waiting_for_acks(cpu) -> bool:
    """The requester is in R2's slow loop (its first tick publishes the phase)."""
    return cpu.w[cpu.i_phase] == Phase.REQUEST


# -- the steps, in-process -------------------------------------------------------------------

def test_strict_requester_waits_until_the_guest_is_parked():
    with stun_region(2) as r:
        a, b = cpus(r, 2, PATIENT)
        b.enter_guest()
        req = Background(a.request)
        wait_until(b.pending, "a's request pending at b")
        wait_until(lambda: waiting_for_acks(a), "a waiting for b's ack")
        assert not req.done, "strict must wait for the sibling's ack"
        parked = Background(b.safe_point)       # parks until a releases
        assert req.result() is True
        assert mode(b) == STUNNED and b.acked[0] == a.g and a.g % 2 == 1
        a.enter_host()
        a.leave_host()
        a.flush()
        a.release()
        assert parked.result() is True
        assert mode(b) == ASI and a.g % 2 == 0
        assert counter(a, "v_s1") == 0 and counter(b, "v_s1") == 0
        assert counter(b, "parks") == 1 and counter(b, "acks") == 1


def test_naive_requester_does_not_wait_and_the_checker_sees_it():
    with stun_region(2) as r:
        a, b = cpus(r, 2, StunConfig(protocol="naive", **FAST))
        b.enter_guest()
        assert a.request() is True              # delivery only: returns at once
        a.enter_host()                          # b still in GUEST: S1
        assert counter(a, "v_s1") == 1
        a.leave_host()
        a.flush()
        a.release()
        assert b.safe_point() is False          # released before b looked: nothing pending


def test_idle_sibling_acks_without_parking():
    with stun_region(2) as r:
        a, b = cpus(r, 2, domain=0)
        req = Background(a.request)
        wait_until(b.pending, "a's request pending at b")
        assert b.safe_point() is False          # H1
        assert mode(b) == IDLE
        assert req.result() is True
        a.enter_host()
        a.leave_host()
        a.flush()
        a.release()


def test_simultaneous_requesters_do_not_deadlock():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        for c in (a, b):                        # R1 of both before either waits
            c.g += 1
            c.w[c.i_gen] = c.g
        finished = []

        def section(c):
            ok = c.wait_acks()                  # acks the other's request while it waits
            c.enter_host()
            c.leave_host()
            c.flush()
            c.release()
            finished.append(c.slot)
            deadline = time.monotonic() + 10
            while len(finished) < 2 and time.monotonic() < deadline:
                c.safe_point()                  # the next safe points: ack what is left
            return ok

        ra, rb = Background(lambda: section(a)), Background(lambda: section(b))
        assert ra.result() is True and rb.result() is True
        assert counter(a, "aborts") == 0 and counter(b, "aborts") == 0
        assert a.g % 2 == 0 and b.g % 2 == 0


@pytest.mark.parametrize("n", [4, 8])
def test_every_sibling_of_a_wide_core_parks(n):
    with stun_region(n) as r:
        cs = cpus(r, n)
        for c in cs[1:]:
            c.enter_guest()
        req = Background(cs[0].request)
        parked = [Background(c.safe_point) for c in cs[1:]]
        assert req.result() is True
        assert all(mode(c) == STUNNED for c in cs[1:])
        cs[0].enter_host()
        cs[0].leave_host()
        cs[0].flush()
        cs[0].release()
        assert all(p.result() is True for p in parked)
        assert all(mode(c) == ASI for c in cs[1:])


def test_domain_changes_only_in_host():
    with stun_region(1) as r:                   # a core of one: nobody to wait for
        (a,) = cpus(r, 1)
        with pytest.raises(AssertionError):
            a.set_domain(2)
        assert a.sensitive(None, 2) is True
        assert (mode(a), a.w[a.i_dom]) == (ASI, 2)
        assert a.sensitive(None, 0) is True
        assert (mode(a), a.w[a.i_dom]) == (IDLE, 0)


def test_buffer_is_dirty_until_a_flush_after_the_host_period():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        assert b.buffer_dirty(1) is None
        assert b.buffer_dirty(2) == (0, 1)       # a's ASI(1) deposits: not for domain 2
        a._set(HOST, 1)
        assert b.buffer_dirty(1) == (0, 0)       # host data, still being deposited
        a._set(ASI, 1)
        assert b.buffer_dirty(1) == (0, 0)       # left HOST, not flushed yet
        a.flush()
        assert b.buffer_dirty(1) is None


# -- liveness --------------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_liveness_tells_alive_dead_and_stopped():
    assert liveness(os.getpid()) == "alive"
    assert liveness(_dead_pid()) == "dead"
    p = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while liveness(p.pid) != "stopped" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert liveness(p.pid) == "stopped"
    finally:
        p.kill()
        p.wait()


def test_dead_sibling_is_fenced_off_not_waited_for():
    with stun_region(2, pids=[os.getpid(), _dead_pid()]) as r:
        a, _ = cpus(r, 2)
        t0 = time.monotonic()
        assert a.request() is True
        assert time.monotonic() - t0 < 5
        assert a.fenced_mask == 0b10 and a.live_sibs == []
        assert counter(a, "fenced") == 1 and counter(a, "timeouts") >= 1
        from asirt.invariants import events
        kinds = [e["kind"] for e in events(r)]
        assert "FENCE_DEAD" in kinds
        a.enter_host()
        a.leave_host()
        a.flush()
        a.release()


def test_stopped_sibling_is_killed_then_fenced():
    p = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(p.pid, signal.SIGSTOP)
        with stun_region(2, pids=[os.getpid(), p.pid]) as r:
            a, _ = cpus(r, 2)
            assert a.request() is True
            assert a.fenced_mask == 0b10
            assert p.wait(timeout=10) == -signal.SIGKILL    # STONITH
            from asirt.invariants import events
            assert "FENCE_STOPPED" in [e["kind"] for e in events(r)]
            a.release()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_live_sibling_that_never_acks_makes_the_request_give_up():
    with stun_region(2) as r:
        a, b = cpus(r, 2, StunConfig(oversubscribed=True, ack_timeout_ns=10_000_000,
                                     give_up_ns=100_000_000))
        b.enter_guest()                         # alive (this process) but never at a safe point
        t0 = time.monotonic()
        assert a.request() is False
        assert time.monotonic() - t0 < 5
        assert a.g % 2 == 0                     # released unused
        assert counter(a, "aborts") == 1 and counter(a, "slow") >= 1
        assert a.fenced_mask == 0


def test_stop_ends_every_wait():
    from shm_layout.header import STOP_WORD
    with stun_region(2) as r:
        a, b = cpus(r, 2, PATIENT)
        b.enter_guest()
        req = Background(a.request)
        wait_until(lambda: waiting_for_acks(a), "a waiting for b's ack")
        r.words[STOP_WORD] = 1
        assert req.result() is False            # long before give_up_ns
        assert counter(a, "aborts") == 0        # ended by the stop, not given up
        assert a.g % 2 == 0                     # released unused
        r.words[STOP_WORD] = 0


# -- the signal transport, in-process ---------------------------------------------------------

def test_signal_handler_parks_a_running_guest_and_defers_mid_transition():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with stun_region(2) as r:
            cfg = StunConfig(transport="signal", **FAST)
            a, b = cpus(r, 2, cfg)
            b.install_signal_handler()
            b.enter_guest()

            def rest_of_section() -> bool:
                ok = a.wait_acks()
                a.enter_host()
                a.leave_host()
                a.flush()
                a.release()
                return ok

            # A request whose IPI lands mid-transition (not steady): the handler leaves the
            # CPU alone; the guest loop's first safe point picks the request up.
            a.g += 1
            a.w[a.i_gen] = a.g
            os.kill(os.getpid(), signal.SIGUSR1)
            assert mode(b) == GUEST and b.acked[0] != a.g
            section = Background(rest_of_section)
            assert b.guest_busy(lambda: True) is True
            assert section.result() is True and mode(b) == ASI
            # A running guest: the handler interrupts it and parks it until the release.
            b.enter_guest()
            section = Background(a.sensitive)
            deadline = time.monotonic() + 10
            assert b.guest_busy(lambda: time.monotonic() > deadline) is True
            assert section.result() is True
            assert mode(b) == ASI
            assert counter(b, "parks") == 2 and counter(a, "ipis") >= 1
    finally:
        signal.signal(signal.SIGUSR1, previous)


# -- between pinned workers --------------------------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["spin", "signal", "sem"])
def test_bench_entries_strict_and_naive(transport):
    entries = list(run_stun(test_topology(), ["strict", "naive"], [transport], 0.4))
    assert [(e.strategy, e.transport) for e in entries] == [("strict", transport),
                                                             ("naive", transport)]
    strict, naive = entries
    for e in entries:
        assert e.failures == []
        assert e.scenario == "stun" and len(e.cpus) >= 2
        assert histogram.summarize(e.hists["stun_roundtrip"]).count > 0
    assert strict.counters["violations"] == 0 and strict.violations == []
    assert "exposure_window" not in strict.hists
    assert histogram.summarize(naive.hists["exposure_window"]).count > 0
    if transport != "sem":                      # idle targets neither park nor enter GUEST
        assert histogram.summarize(strict.hists["unstun_resume"]).count > 0
        assert histogram.summarize(strict.hists["barrier_wait"]).count > 0
        assert strict.counters["parks"] > 0


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_four_siblings_on_two_cpus_oversubscribed():
    (e,) = run_stun(test_topology(), ["strict"], ["spin"], 0.6, lanes_per_core=4)
    assert e.failures == []
    assert e.extra["oversubscribed"] is True and len(e.extra["lanes"][0]) == 4
    assert e.counters["violations"] == 0
    assert histogram.summarize(e.hists["stun_roundtrip"]).count > 0
    # Each request (one odd generation) is acked at most once by each of the 3 siblings, and
    # a strict request that returned was acked by all 3 (none fenced). Only a request given
    # up (aborts) or cut short by the end of the run (at most one per lane) has fewer: not
    # an equality, a run's last requests often miss an ack or two.
    c, lanes = e.counters, 4
    assert c["fenced"] == 0 and c["requests"] > 0
    assert 3 * (c["requests"] - c["aborts"] - lanes) <= c["acks"] <= 3 * c["requests"], c


def test_bad_input_is_refused():
    topo = test_topology()
    with pytest.raises(BadInput):
        list(run_stun(topo, ["bogus"], ["spin"], 0.1))
    with pytest.raises(BadInput):
        list(run_stun(topo, ["strict"], ["carrier-pigeon"], 0.1))
    with pytest.raises(BadInput):
        list(run_stun(topo, ["strict"], ["spin"], 0.1, barrier="nope"))
    with pytest.raises(BadInput):
        list(run_stun(topo, ["strict"], ["spin"], 0.1, lanes_per_core=9))


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_baselines_and_the_bench_registry_adapter():
    from asirt.cfloor import compiler
    from asirt.stun_scenario import count_stun, run_stun_scenario
    topo = test_topology()
    (e,) = run_stun(topo, ["strict"], ["signal"], 0.3, baseline=True)
    b = e.extra["baseline"]
    assert b["kind"] == "pingpong-signal" and b["p50_ns"] > 0 and b["ratio_p50"] > 0
    if compiler() is not None:
        (e,) = run_stun(topo, ["strict"], ["spin"], 0.3, baseline=True)
        assert e.extra["baseline"]["kind"] == "c-floor" and e.extra["baseline"]["ratio_p50"] > 0
    from asirt.bench import Options
    opts = Options(transports=("sem",), duration_s=0.3, floor=False)
    assert count_stun(topo, opts) == 2
    entries = list(run_stun_scenario(topo, opts))
    assert [(x.strategy, x.transport) for x in entries] == [("strict", "sem"), ("naive", "sem")]
    assert all("baseline" not in x.extra for x in entries)
