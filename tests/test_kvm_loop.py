"""The vCPU loop (asirt.kvm.loop) in-process: what one lane does per cycle under each
strategy, and how it leaves the core. The comparison across processes is test_kvm.py's."""
from __future__ import annotations

import time

import pytest

from asirt.cpu import ASI, GUEST, HOST, IDLE
from asirt.cpu.checks import sample_leaks
from asirt.kvm import strategy
from asirt.kvm.lane import Lane
from asirt.sync.barrier import Result
from tests.fixtures import close_loops, counter, cpu_region, make_loops, mode_of

pytestmark = pytest.mark.timeout(60)


def _run(loop, seconds: float) -> None:
    end = time.monotonic() + seconds
    loop.start()
    Lane(loop).run(lambda: time.monotonic() > end)


@pytest.mark.parametrize("name", strategy.NAMES)
def test_stop_never_enters_host(name):
    """The way out goes to IDLE without HOST: the run is stopping, no stun can be had, and a
    sibling may still be in GUEST (it did: S1 and a host-data leak at the end of a run)."""
    with cpu_region(2, vms=1) as r:
        loops = make_loops(r, 2, name)
        try:
            a, b = loops
            sib = b.state
            sib.set(ASI, 1)
            sib.enter_guest()                     # the sibling is still in its guest slice
            st = a.state
            st.set(ASI, 1)
            st.enter_guest()
            hosts = counter(a.cpu, "cpu.host_entries")
            a.stop()
            assert mode_of(a.cpu) == IDLE
            assert counter(a.cpu, "cpu.host_entries") == hosts
            assert counter(b.cpu, "check.s1") == counter(a.cpu, "check.s1") == 0
        finally:
            close_loops(loops)


def test_stop_from_host_releases_the_stun_first():
    with cpu_region(1, vms=1) as r:
        (lp,) = make_loops(r, 1, "always")
        try:
            lp.start()                            # HOST, its stun held
            assert mode_of(lp.cpu) == HOST and lp.stun_held
            lp.stop()
            assert mode_of(lp.cpu) == IDLE and not lp.stun_held
            assert lp.stun.g % 2 == 0              # released
        finally:
            close_loops([lp])


def test_always_stuns_every_exit_and_flushes_every_entry():
    with cpu_region(1, vms=1) as r:
        (lp,) = make_loops(r, 1, "always", tick_ms=50.0, host_share=0.0)
        try:
            _run(lp, 0.3)
            lp.stop()
            c = lp.cpu
            exits = counter(c, "kvm.exits")
            assert exits > 50
            # every exit stuns (the start's request and the halts' wake-ups stun too)
            assert counter(c, "stun.requests") >= exits
            assert counter(c, "buffer.flushes") >= counter(c, "cpu.guest_entries")
        finally:
            close_loops([lp])


def test_none_never_stuns_nor_flushes():
    with cpu_region(1, vms=1) as r:
        (lp,) = make_loops(r, 1, "none")
        try:
            _run(lp, 0.2)
            lp.stop()
            c = lp.cpu
            assert counter(c, "kvm.exits") > 20
            assert counter(c, "stun.requests") == counter(c, "buffer.flushes") == 0
            assert counter(c, "check.s3") > 0     # the host's data is there at every entry
        finally:
            close_loops([lp])


def test_asi_handles_exits_restricted_and_stuns_only_when_it_leaves():
    with cpu_region(1, vms=1) as r:
        (lp,) = make_loops(r, 1, "asi", profile="io-heavy", host_share=0.0, tick_ms=100.0)
        try:
            _run(lp, 0.3)
            lp.stop()
            c = lp.cpu
            exits, restricted = counter(c, "kvm.exits"), counter(c, "kvm.exits_restricted")
            assert 0 < restricted < exits
            left = exits - restricted
            # a stun per exit that left the restricted space, plus the start and the halts'
            # way back through the kernel (a wake-up is kernel work)
            assert left <= counter(c, "stun.requests") <= left + counter(c, "kvm.halts") + 2
            assert counter(c, "asi.faults") > 0
        finally:
            close_loops([lp])


