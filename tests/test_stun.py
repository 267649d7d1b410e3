"""The stun handshake: its steps one by one in-process, then between pinned workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from asirt import collect, histogram
from asirt.cpu import ASI, GUEST, HOST, IDLE, STUNNED
from asirt.errors import BadInput
from asirt.params import CpuParams
from asirt.proc import Life, Proc
from asirt.scenarios import Options
from asirt.scenarios.stun import count, run_scenario, run_stun
from asirt.sync.guest import guest_busy, guest_poll
from shm_layout.cpu import Phase
from shm_layout.header import STOP_WORD
from tests.fixtures import (PATIENT, Background, counter, cpu_region, make_stuns, mode_of,
                            test_topology, wait_until)


def waiting_for_acks(stun) -> bool:
    """The requester is in R2's slow loop (its first tick publishes the phase)."""
    return stun.cpu.w[stun.cpu.i_phase] == Phase.REQUEST


def finish_section(stun) -> None:
    stun.enter_host()
    stun.leave_host()
    stun.unstun()


# -- the steps, in-process -------------------------------------------------------------------

def test_strict_requester_waits_until_the_guest_is_parked():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2, params=PATIENT)
        b.cpu.state.enter_guest()
        req = Background(a.request)
        wait_until(b.pending, "a's request pending at b")
        wait_until(lambda: waiting_for_acks(a), "a waiting for b's ack")
        assert not req.done, "strict must wait for the sibling's ack"
        parked = Background(b.cpu.safepoint)       # parks until a releases
        assert req.result() is True
        assert mode_of(b.cpu) == STUNNED and b.acked[0] == a.g and a.g % 2 == 1
        finish_section(a)
        assert parked.result() is True
        assert mode_of(b.cpu) == ASI and a.g % 2 == 0
        assert counter(a.cpu, "check.s1") == 0 and counter(b.cpu, "check.s1") == 0
        assert counter(b.cpu, "stun.parks") == 1 and counter(b.cpu, "stun.acks") == 1


def test_naive_requester_does_not_wait_and_the_checker_sees_it():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2, "naive")
        b.cpu.state.enter_guest()
        assert a.request() is True              # delivery only: returns at once
        a.enter_host()                          # b still in GUEST: S1
        assert counter(a.cpu, "check.s1") == 1
        a.leave_host()
        a.unstun()
        assert b.cpu.safepoint() is False       # released before b looked: nothing pending


def test_idle_sibling_acks_without_parking():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2, domain=0)
        req = Background(a.request)
        wait_until(b.pending, "a's request pending at b")
        assert b.cpu.safepoint() is False       # H1
        assert mode_of(b.cpu) == IDLE
        assert req.result() is True
        finish_section(a)


def test_a_sibling_in_host_acks_without_parking():
    """A CPU in the unrestricted kernel runs no guest code: it acks like an idle one (and its
    own way back into GUEST goes through the barrier, which sees the request)."""
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        b.cpu.state.enter_host()
        req = Background(a.request)
        wait_until(b.pending, "a's request pending at b")
        assert b.cpu.safepoint() is False
        assert mode_of(b.cpu) == HOST and req.result() is True
        finish_section(a)


def test_simultaneous_requesters_do_not_deadlock():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        for s in (a, b):                        # R1 of both before either waits
            s.g += 1
            s.w[s.i_gen] = s.g
        finished = []

        def section(s):
            ok = s.wait_acks()                  # acks the other's request while it waits
            finish_section(s)
            finished.append(s.cpu.slot)
            deadline = time.monotonic() + 10
            while len(finished) < 2 and time.monotonic() < deadline:
                s.cpu.safepoint()               # the next safe points: ack what is left
            return ok

        ra, rb = Background(lambda: section(a)), Background(lambda: section(b))
        assert ra.result() is True and rb.result() is True
        assert counter(a.cpu, "stun.aborts") == 0 and counter(b.cpu, "stun.aborts") == 0
        assert a.g % 2 == 0 and b.g % 2 == 0


@pytest.mark.parametrize("n", [4, 8])
def test_every_sibling_of_a_wide_core_parks(n):
    with cpu_region(n) as r:
        ss = make_stuns(r, n)
        for s in ss[1:]:
            s.cpu.state.enter_guest()
        req = Background(ss[0].request)
        parked = [Background(s.cpu.safepoint) for s in ss[1:]]
        assert req.result() is True
        assert all(mode_of(s.cpu) == STUNNED for s in ss[1:])
        finish_section(ss[0])
        assert all(p.result() is True for p in parked)
        assert all(mode_of(s.cpu) == ASI for s in ss[1:])


def test_domain_changes_only_in_host():
    with cpu_region(1) as r:                    # a core of one: nobody to wait for
        (a,) = make_stuns(r, 1)
        with pytest.raises(AssertionError):
            a.cpu.state.set_domain(2)
        assert a.sensitive(None, 2) is True
        assert (mode_of(a.cpu), a.cpu.state.dom) == (ASI, 2)
        assert a.sensitive(None, 0) is True
        assert (mode_of(a.cpu), a.cpu.state.dom) == (IDLE, 0)


