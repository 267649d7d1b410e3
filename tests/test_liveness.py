"""The stress run's liveness verdict (asirt.scenarios.stress.Watch) and what a run must earn
(asirt.scenarios.stress.unearned) can fail: each problem -- STALL, NO_PROGRESS_AFTER_FAULT,
LIMPING, UNFINISHED, nothing checked -- shown on a made-up run (a slots array the test
writes, the parent's view of the workers), with the look-alikes it must not report; then end
to end: a run given more transitions than it has time for, and a stall in a run shorter than
10 s.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from asirt.errors import WorkerFailed
from asirt.orchestrator import RunOutcome
from asirt.params import StressParams
from asirt.scenarios.common import plan
from asirt.scenarios.faults import Faults
from asirt.scenarios.stress import STALL_S as RUN_STALL_S
from asirt.scenarios.stress import Watch, run_stress, unearned
from shm_layout import SLOT_DTYPE
from shm_layout.counters import COUNTERS
from shm_layout.cpu import Phase
from shm_layout.sections import WorkerState
from tests.fixtures import cpu_region, test_topology

STALL_S = 0.02          # the made-up runs' stall threshold; the tests wait well past it


def _watch(*, faults: tuple[str, ...] = (), transitions: int | None = None,
           run_s: float = 60.0, stall_s: float = 60.0, holder: dict | None = None,
           idle: tuple[int, ...] = ()) -> Watch:
    """The watch of a stress run on one core of two lanes (slots 0 and 1), no monitor; a
    fault's victim is slot 1."""
    pl = plan([[0, 0]], "stress", lambda k, lane: StressParams(), monitor=False)
    return Watch(pl, Faults(pl, faults), transitions, run_s, stall_s, None,
                 {} if holder is None else holder, idle)


def _slots(progress: list[int], pids: list[int] | None = None) -> np.ndarray:
    """Both workers running (this process, unless ``pids`` says otherwise)."""
    slots = np.zeros(len(progress), SLOT_DTYPE)
    slots["progress"] = progress
    slots["pid"] = pids if pids is not None else os.getpid()
    slots["state"] = WorkerState.RUNNING
    return slots


def _outcome(elapsed_s: float, failures: list[WorkerFailed] | None = None) -> RunOutcome:
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


