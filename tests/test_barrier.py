"""The VM-entry barrier: its condition, the spin-with-bail-out wait, the Xen-style rendezvous."""
from __future__ import annotations

import threading
import time

import pytest

from asirt import barrier as barrier_mod
from asirt import histogram, invariants
from asirt.barrier import CoreLock, RendezvousBarrier, Result, SpinBarrier, check, make_barrier
from asirt.stun import ASI, GUEST, HOST, IDLE, STUNNED, StunConfig
from asirt.stun_scenario import run_stress, run_stun
from shm_layout.stun import COUNTER
from tests.stun_fixtures import Background, cpus, stun_region, test_topology


def counter(cpu, name: str) -> int:
    return cpu.w[cpu.cnt + COUNTER[name]]


# -- the condition ---------------------------------------------------------------------------

def test_check_refuses_an_active_request_host_and_another_domain():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        assert check(a) == (Result.OK, -1)
        b.g += 1
        b.w[b.i_gen] = b.g                       # B1: b's request is active
        assert check(a) == (Result.BUSY, 1)
        b._set(HOST, 1)                          # B2 (and still B1)
        assert check(a)[0] == Result.BUSY
        b.g += 1
        b.w[b.i_gen] = b.g
        assert check(a) == (Result.BUSY, 1)      # B2 alone: released but still in HOST
        b._set(HOST, 2)
        b._set(ASI, 2)
        assert check(a) == (Result.DOMAIN, 1)    # B3
        b._set(STUNNED, 2)
        assert check(a) == (Result.DOMAIN, 1)    # a parked CPU keeps its domain
        assert counter(a, "barrier_busy") == 3 and counter(a, "barrier_dom") == 2


def test_idle_sibling_does_not_block_and_a_dirty_buffer_is_flushed_first():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        b._set(HOST, 1)
        b._set(IDLE, 0)                          # left HOST without a flush (not the protocol)
        assert a.buffer_dirty(1) == (1, 0)
        assert check(a) == (Result.OK, -1)       # idle sibling: fine; dirty buffer: flushed
        assert a.buffer_dirty(1) is None
        assert counter(a, "barrier_dirty") == 1 and counter(a, "entry_flushes") == 1


@pytest.mark.parametrize("kind", ["spin", "rendezvous"])
def test_a_buffer_that_stays_dirty_ends_in_timeout_not_a_spin(kind):
    """If our own flush cannot clean the buffer (here: a flush that does nothing), the barrier
    keeps trying only until its deadline: it used to loop with no deadline or STOP check."""
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        b._set(HOST, 1)
        b._set(IDLE, 0)                          # a deposit a's domain may not see
        a.flush = lambda: None
        bar = make_barrier(kind, a, 0)
        entry = Background(lambda: bar.enter(50_000_000))
        assert entry.result(timeout=20) == Result.TIMEOUT
        assert a.mode == ASI


def test_noflush_variant_does_not_look_at_the_buffer():
    with stun_region(2) as r:
        a, b = cpus(r, 2, StunConfig(protocol="noflush", oversubscribed=True))
        b._set(HOST, 1)
        b._set(ASI, 1)
        assert check(a) == (Result.OK, -1) and a.buffer_dirty(1) == (1, 0)


# -- the spin barrier ------------------------------------------------------------------------

def test_spin_barrier_bails_out_and_reenters_after_the_release():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        waits = []
        bar = SpinBarrier(b, waits.append)
        a.g += 1
        a.w[a.i_gen] = a.g                       # R1: a wants sensitive data
        entry = Background(lambda: bar.enter(5_000_000_000))
        assert a.wait_acks() is True             # b acks from inside the barrier (parks)
        assert b.w[b.i_mode] == STUNNED
        a.enter_host()
        time.sleep(0.02)
        assert not entry.done                    # no VM entry beside HOST
        a.leave_host()
        a.flush()
        a.release()
        assert entry.result() == Result.OK
        assert b.w[b.i_mode] == GUEST and len(waits) == 1 and waits[0] >= 20_000_000
        assert counter(b, "v_s1") == 0


def test_spin_barrier_reports_domain_and_timeout():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        a._set(HOST, 2)
        a._set(ASI, 2)
        assert SpinBarrier(b).enter(1_000_000_000) == Result.DOMAIN
        a._set(HOST, 1)                          # stays in HOST
        t0 = time.monotonic()
        assert SpinBarrier(b).enter(50_000_000) == Result.TIMEOUT
        assert time.monotonic() - t0 < 5


def test_nobarrier_variant_enters_regardless():
    with stun_region(2) as r:
        a, b = cpus(r, 2, StunConfig(protocol="nobarrier", oversubscribed=True))
        a._set(HOST, 1)
        assert SpinBarrier(b).enter(1_000_000) == Result.OK
        assert counter(b, "v_s1") == 1           # the transition-time assertion saw it


# -- the rendezvous --------------------------------------------------------------------------

