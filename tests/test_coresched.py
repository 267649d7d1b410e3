"""Core scheduling: PR_SCHED_CORE semantics, force idle, kernel core scheduling, the real prctl."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest

from asirt import histogram
from asirt.cpu import ASI, GUEST, HOST
from asirt.errors import FeatureMissing
from asirt.scenarios.coresched import run_coresched
from asirt.sync import coresched
from asirt.sync.barrier import Result, SpinBarrier
from asirt.sync.corelock import CoreLock
from asirt.sync.coresched import (HOST_COOKIE, PR_SCHED_CORE_CREATE, PR_SCHED_CORE_GET,
                                  SCOPE_PROCESS_GROUP, SCOPE_THREAD, SCOPE_THREAD_GROUP,
                                  CookieTable, CoreSched, KernelCoreSched, RealCoreSched,
                                  cookies_match, probe)
from tests.fixtures import Background, counter, cpu_region, make_cpus, make_stuns, test_topology


# -- the emulated prctl --------------------------------------------------------------------

@pytest.fixture
def table():
    t = CookieTable()
    t.add(100)                    # process 100: threads 100, 101; process group 100
    t.add(101, tgid=100, pgid=100)
    t.add(200, pgid=100)          # another process in the same group
    t.add(300)                    # unrelated
    return t


def test_tasks_start_untagged_and_create_gives_a_new_cookie(table):
    assert table.get(100) == HOST_COOKIE
    c1 = table.create(100)
    c2 = table.create(300)
    assert c1 != HOST_COOKIE and c2 != HOST_COOKIE and c1 != c2
    assert table.get(101) == HOST_COOKIE         # thread scope: only that thread


def test_create_scopes(table):
    c = table.create(100, SCOPE_THREAD_GROUP)
    assert table.get(101) == c and table.get(200) == HOST_COOKIE
    g = table.create(100, SCOPE_PROCESS_GROUP)
    assert {table.get(t) for t in (100, 101, 200)} == {g} and table.get(300) == HOST_COOKIE


def test_share_to_and_from(table):
    c = table.create(300)
    table.share_to(200, current=300)             # push my cookie to 200
    assert table.get(200) == c
    table.share_from(300, current=100)           # pull 300's cookie into me
    assert table.get(100) == c and table.get(101) == HOST_COOKIE
    table.share_to(100, SCOPE_THREAD_GROUP, current=300)
    assert table.get(101) == c


def test_prctl_errors_follow_the_kernel(table):
    def err(fn):
        with pytest.raises(OSError) as info:
            fn()
        return info.value.errno
    assert err(lambda: table.get(999)) == errno.ESRCH
    assert err(lambda: table.prctl(PR_SCHED_CORE_GET, 100, SCOPE_THREAD_GROUP, 100)) == errno.EINVAL
    assert err(lambda: table.prctl(3, 100, SCOPE_THREAD_GROUP, 100)) == errno.EINVAL  # SHARE_FROM
    assert err(lambda: table.prctl(7, 100, SCOPE_THREAD, 100)) == errno.EINVAL
    assert err(lambda: table.prctl(PR_SCHED_CORE_CREATE, 100, 3, 100)) == errno.EINVAL
    assert err(lambda: table.prctl(PR_SCHED_CORE_CREATE, -1, 0, 100)) == errno.EINVAL
    assert table.prctl(PR_SCHED_CORE_CREATE, 0, SCOPE_THREAD, 300) == 0    # pid 0: current
    assert table.get(300) != HOST_COOKIE


def test_only_equal_cookies_share_a_core():
    assert cookies_match(0, 0) and cookies_match(5, 5)
    assert not cookies_match(0, 5) and not cookies_match(5, 6)


# -- the real prctl --------------------------------------------------------------------------

def test_probe_reports_support_or_says_it_continues_emulated():
    s = probe()
    if s.supported:
        assert isinstance(RealCoreSched.get(), int)
    else:
        assert s.errno in (errno.EINVAL, errno.ENODEV, errno.EPERM)
        assert "not supported" in s.message and "continuing emulated" in s.message
        if s.errno == errno.EINVAL:
            assert "CONFIG_SCHED_CORE" in s.message
        with pytest.raises(FeatureMissing) as info:
            RealCoreSched()
        assert "continuing emulated" in str(info.value)
    # the workers schedule with the emulated CoreSched whatever the kernel can do
    assert coresched.backend_report() == {
        "backend": "emulated",
        "kernel_core_sched": "supported" if s.supported else "not supported",
        "note": s.message}


# -- force idle, in-process --------------------------------------------------------------------

def _scheds(r, **kw_b):
    a, b = make_cpus(r, 2)
    return a, b, CoreSched(a, CoreLock(a)), CoreSched(b, CoreLock(b), **kw_b)


def test_a_sibling_of_another_cookie_is_forced_idle_until_the_core_is_free():
    with cpu_region(2) as r:
        forced = []
        a, b, ca, cb = _scheds(r, patience_ns=10**9, rec_forced=forced.append)
        assert ca.run_task(7) is True
        assert cb.run_task(9, max_wait_ns=30_000_000) is False   # forced idle, gave up
        assert cb.run_task(7) is True                          # same cookie: together
        cb.stop_task()
        waiting = Background(lambda: cb.run_task(9, max_wait_ns=5_000_000_000))
        time.sleep(0.03)
        assert not waiting.done
        ca.stop_task()                                         # the core is free: 9 runs
        assert waiting.result() is True
        assert len(forced) == 1 and forced[0] >= 30_000_000
        assert counter(b, "coresched.forced_idle") == 1
        assert r.array("core_sync")[0]["cookie"][1] == 9
        cb.stop_task()


def test_a_patient_sibling_claims_the_core_next_and_the_runner_yields_at_its_safe_point():
    with cpu_region(2) as r:
        a, b, ca, cb = _scheds(r, patience_ns=1_000_000)
        assert ca.run_task(1) is True
        claim = Background(lambda: cb.run_task(2, max_wait_ns=5_000_000_000))
        deadline = time.monotonic() + 5
        while not a.safepoint() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert ca.yield_now                       # b wants the core for cookie 2
        ca.stop_task()
        assert ca.run_task(1, max_wait_ns=5_000_000) is False   # the claim goes first
        assert claim.result() is True
        cb.stop_task()


def test_a_dead_sibling_holding_its_task_is_fenced_by_the_short_waits_behind_it():
    """Each forced-idle wait is bounded by a tick, far below the ack timeout, and runs of the
    dead sibling's own cookie come between them: their sum must still reach a liveness check
    (asirt stress --strategy coresched --faults kill found the dead lane never fenced)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with cpu_region(2, pids=[os.getpid(), dead.pid]) as r:
        a, b, ca, cb = _scheds(r, patience_ns=10**9)
        assert cb.run_task(7) is True              # lane 1 runs cookie 7, then "dies"
        deadline = time.monotonic() + 5
        while not a.fenced_mask >> 1 & 1 and time.monotonic() < deadline:
            if ca.run_task(9, max_wait_ns=2_000_000):   # a tick's wait behind it
                ca.stop_task()
                break
            assert ca.run_task(7, 0) is True             # its cookie runs beside it
            ca.stop_task()
        assert a.fenced_mask >> 1 & 1
        assert counter(a, "cpu.fenced") == 1
        assert ca.run_task(9, max_wait_ns=2_000_000) is True   # out of the core's record
        ca.stop_task()