def test_buffer_is_dirty_until_a_flush_after_the_host_period():
    """The evidence the checkers read: a's periods, as b's guest would see them."""
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        buf = b.cpu.buffer
        assert buf.dirty_for(1) is None
        assert buf.dirty_for(2).lane == 0        # a's ASI(1) deposits: not for domain 2
        a.cpu.state.set(HOST, 1)
        assert buf.dirty_for(1).lane == 0        # host data, still being deposited
        a.cpu.state.set(ASI, 1)
        assert buf.dirty_for(1).lane == 0        # left HOST, not flushed yet
        a.flush()
        assert buf.dirty_for(1) is None


def test_a_host_period_taints_and_the_flush_clears_it():
    """The protocol's own bookkeeping (what the barrier decides with), apart from the buffer."""
    with cpu_region(1) as r:
        (a,) = make_stuns(r, 1)
        assert not a.cpu.state.needs_flush(1)    # its own ASI(1) data: no flush for domain 1
        a.cpu.state.set(HOST, 1)
        assert not a.cpu.state.needs_flush(1)    # still in HOST: tainted when it ends
        a.cpu.state.set(ASI, 1)
        assert a.cpu.state.needs_flush(1)
        a.flush()
        assert not a.cpu.state.needs_flush(1) and counter(a.cpu, "stun.flushes") == 1
        assert counter(a.cpu, "buffer.flushes") == 1


# -- liveness --------------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _stopped(argv: list[str] | None = None) -> subprocess.Popen:
    p = subprocess.Popen(argv or ["sleep", "30"])
    os.kill(p.pid, signal.SIGSTOP)
    proc = Proc(p.pid)
    wait_until(lambda: proc.life() is Life.STOPPED, "the child stopped")
    proc.close()
    return p


def test_liveness_tells_alive_dead_and_stopped():
    assert Proc(os.getpid()).life() is Life.ALIVE
    assert Proc(_dead_pid()).life() is Life.DEAD
    p = _stopped()
    try:
        proc = Proc(p.pid)
        assert proc.life() is Life.STOPPED
        p.kill()
        p.wait()
        assert proc.life() is Life.DEAD          # reaped: the pidfd says so, whatever the pid
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_recycled_pid_does_not_make_a_dead_sibling_alive():
    p = subprocess.Popen(["sleep", "30"])
    proc = Proc(p.pid)                           # taken while it is the sibling meant
    p.kill()
    p.wait()
    assert proc.life() is Life.DEAD
    assert proc.dead()                           # by pidfd: never by the number again


def test_dead_sibling_is_fenced_off_not_waited_for():
    with cpu_region(2, pids=[os.getpid(), _dead_pid()]) as r:
        a, _ = make_stuns(r, 2)
        t0 = time.monotonic()
        assert a.request() is True
        assert time.monotonic() - t0 < 5
        assert a.cpu.fenced_mask == 0b10 and a.cpu.live == []
        assert counter(a.cpu, "cpu.fenced") == 1 and counter(a.cpu, "cpu.timeouts") >= 1
        assert "FENCE_DEAD" in [e["kind"] for e in collect.events(r)]
        assert a.cpu.state.needs_flush(1), "what the dead lane left is the fencer's to flush"
        finish_section(a)


def test_stopped_sibling_is_killed_then_fenced():
    p = _stopped()
    try:
        with cpu_region(2, pids=[os.getpid(), p.pid]) as r:
            a, _ = make_stuns(r, 2)
            assert a.request() is True
            assert a.cpu.fenced_mask == 0b10
            assert p.wait(timeout=10) == -signal.SIGKILL    # STONITH, then fenced once dead
            assert "FENCE_STOPPED" in [e["kind"] for e in collect.events(r)]
            a.release()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_sibling_stopped_only_briefly_is_not_killed():
    """Ctrl-Z of a whole run and its resumption: a sibling seen stopped at one liveness check
    and running at the next is waited for, not killed."""
    p = _stopped()
    try:
        with cpu_region(2, pids=[os.getpid(), p.pid]) as r:
            (a,) = make_stuns(r, 1)
            a.cpu.procs[1] = Proc(p.pid)
            assert a.cpu.check_liveness(1, Phase.REQUEST) is False      # first sighting
            os.kill(p.pid, signal.SIGCONT)
            wait_until(lambda: a.cpu.life(1) is Life.ALIVE, "the child resumed")
            assert a.cpu.check_liveness(1, Phase.REQUEST) is False
            assert p.poll() is None and a.cpu.fenced_mask == 0
    finally:
        p.kill()
        p.wait()


def test_live_sibling_that_never_acks_makes_the_request_give_up():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2, params=CpuParams(oversubscribed=True, ack_timeout_ms=10,
                                                 give_up_ms=100))
        b.cpu.state.enter_guest()               # alive (this process), never at a safe point
        t0 = time.monotonic()
        assert a.request() is False
        assert time.monotonic() - t0 < 5
        assert a.g % 2 == 0                     # released unused
        assert counter(a.cpu, "stun.aborts") == 1 and counter(a.cpu, "cpu.slow") >= 1
        assert a.cpu.fenced_mask == 0