def test_gadgets_load_secrets_only_in_the_full_address_space():
    for name, hits in (("kcs", True), ("asi", False)):
        with cpu_region(1, vms=1) as r:
            (lp,) = make_loops(r, 1, name, gadgets=1.0, host_share=0.0)
            try:
                _run(lp, 0.15)
                lp.stop()
                c = lp.cpu
                assert counter(c, "asi.gadgets") > 10
                assert (counter(c, "asi.gadget_hits") > 0) == hits, name
            finally:
                close_loops([lp])


def test_cycle_overhead_excludes_the_drawn_work():
    """vm_cycle_overhead: exit to exit minus the drawn guest interval and handler time."""
    got: list[int] = []
    with cpu_region(1, vms=1) as r:
        (lp,) = make_loops(r, 1, "none", profile="cpu-bound", host_share=0.0, tick_ms=200.0,
                           rec={"vm_cycle_overhead": got.append})
        try:
            _run(lp, 0.4)
            lp.stop()
        finally:
            close_loops([lp])
    assert len(got) > 5
    got.sort()
    # relative to the work it must leave out (the drawn guest intervals, ~0.9 ms on average
    # under cpu-bound), never an absolute time: the overhead is a small part of it
    drawn = sorted(lp.interval[:len(got)])
    assert 0 < got[len(got) // 2] < drawn[len(drawn) // 2] / 4


@pytest.mark.parametrize("name", ["always", "asi", "kcs", "asi+kcs"])
@pytest.mark.parametrize("how", ["stop", "halt"])
def test_a_lane_going_idle_leaves_no_vm_data_for_its_sibling(name, how):
    """Once a lane shows domain 0, its sibling may enter another VM (B3): what the idle lane's
    VM left in the core buffer must be flushed by then (the end of a run showed S3 and a leak
    of VM 1's data to VM 2 under 'always' about one run in eight)."""
    with cpu_region(2, vms=2) as r:
        loops = make_loops(r, 2, name, vms=2)
        try:
            a, b = loops
            a.state.set(ASI, 1)
            a.asi.access(a.mem.local[1][0])       # VM 1's data, in the buffer
            assert b.cpu.buffer.dirty_for(2) is not None
            if how == "stop":
                a.stop()
            else:
                a.go_idle()
            assert mode_of(a.cpu) == IDLE and a.stun.g % 2 == 0 and not a.stun_held
            assert b.cpu.buffer.dirty_for(2) is None
        finally:
            close_loops(loops)


@pytest.mark.parametrize("name", ["always", "asi", "kcs", "asi+kcs"])
@pytest.mark.parametrize("preempted", [False, True])
def test_a_sibling_between_its_b1_and_b3_never_enters_over_an_idling_lane_s_data(name,
                                                                                   preempted):
    """B loads A's generation (even), then A goes idle, then B loads A's domain (B3). With a
    generation raised but domain 0 shown before the flush (Stun.hold, once), B entered VM 2
    over VM 1's data. Now A keeps its domain until its flush: B is refused while A is between
    the two (``preempted``), and finds the buffer flushed after (model/README.md, step I)."""
    with cpu_region(2, vms=2) as r:
        loops = make_loops(r, 2, name, vms=2)
        try:
            a, b = loops
            a.state.set(ASI, 1)
            a.asi.access(a.mem.local[1][0])       # VM 1's data in the core buffer
            b.state.set(ASI, 2)                   # B is about to enter VM 2
            calls = []

            class Preempted(Exception):
                pass

            def flush_never_comes(reason: int) -> None:
                raise Preempted                   # A stops running just before its flush

            def between_b1_and_b3() -> None:      # B's delay hook runs after its B1 load
                calls.append(1)
                if len(calls) == 1:
                    if preempted:
                        a.state.flush = flush_never_comes
                        with pytest.raises(Preempted):
                            a.go_idle()
                    else:
                        a.go_idle()
            b.cpu.dl = between_b1_and_b3
            res = b.barrier.enter(10**9 if not preempted else 50_000_000)
            b.cpu.dl = None
            assert calls
            if preempted:
                assert res == Result.DOMAIN and mode_of(b.cpu) == ASI
            else:
                assert res == Result.OK and mode_of(b.cpu) == GUEST
                assert counter(b.cpu, "check.s3") == 0 and sample_leaks(b.cpu) == 0
        finally:
            close_loops(loops)
