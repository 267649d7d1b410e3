"""The stress run's liveness verdict (asirt.scenarios.stress.Watch) can fail: each problem it
reports -- STALL, NO_PROGRESS_AFTER_FAULT, UNFINISHED -- shown on a made-up run (a slots
array the test writes, the parent's view of the workers), with the look-alikes it must not
report; then UNFINISHED once end to end, on a run given more transitions than it has time for.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from asirt.orchestrator import RunOutcome
from asirt.params import StressParams
from asirt.scenarios.common import plan
from asirt.scenarios.stress import Watch, run_stress
from shm_layout import SLOT_DTYPE
from shm_layout.cpu import Phase
from shm_layout.sections import WorkerState
from tests.fixtures import cpu_region, test_topology

STALL_S = 0.02          # the made-up runs' stall threshold; the tests wait well past it


def _watch(*, victim: int | None = None, faults: tuple[str, ...] = (),
           transitions: int | None = None, run_s: float = 60.0, stall_s: float = 60.0,
           holder: dict | None = None) -> Watch:
    """The watch of a stress run on one core of two lanes (slots 0 and 1), no monitor."""
    pl = plan([[0, 0]], "stress", lambda k, lane: StressParams(), monitor=False)
    return Watch(pl, victim, faults, transitions, run_s, stall_s, None,
                 {} if holder is None else holder)


def _slots(progress: list[int], pids: list[int] | None = None) -> np.ndarray:
    """Both workers running (this process, unless ``pids`` says otherwise)."""
    slots = np.zeros(len(progress), SLOT_DTYPE)
    slots["progress"] = progress
    slots["pid"] = pids if pids is not None else os.getpid()
    slots["state"] = WorkerState.RUNNING
    return slots


def _outcome(elapsed_s: float, failures: list | None = None) -> RunOutcome:
    return RunOutcome(np.zeros((2, 1, 1), np.int64), _slots([0, 0]), failures or [], elapsed_s)


def _collected(transitions: list[int]) -> dict:
    return {"counters": [{"cpu.transitions": t} for t in transitions]}


def _frozen(watch: Watch, slots: np.ndarray) -> None:
    """Two looks at ``slots`` farther apart than the stall threshold; slot 0 moves on."""
    watch.update(0.1, slots)
    time.sleep(5 * STALL_S)
    slots["progress"][0] += 1
    watch.update(0.2, slots)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- STALL ------------------------------------------------------------------------------------

def test_a_running_worker_whose_progress_froze_is_a_stall():
    watch = _watch(stall_s=STALL_S)
    _frozen(watch, _slots([5, 5]))
    problems = watch.finish(_outcome(1.0), _collected([6, 5]))
    assert [(p["kind"], p["slot"]) for p in problems] == [("STALL", 1)], problems
    assert problems[0]["stalled_s"] >= STALL_S


def test_progress_within_the_threshold_is_no_stall():
    watch = _watch(stall_s=60.0)
    _frozen(watch, _slots([5, 5]))
    assert watch.finish(_outcome(1.0), _collected([6, 5])) == []


@pytest.mark.parametrize("why", ["victim", "dead", "done", "finished"])
def test_a_frozen_worker_that_is_not_stalled(why):
    """The fault's victim, a dead worker (a failure, reported as one), one that is done, and
    one that finished its share and waits for its siblings (Stun.finish)."""
    with cpu_region(2) as r:
        slots = _slots([5, 5], pids=[os.getpid(), _dead_pid() if why == "dead" else os.getpid()])
        if why == "done":
            slots["state"][1] = WorkerState.DONE
        if why == "finished":
            r.array("cpu_state")["phase"][1] = Phase.FINISHED
        watch = _watch(stall_s=STALL_S, victim=1 if why == "victim" else None,
                       holder={"region": r})
        _frozen(watch, slots)
        assert watch.stalls == {}
        assert [p["kind"] for p in watch.finish(_outcome(1.0), _collected([6, 5]))] == []


# -- NO_PROGRESS_AFTER_FAULT --------------------------------------------------------------------

def test_a_survivor_without_progress_after_the_fault():
    """The victim is killed a third of the way in; a survivor whose transitions did not move
    on from then is reported, one that did move on is not."""
    victim = subprocess.Popen(["sleep", "30"])
    try:
        watch = _watch(victim=1, faults=("kill",), run_s=60.0)
        watch.update(0.1, _slots([100, 50], pids=[os.getpid(), victim.pid]))
        assert not watch.injected                              # too early
        watch.update(0.35, _slots([100, 50], pids=[os.getpid(), victim.pid]))
        assert victim.wait(timeout=10) == -signal.SIGKILL
        assert watch.at_injection == {0: 100, 1: 50}
        problems = watch.finish(_outcome(60.0), _collected([100, 50]))
        assert [(p["kind"], p["slot"]) for p in problems] == [("NO_PROGRESS_AFTER_FAULT", 0)]
        assert watch.finish(_outcome(60.0), _collected([101, 50])) == []
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


# -- UNFINISHED -----------------------------------------------------------------------------

def test_transitions_not_done_in_the_time_allowed_are_unfinished():
    watch = _watch(transitions=1000, run_s=2.0)
    problems = watch.finish(_outcome(2.0), _collected([500, 499]))     # each owes 500
    assert [(p["kind"], p["slots"]) for p in problems] == [("UNFINISHED", [1])], problems
    assert watch.finish(_outcome(2.0), _collected([500, 500])) == []   # done at the bell
    assert watch.finish(_outcome(1.0), _collected([500, 499])) == []   # ended early: a failure
    failed = _outcome(2.0, failures=["a worker failed"])
    assert watch.finish(failed, _collected([500, 499])) == []          # reported as a failure


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_a_stress_run_out_of_time_is_not_ok():
    e = run_stress(test_topology(), "strict", transitions=10**12, seed=1, max_s=1.0)
    assert e.failures == []
    assert [p["kind"] for p in e.extra["liveness"]] == ["UNFINISHED"], e.extra["liveness"]
    assert e.counters["liveness_violations"] == 1 and e.problems