def test_rendezvous_waits_for_every_present_sibling():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        ba, bb = RendezvousBarrier(a, 0), RendezvousBarrier(b, 0)
        first = Background(lambda: ba.enter(5_000_000_000))
        time.sleep(0.05)
        assert not first.done                    # b is in ASI: present, not arrived
        assert bb.enter(5_000_000_000) == Result.OK
        assert first.result() == Result.OK
        assert a.w[a.i_mode] == GUEST and b.w[b.i_mode] == GUEST
        assert r.array("stun_core")[0]["rv_rounds"] == 1


def test_rendezvous_does_not_wait_for_an_idle_sibling_and_refuses_another_domain():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        b._set(HOST, 0)
        b._set(IDLE, 0)
        b.flush()
        assert RendezvousBarrier(a, 0).enter(1_000_000_000) == Result.OK
        with stun_region(2) as r2:
            c, d = cpus(r2, 2)
            d._set(HOST, 2)
            d._set(ASI, 2)
            d.flush()
            arrived = Background(lambda: RendezvousBarrier(d, 0).enter(200_000_000))
            time.sleep(0.02)
            assert RendezvousBarrier(c, 0).enter(1_000_000_000) == Result.DOMAIN
            assert arrived.result() == Result.TIMEOUT


def test_rendezvous_waiter_answers_a_stun_request():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        bar = RendezvousBarrier(b, 0)
        entry = Background(lambda: bar.enter(3_000_000_000))
        time.sleep(0.02)
        assert a.sensitive() is True             # b left the round to ack, then came back
        assert RendezvousBarrier(a, 0).enter(3_000_000_000) == Result.OK
        assert entry.result() == Result.OK


@pytest.mark.parametrize("name", ["spin", "rendezvous"])
def test_barrier_wait_ends_at_the_guest_store_not_after_the_assertion(name):
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        a._set(HOST, 0)
        a._set(IDLE, 0)                          # an idle sibling: neither barrier waits
        a.flush()
        checked = b.checker.guest_entry

        def slow_check():                        # the assertion after the store: 50 ms
            time.sleep(0.05)
            checked()
        b.checker.guest_entry = slow_check
        waits = []
        assert make_barrier(name, b, 0, waits.append).enter(1_000_000_000) == Result.OK
        assert len(waits) == 1 and waits[0] < 50_000_000


def test_make_barrier_names():
    with stun_region(2) as r:
        a, _ = cpus(r, 2)
        assert make_barrier("spin", a, 0).name == "spin"
        assert make_barrier("rendezvous", a, 0).name == "rendezvous"
        with pytest.raises(ValueError, match="choose from"):
            make_barrier("ticket", a, 0)


# -- the core lock ------------------------------------------------------------------------------

def test_core_lock_waiter_answers_stun_requests():
    with stun_region(2) as r:
        a, b = cpus(r, 2)
        held = CoreLock(a, 0)
        assert held.acquire()
        waiter = Background(CoreLock(b, 0).acquire)
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
        assert waiter.result() is True
        assert granted is True and waited < 1.0 and counter(b, "acks") == 1


def test_only_one_waiter_takes_over_a_dead_holders_lock(monkeypatch):
    dead = 1 << 30                               # the holder's pid; "dead" below
    both_saw_it = threading.Barrier(2, timeout=2)

    def liveness(pid):
        if pid != dead:
            return "alive"
        try:
            both_saw_it.wait()                   # both waiters read the dead holder first
        except threading.BrokenBarrierError:
            pass
        return "dead"
    monkeypatch.setattr(barrier_mod, "liveness", liveness)
    with stun_region(3) as r:
        _, b, c = cpus(r, 3)
        r.semaphore("stuncore0").acquire(0)      # taken by `dead`, which died holding it
        r.words[r.word_index("stun_core", 0, "lock_pid")] = dead
        inside, most = [0], [0]
        guard = threading.Lock()

        def critical(cpu):
            lock = CoreLock(cpu, 0)
            if not lock.acquire():
                return False
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.1)
            with guard:
                inside[0] -= 1
            lock.release()
            return True
        waiters = [Background(lambda cpu=cpu: critical(cpu)) for cpu in (b, c)]
        assert [w.result() for w in waiters] == [True, True]
        assert most[0] == 1, "two waiters broke the same dead holder's lock"
        kinds = [e for e in invariants.events(r) if e["kind"] == "TIMEOUT" and e["detail"] == dead]
        assert len(kinds) == 1


# -- between pinned workers --------------------------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("barrier", ["spin", "rendezvous"])
def test_barrier_under_stress_is_safe_and_measured(barrier):
    e = run_stress(test_topology(), "strict", transitions=12_000, seed=5, barrier=barrier)
    assert e.failures == [] and e.extra["ok"], e.extra["liveness"]
    assert e.counters["violations"] == 0, e.violations[:3]
    assert histogram.summarize(e.hists["barrier_wait"]).count > 0
    if barrier == "rendezvous":
        assert e.counters["rv_rounds"] > 0


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_rendezvous_bench_records_barrier_wait():
    (e,) = run_stun(test_topology(), ["strict"], ["spin"], 0.5, barrier="rendezvous")
    assert e.failures == [] and e.counters["violations"] == 0
    assert histogram.summarize(e.hists["barrier_wait"]).count > 0
    assert e.extra["barrier"] == "rendezvous"
