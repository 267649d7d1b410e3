"""The VM-entry barrier: its condition, the spin-with-bail-out wait, the Xen-style rendezvous,
and the core lock under it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from asirt import histogram
from asirt.cpu import ASI, GUEST, HOST, IDLE, STUNNED
from asirt.cpu.wait import Outcome
from asirt.params import CpuParams
from asirt.scenarios.stress import run_stress
from asirt.scenarios.stun import run_stun
from asirt.sync.barrier import RendezvousBarrier, Result, SpinBarrier, check, make_barrier
from asirt.sync.corelock import CoreLock
from tests.fixtures import Background, counter, cpu_region, make_stuns, mode_of, test_topology

# -- the condition ---------------------------------------------------------------------------

def test_check_refuses_an_active_request_host_and_another_domain():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        assert check(a) == (Result.OK, -1)
        b.g += 1
        b.w[b.i_gen] = b.g                       # B1: b's request is active
        assert check(a) == (Result.BUSY, 1)
        b.cpu.state.set(HOST, 1)                 # B2 (and still B1)
        assert check(a)[0] == Result.BUSY
        b.g += 1
        b.w[b.i_gen] = b.g
        assert check(a) == (Result.BUSY, 1)      # B2 alone: released but still in HOST
        b.cpu.state.set(HOST, 2)
        b.cpu.state.set(ASI, 2)
        assert check(a) == (Result.DOMAIN, 1)    # B3
        b.cpu.state.set(STUNNED, 2)
        assert check(a) == (Result.DOMAIN, 1)    # a parked CPU keeps its domain
        assert counter(a.cpu, "barrier.busy") == 3 and counter(a.cpu, "barrier.dom") == 2


def test_the_barrier_flushes_on_its_own_taints_never_on_the_buffer():
    """The protocol decides with its bookkeeping; the buffer is the checkers' evidence."""
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        b.cpu.state.set(HOST, 1)
        b.cpu.state.set(IDLE, 0)                 # b left HOST without a flush (not the protocol)
        assert a.cpu.buffer.dirty_for(1) is not None
        assert check(a) == (Result.OK, -1)       # a's taints are clean: no flush ...
        assert counter(a.cpu, "barrier.flushes") == 0
        assert a.cpu.buffer.dirty_for(1) is not None   # ... so the buffer stays dirty
        a.cpu.state.set(HOST, 1)
        a.cpu.state.set(ASI, 1)                  # a's own HOST period: a is tainted now
        assert check(a) == (Result.OK, -1) and counter(a.cpu, "barrier.flushes") == 1
        assert a.cpu.buffer.dirty_for(1) is None


def test_entering_with_a_dirty_buffer_is_an_s3_violation_not_a_silent_fix():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        b.cpu.state.set(HOST, 1)
        b.cpu.state.set(IDLE, 0)                 # host data nobody flushed
        assert SpinBarrier(a).enter(1_000_000_000) == Result.OK
        assert counter(a.cpu, "check.s3") == 1


def test_noflush_variant_never_flushes():
    with cpu_region(2) as r:
        a, _ = make_stuns(r, 2, "noflush")
        a.cpu.state.set(HOST, 1)
        a.cpu.state.set(ASI, 1)
        assert check(a) == (Result.OK, -1) and a.cpu.state.needs_flush(1)
        assert counter(a.cpu, "buffer.flushes") == 0


# -- the spin barrier ------------------------------------------------------------------------

def test_spin_barrier_bails_out_and_reenters_after_the_release():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        waits = []
        bar = SpinBarrier(b, waits.append)
        a.g += 1
        a.w[a.i_gen] = a.g                       # R1: a wants sensitive data
        entry = Background(lambda: bar.enter(5_000_000_000))
        assert a.wait_acks() is True             # b acks from inside the barrier (parks)
        assert mode_of(b.cpu) == STUNNED
        a.enter_host()
        time.sleep(0.02)
        assert not entry.done                    # no VM entry beside HOST
        a.leave_host()
        a.unstun()
        assert entry.result() == Result.OK
        assert mode_of(b.cpu) == GUEST and len(waits) == 1 and waits[0] >= 20_000_000
        assert counter(b.cpu, "check.s1") == 0 and counter(b.cpu, "check.s3") == 0