def test_a_lane_idle_by_design_is_no_stall():
    """Under smt-off the second lane never runs a vCPU: no progress is expected of it."""
    watch = _watch(stall_s=STALL_S, idle=(1,))
    _frozen(watch, _slots([5, 5]))
    assert watch.finish(_outcome(1.0), _collected([6, 5])) == []


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
        watch = _watch(stall_s=STALL_S, faults=("kill",) if why == "victim" else (),
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
        watch = _watch(faults=("kill",), run_s=60.0)
        watch.update(0.1, _slots([100, 50], pids=[os.getpid(), victim.pid]))
        assert watch.injected_at is None                       # too early
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


def test_a_survivor_that_limps_on_after_the_fault():
    """A survivor that moves after the fault, but at a hundredth of its earlier rate (a wait
    for the dead victim at every step), is not a survivor that kept going."""
    watch = _watch(faults=("kill",))
    watch.started, watch.injected_at, watch.prev = 0.0, 10.0, 20.0
    watch.at_injection = {0: 10_000, 1: 5_000}
    problems = watch.finish(_outcome(20.0), _collected([10_100, 5_000]))  # 10/s after 1000/s
    assert [(p["kind"], p["slot"]) for p in problems] == [("LIMPING", 0)], problems
    assert problems[0]["per_s_before"] == 1000 and problems[0]["per_s_after"] == 10
    assert watch.finish(_outcome(20.0), _collected([16_000, 5_000])) == []   # 600/s: fine


# -- UNFINISHED -----------------------------------------------------------------------------

def test_transitions_not_done_in_the_time_allowed_are_unfinished():
    watch = _watch(transitions=1000, run_s=2.0)
    problems = watch.finish(_outcome(2.0), _collected([500, 499]))     # each owes 500
    assert [(p["kind"], p["slots"]) for p in problems] == [("UNFINISHED", [1])], problems
    assert watch.finish(_outcome(2.0), _collected([500, 500])) == []   # done at the bell
    assert watch.finish(_outcome(1.0), _collected([500, 499])) == []   # ended early: a failure
    failed = _outcome(2.0, failures=[WorkerFailed(0, "was killed by SIGKILL", slot=1)])
    assert watch.finish(failed, _collected([500, 499])) == []          # reported as a failure


def test_a_failure_elsewhere_does_not_excuse_an_unfinished_survivor():
    """Any failure used to switch UNFINISHED off: a survivor short of its share went
    unreported whenever another worker (the fault's victim, say) had died."""
    watch = _watch(transitions=1000, run_s=2.0)
    failed = _outcome(2.0, failures=[WorkerFailed(0, "was killed by SIGKILL", slot=0)])
    problems = watch.finish(failed, _collected([10, 499]))
    assert [(p["kind"], p["slots"]) for p in problems] == [("UNFINISHED", [1])], problems


# -- what a run must earn ---------------------------------------------------------------------

def _totals(**given: int) -> dict[str, int]:
    """The summed counters of a run that checked everything, with ``given`` (dots as __)."""
    t = dict.fromkeys(COUNTERS, 0)
    t.update({"cpu.transitions": 9000, "monitor.samples": 500, "check.checks": 4000,
              "check.samples": 800, "stun.requests": 1000})
    t.update({k.replace("__", "."): v for k, v in given.items()})
    return t


def test_a_run_that_checked_everything_earned_it():
    assert unearned(_totals(), monitor=True, check=True, strict=True) == []


@pytest.mark.parametrize("given,needle", [
    ({"monitor__samples": 0}, "the monitor took no sample"),
    ({"check__checks": 0}, "no transition was checked"),
    ({"check__samples": 0}, "no guest sampled the core buffer"),
    ({"stun__aborts": 1000}, "no stun request completed (1000 made, 1000 of them given up)"),
    ({"stun__requests": 0}, "no stun request completed (0 made"),
])
def test_a_run_that_checked_nothing_did_not_earn_its_success(given, needle):
    (problem,) = unearned(_totals(**given), monitor=True, check=True, strict=True)
    assert needle in problem


def test_what_a_run_was_not_asked_to_check_is_not_held_against_it():
    t = _totals(monitor__samples=0, check__checks=0, stun__aborts=1000)
    assert unearned(t, monitor=False, check=False, strict=False) == []


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(120)
def test_a_stress_run_out_of_time_is_not_ok():
    e = run_stress(test_topology(), "strict", transitions=10**12, seed=1, max_s=1.0)
    assert e.failures == []
    assert [p["kind"] for p in e.extra["liveness"]] == ["UNFINISHED"], e.extra["liveness"]
    assert e.counters["liveness_violations"] == 1 and e.problems


class _Freeze:
    """A progress line that, once the run is under way, stops lane 0 (SIGSTOP) for 2.5 s and
    lets it go again: with STONITH off nobody kills it, so its sibling's requests wait on a
    live process that never answers -- a deadlock, for 2.5 s of a 4 s run."""

    def __init__(self) -> None:
        self.stopped_at: float | None = None
        self.pid = 0
        self.resumed = False

    def start(self, label: str) -> None:
        pass

    def done(self, summary: str) -> None:
        pass

    def update(self, fraction: float, slots: np.ndarray) -> None:
        now = time.monotonic()
        if self.stopped_at is None and fraction > 0.1:
            self.pid = int(slots["pid"][0])
            os.kill(self.pid, signal.SIGSTOP)
            self.stopped_at = now
        elif self.stopped_at is not None and not self.resumed and now - self.stopped_at > 2.5:
            os.kill(self.pid, signal.SIGCONT)
            self.resumed = True


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(60)
def test_a_stall_in_a_run_shorter_than_ten_seconds_fails_it():
    """A stall once needed 10 s without progress: a deadlock in a default-length run passed."""
    assert RUN_STALL_S <= 2.0
    freeze = _Freeze()
    try:
        e = run_stress(test_topology(), "strict", duration_s=4.0, seed=2, stonith=False,
                       progress=freeze)
    finally:
        if freeze.pid and not freeze.resumed:
            os.kill(freeze.pid, signal.SIGCONT)
    assert freeze.resumed, "the run ended before the stop was over"
    stalls = {p["slot"]: p for p in e.extra["liveness"] if p["kind"] == "STALL"}
    assert 1 in stalls, e.extra["liveness"]          # (lane 0 too, seen as it resumes)
    assert stalls[1]["stalled_s"] >= RUN_STALL_S
    assert any("STALL" in p for p in e.problems) and e.failures == []