def test_stop_ends_every_wait():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2, params=PATIENT)
        b.cpu.state.enter_guest()
        req = Background(a.request)
        wait_until(lambda: waiting_for_acks(a), "a waiting for b's ack")
        r.words[STOP_WORD] = 1
        assert req.result() is False            # long before give_up
        assert counter(a.cpu, "stun.aborts") == 0      # ended by the stop, not given up
        assert a.g % 2 == 0                     # released unused
        r.words[STOP_WORD] = 0


# -- the emulated guest ------------------------------------------------------------------------

def test_guest_poll_answers_a_request_already_pending_when_it_starts():
    """The guest loop reacts to *pending* (the model's rule), not to a change of the
    generation: a request made before the guest started polling is answered at once."""
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        b.cpu.state.enter_guest()
        a.g += 1
        a.w[a.i_gen] = a.g                      # R1, before b's guest polls at all
        section = Background(lambda: (a.wait_acks(), finish_section(a)))
        t0 = time.monotonic()
        assert guest_poll(b, lambda: time.monotonic() - t0 > 5) is True
        assert time.monotonic() - t0 < 5
        section.result()
        assert mode_of(b.cpu) == ASI


def test_signal_handler_parks_a_running_guest_and_defers_mid_transition():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with cpu_region(2) as r:
            params = CpuParams(transport="signal", oversubscribed=True, ack_timeout_ms=20,
                               give_up_ms=2000)
            a, b = make_stuns(r, 2, params=params)
            b.cpu.transport.install_handler()
            b.cpu.state.enter_guest()

            def rest_of_section() -> bool:
                ok = a.wait_acks()
                finish_section(a)
                return ok

            # A request whose IPI lands mid-transition (not steady): the handler leaves the
            # CPU alone; the guest loop's first safe point picks the request up.
            a.g += 1
            a.w[a.i_gen] = a.g
            os.kill(os.getpid(), signal.SIGUSR1)
            assert mode_of(b.cpu) == GUEST and b.acked[0] != a.g
            section = Background(rest_of_section)
            assert guest_busy(b, lambda: True) is True
            assert section.result() is True and mode_of(b.cpu) == ASI
            # A running guest: the handler interrupts it and parks it until the release.
            b.cpu.state.enter_guest()
            section = Background(a.sensitive)
            deadline = time.monotonic() + 10
            assert guest_busy(b, lambda: time.monotonic() > deadline) is True
            assert section.result() is True
            assert mode_of(b.cpu) == ASI
            assert counter(b.cpu, "stun.parks") == 2 and counter(a.cpu, "cpu.ipis") >= 1
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
    assert strict.claims_safety is True and naive.claims_safety is False
    assert "exposure_window" not in strict.hists
    assert histogram.summarize(naive.hists["exposure_window"]).count > 0
    if transport != "sem":                      # idle targets neither park nor enter GUEST
        assert histogram.summarize(strict.hists["unstun_resume"]).count > 0
        assert histogram.summarize(strict.hists["barrier_wait"]).count > 0
        assert strict.counters["stun.parks"] > 0


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
    assert c["cpu.fenced"] == 0 and c["stun.requests"] > 0
    assert (3 * (c["stun.requests"] - c["stun.aborts"] - lanes) <= c["stun.acks"]
            <= 3 * c["stun.requests"]), c


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
    topo = test_topology()
    (e,) = run_stun(topo, ["strict"], ["signal"], 0.3, baseline=True)
    b = e.extra["baseline"]
    assert b["kind"] == "pingpong-signal" and b["p50_ns"] > 0 and b["ratio_p50"] > 0
    if compiler() is not None:
        (e,) = run_stun(topo, ["strict"], ["spin"], 0.3, baseline=True)
        assert e.extra["baseline"]["kind"] == "c-floor" and e.extra["baseline"]["ratio_p50"] > 0
    opts = Options(transports=("sem",), duration_s=0.3, floor=False)
    assert count(topo, opts) == 2
    entries = list(run_scenario(topo, opts))
    assert [(x.strategy, x.transport) for x in entries] == [("strict", "sem"), ("naive", "sem")]
    assert all("baseline" not in x.extra for x in entries)


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="CPython 3.11's specialization")
def test_the_benchmark_loop_is_closed_by_an_unconditional_jump():
    """workers/stun.py's benchmark runs its loop in a function called once: CPython 3.11
    specializes that bytecode only after 8 unconditional backward jumps, so a loop closed by
    its own test (``while not stop:``) would time every round trip unspecialized (about 70 ns
    more here, bench/ab_stun.sh). Its outermost loop must end in JUMP_BACKWARD."""
    import dis

    import workers.stun
    back = [i for i in dis.get_instructions(workers.stun._bench) if "BACKWARD" in i.opname]
    assert back, "no loop in workers.stun._bench?"
    assert max(back, key=lambda i: i.offset).opname == "JUMP_BACKWARD"