def test_spin_barrier_reports_domain_and_timeout():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        a.cpu.state.set(HOST, 2)
        a.cpu.state.set(ASI, 2)
        assert SpinBarrier(b).enter(1_000_000_000) == Result.DOMAIN
        a.cpu.state.set(HOST, 1)                 # stays in HOST
        t0 = time.monotonic()
        assert SpinBarrier(b).enter(50_000_000) == Result.TIMEOUT
        assert time.monotonic() - t0 < 5


def test_nobarrier_variant_enters_regardless():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2, "nobarrier")
        a.cpu.state.set(HOST, 1)
        assert SpinBarrier(b).enter(1_000_000) == Result.OK
        assert counter(b.cpu, "check.s1") == 1   # the transition-time assertion saw it


# -- the rendezvous --------------------------------------------------------------------------

def test_rendezvous_waits_for_every_present_sibling():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        ba, bb = RendezvousBarrier(a, CoreLock(a.cpu)), RendezvousBarrier(b, CoreLock(b.cpu))
        first = Background(lambda: ba.enter(5_000_000_000))
        time.sleep(0.05)
        assert not first.done                    # b is in ASI: present, not arrived
        assert bb.enter(5_000_000_000) == Result.OK
        assert first.result() == Result.OK
        assert mode_of(a.cpu) == GUEST and mode_of(b.cpu) == GUEST
        assert r.array("core_sync")[0]["rv_rounds"] == 1


def test_rendezvous_does_not_wait_for_an_idle_sibling_and_refuses_another_domain():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        b.cpu.state.set(HOST, 0)
        b.cpu.state.set(IDLE, 0)
        b.flush()
        assert RendezvousBarrier(a, CoreLock(a.cpu)).enter(1_000_000_000) == Result.OK
    with cpu_region(2) as r2:
        c, d = make_stuns(r2, 2)
        d.cpu.state.set(HOST, 2)
        d.cpu.state.set(ASI, 2)
        d.flush()
        arrived = Background(lambda: RendezvousBarrier(d, CoreLock(d.cpu)).enter(200_000_000))
        time.sleep(0.02)
        assert RendezvousBarrier(c, CoreLock(c.cpu)).enter(1_000_000_000) == Result.DOMAIN
        assert arrived.result() == Result.TIMEOUT


def test_rendezvous_waiter_answers_a_stun_request():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        bar = RendezvousBarrier(b, CoreLock(b.cpu))
        entry = Background(lambda: bar.enter(3_000_000_000))
        time.sleep(0.02)
        assert a.sensitive() is True             # b left the round to ack, then came back
        assert RendezvousBarrier(a, CoreLock(a.cpu)).enter(3_000_000_000) == Result.OK
        assert entry.result() == Result.OK


@pytest.mark.parametrize("name", ["spin", "rendezvous"])
def test_barrier_wait_ends_at_the_guest_store_not_after_the_assertion(name):
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        a.cpu.state.set(HOST, 0)
        a.cpu.state.set(IDLE, 0)                 # an idle sibling: neither barrier waits
        a.flush()
        checked = b.cpu.checker.guest_entry

        def slow_check():                        # the assertion after the store: 50 ms
            time.sleep(0.05)
            checked()
        b.cpu.checker.guest_entry = slow_check
        waits = []
        assert make_barrier(name, b, None, waits.append).enter(1_000_000_000) == Result.OK
        assert len(waits) == 1 and waits[0] < 50_000_000


def test_make_barrier_names():
    with cpu_region(2) as r:
        a, _ = make_stuns(r, 2)
        assert make_barrier("spin", a).name == "spin"
        assert make_barrier("rendezvous", a).name == "rendezvous"
        with pytest.raises(ValueError, match="choose from"):
            make_barrier("ticket", a)


# -- the core lock ------------------------------------------------------------------------------

def test_core_lock_excludes_two_handles_even_in_one_process():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        la, lb = CoreLock(a.cpu), CoreLock(b.cpu)
        assert la.try_acquire() and not lb.try_acquire()
        la.release()
        assert lb.try_acquire()
        lb.release()