def test_a_live_sibling_that_stops_its_task_clears_the_suspicion_of_the_waits_behind_it():
    """The waits behind one lane add up only while it keeps its task: once it stops it (alive,
    making progress), a later wait behind it starts afresh -- no timeout, no liveness check of
    a healthy sibling, and the wait's phase published again."""
    with cpu_region(2) as r:
        a, b, ca, cb = _scheds(r, patience_ns=10**9)
        for _ in range(2):
            assert cb.run_task(7) is True
            assert ca.run_task(9, max_wait_ns=2_000_000) is False    # forced idle, a tick
            cb.stop_task()                                           # the sibling moves on
            assert ca.run_task(9, 0) is True
            ca.stop_task()
            time.sleep(a.params.ack_timeout_ms * 2e-3)               # past the ack timeout
        assert counter(a, "cpu.timeouts") == 0
        assert counter(a, "cpu.fenced") == 0


# -- kernel core scheduling ------------------------------------------------------------------

def test_kcs_drops_to_the_host_cookie_for_sensitive_code_only():
    with cpu_region(1) as r:
        (a,) = make_stuns(r, 1)
        kcs = KernelCoreSched(a, SpinBarrier(a))
        cookie = r.array("core_sync")[0]["cookie"]
        assert kcs.vm_entry(1_000_000_000) == Result.OK
        assert a.cpu.state.mode == GUEST and cookie[0] == 1
        kcs.vm_exit()                               # non-sensitive kernel code: tag kept
        assert a.cpu.state.mode == ASI and cookie[0] == 1
        seen = []
        assert kcs.sensitive(lambda: seen.append((a.cpu.state.mode, int(cookie[0]))))
        assert seen == [(HOST, HOST_COOKIE)]        # untagged while sensitive
        assert cookie[0] == 1


# -- between pinned workers --------------------------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_enforced_core_scheduling_never_mixes_cookies_and_measures_forced_idle():
    e = run_coresched(test_topology(), 1.0, seed=3, enforce=True)
    assert e.failures == []
    assert e.counters["violations"] == 0, e.violations[:3]
    assert e.counters["coresched.tasks"] > 0 and e.counters["monitor.samples"] > 0
    assert e.counters["coresched.forced_idle"] > 0 and e.counters["coresched.forced_idle_ns"] > 0
    assert (histogram.summarize(e.hists["forced_idle"]).count
            == e.counters["coresched.forced_idle"])
    assert e.extra["core_sched"]["backend"] == "emulated"
    assert e.extra["core_sched"]["kernel_core_sched"] in ("supported", "not supported")


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_without_core_scheduling_the_monitor_sees_cookies_mixed():
    e = run_coresched(test_topology(), 1.0, seed=3, enforce=False)
    assert e.failures == []
    assert e.counters["monitor.s2"] > 0 and e.counters["coresched.forced_idle"] == 0