def test_core_lock_waiter_answers_stun_requests():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        held = CoreLock(a.cpu)
        assert held.acquire() == Outcome.DONE
        waiter = Background(CoreLock(b.cpu).acquire)
        try:
            time.sleep(0.02)
            assert not waiter.done
            t0 = time.monotonic()
            granted = a.request()                # b acks from inside its wait for the lock
            waited = time.monotonic() - t0
            if granted:
                a.release()
        finally:
            held.release()
        assert waiter.result() == Outcome.DONE
        assert granted is True and waited < 1.0 and counter(b.cpu, "stun.acks") == 1


def test_core_lock_honours_its_callers_deadline():
    with cpu_region(2) as r:
        a, b = make_stuns(r, 2)
        held = CoreLock(a.cpu)
        assert held.try_acquire()
        t0 = time.monotonic()
        assert CoreLock(b.cpu).acquire(time.perf_counter_ns() + 50_000_000) == Outcome.DEADLINE
        assert time.monotonic() - t0 < 5
        held.release()


def _lock_holder(region_name: str) -> subprocess.Popen:
    """A process that takes core 0's lock, says so, and then sleeps holding it."""
    code = ("import fcntl, os, struct, sys, time\n"
            f"fd = os.open('/dev/shm/{region_name.lstrip('/')}', os.O_RDWR)\n"
            "fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 0, 1, 0))\n"
            "print('held', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    with p.stdout:
        assert p.stdout.readline().strip() == "held"
    return p


def test_a_dead_holders_lock_falls_free_at_once():
    """The kernel drops the lock with its holder: no SIGKILL window can keep it held."""
    with cpu_region(2) as r:
        a, _ = make_stuns(r, 2)
        p = _lock_holder(r.name)
        try:
            lock = CoreLock(a.cpu)
            assert not lock.try_acquire()
            p.kill()
            p.wait()
            assert lock.acquire(time.perf_counter_ns() + 5_000_000_000) == Outcome.DONE
            lock.release()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_holder_that_stays_stopped_is_killed_and_its_lock_taken():
    with cpu_region(2) as r:
        a, _ = make_stuns(r, 2, params=CpuParams(oversubscribed=True, ack_timeout_ms=20))
        p = _lock_holder(r.name)
        try:
            r.words[r.word_index("core_sync", 0, "lock_pid")] = p.pid
            os.kill(p.pid, signal.SIGSTOP)
            lock = CoreLock(a.cpu)
            assert lock.acquire(time.perf_counter_ns() + 10_000_000_000) == Outcome.DONE
            assert p.wait(timeout=10) == -signal.SIGKILL
            lock.release()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_waiters_never_both_hold_the_lock():
    with cpu_region(3) as r:
        _, b, c = make_stuns(r, 3)
        inside, most = [0], [0]
        guard = threading.Lock()

        def critical(stun):
            lock = CoreLock(stun.cpu)
            for _ in range(50):
                if lock.acquire(time.perf_counter_ns() + 5_000_000_000) != Outcome.DONE:
                    return False
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.0005)
                with guard:
                    inside[0] -= 1
                lock.release()
            lock.close()
            return True
        workers = [Background(lambda s=s: critical(s)) for s in (b, c)]
        assert [w.result(timeout=30) for w in workers] == [True, True]
        assert most[0] == 1, "two handles held core 0's lock at once"


# -- between pinned workers --------------------------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("barrier", ["spin", "rendezvous"])
def test_barrier_under_stress_is_safe_and_measured(barrier):
    e = run_stress(test_topology(), "strict", transitions=12_000, seed=5, barrier=barrier)
    assert e.failures == [] and e.problems == [], e.extra["liveness"]
    assert e.counters["violations"] == 0, e.violations[:3]
    assert histogram.summarize(e.hists["barrier_wait"]).count > 0
    if barrier == "rendezvous":
        assert e.counters["barrier.rv_rounds"] > 0


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_rendezvous_bench_records_barrier_wait():
    (e,) = run_stun(test_topology(), ["strict"], ["spin"], 0.5, barrier="rendezvous")
    assert e.failures == [] and e.counters["violations"] == 0
    assert histogram.summarize(e.hists["barrier_wait"]).count > 0
    assert e.extra["barrier"] == "rendezvous"
