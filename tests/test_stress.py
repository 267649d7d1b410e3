"""``asirt stress``: randomized transitions with injected delays, S1-S3 and liveness checked.

The first test is the CI version of the issue's done criterion: the same seeded workload,
strict shows zero S1/S2 violations and naive shows some (the full 10-million-transition run
is ``asirt stress --protocol strict,naive --transitions 10000000 --seed 1``, see README.md).
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from asirt.errors import BadInput
from asirt.scenarios.faults import CORRUPT_WORDS
from asirt.scenarios.stress import STRESS_CI, run_stress
from tests.fixtures import test_topology

pytestmark = [pytest.mark.multiprocess, pytest.mark.requires_cpus(2), pytest.mark.timeout(180)]

SEED = 20221


def test_done_criterion_ci_strict_zero_naive_caught_same_seed():
    topo = test_topology()
    strict = run_stress(topo, "strict", transitions=STRESS_CI, seed=SEED)
    naive = run_stress(topo, "naive", transitions=STRESS_CI, seed=SEED)
    for e in (strict, naive):
        assert e.failures == [] and e.extra["liveness"] == [], (e.failures, e.extra["liveness"])
        assert e.counters["cpu.transitions"] >= STRESS_CI
        assert e.extra["seed"] == SEED and e.extra["delays"] is True
    s, n = strict.counters, naive.counters
    assert s["check.s1"] + s["check.s2"] + s["monitor.s1"] + s["monitor.s2"] == 0, \
        strict.violations[:3]
    assert s["violations"] == 0 and strict.problems == [] and strict.claims_safety
    assert n["check.s1"] + n["monitor.s1"] > 0
    assert naive.problems == []           # unsafe protocol: violations expected, not a failure
    assert naive.claims_safety is False


@pytest.mark.parametrize("fault", ["kill", "stop", "delay"])
def test_injected_fault_is_detected_never_waited_for(fault):
    t0 = time.monotonic()
    e = run_stress(test_topology(), "strict", transitions=40_000, seed=3, faults=(fault,))
    assert time.monotonic() - t0 < 90
    (f,) = e.extra["faults"]
    assert f["fault"] == fault and f["injected"] and f["detected"], f
    assert e.failures == []                     # the victim's death is the injected one
    assert e.extra["liveness"] == []            # the survivors kept going
    assert e.counters["violations"] == 0
    assert e.problems == []
    if fault in ("kill", "stop"):
        assert f["detected_as"] == [f["expected"]]
        assert len(e.extra["injected_failures"]) == 1
    else:
        assert f["fenced_by_slots"] == [] and e.extra["injected_failures"] == []


@pytest.mark.parametrize("word", CORRUPT_WORDS)
def test_garbage_in_a_published_word_is_caught_and_the_lane_fenced(word):
    """--faults corrupt: garbage in the victim's mode, generation, ack or histogram. A reader
    reports it, the lane leaves or is fenced off (a histogram is left out of the merge), and
    the run neither crashes, hangs, nor breaks S1-S3."""
    t0 = time.monotonic()
    e = run_stress(test_topology(), "strict", duration_s=2.0, seed=3, faults=("corrupt",),
                   corrupt=word)
    assert time.monotonic() - t0 < 30
    (f,) = e.extra["faults"]
    assert f["word"] == word and f["injected"] and f["detected"], f
    assert e.failures == [] and e.problems == [], (e.failures, e.problems)
    assert e.counters["violations"] == 0
    if word == "hist":
        assert list(e.extra["corrupt_histograms"]) == [str(f["slot"])]
        assert e.hists["barrier_wait"].min() >= 0          # left out of the merge
    else:
        assert "CORRUPT" in f["detected_as"] and e.counters["check.corrupt"] > 0
        assert len(e.extra["injected_failures"]) == 1     # killed by its fencer, or it left


def test_kill_and_stop_each_get_their_own_victim():
    """--faults kill,stop once killed one worker and reported a stop that was never sent."""
    e = run_stress(test_topology(), "strict", duration_s=2.0, seed=5, faults=("kill", "stop"))
    kill, stop = e.extra["faults"]
    assert kill["slot"] != stop["slot"] and len(e.extra["lanes"]) == 2   # a core each
    for f in (kill, stop):
        assert f["injected"] and f["detected"] and f["detected_as"] == [f["expected"]], f
    assert e.failures == [] and e.problems == [] and len(e.extra["injected_failures"]) == 2


class _KillMonitorToo:
    """A progress line that SIGKILLs the monitor, which shares the last CPU with the fault's
    victim, once the fault has been injected."""

    def __init__(self) -> None:
        self.killed = False

    def start(self, label: str) -> None:
        pass

    def done(self, summary: str) -> None:
        pass

    def update(self, fraction: float, slots) -> None:
        if not self.killed and fraction > 0.6:
            os.kill(int(slots["pid"][-1]), signal.SIGKILL)
            self.killed = True


def test_a_sigkill_of_the_monitor_beside_the_victim_fails_the_run():
    """Failures were matched to the fault by CPU: a monitor killed on the victim's CPU passed
    for the injected kill."""
    mon = _KillMonitorToo()
    e = run_stress(test_topology(), "strict", duration_s=2.0, seed=5, faults=("kill",),
                   progress=mon)
    assert mon.killed
    (f,) = e.extra["faults"]
    assert f["detected"] and len(e.extra["injected_failures"]) == 1
    assert [x for x in e.failures if "(monitor, slot 2)" in x and "SIGKILL" in x], e.failures


@pytest.mark.parametrize("transport", ["signal", "sem"])
def test_other_transports_are_safe_under_stress(transport):
    e = run_stress(test_topology(), "strict", transitions=12_000, seed=4, transport=transport)
    assert e.failures == [] and e.problems == [], (e.failures, e.problems)
    assert e.counters["violations"] == 0 and e.counters["cpu.ipis"] > 0


@pytest.mark.parametrize("lanes", [4, 8])
def test_wide_cores_oversubscribed_on_two_cpus(lanes):
    e = run_stress(test_topology(), "strict", transitions=4_000 * lanes // 2, seed=6,
                   lanes_per_core=lanes)
    assert e.failures == [] and e.problems == [], (e.failures, e.problems)
    assert e.extra["oversubscribed"] is True and len(e.extra["lanes"][0]) == lanes
    assert e.counters["violations"] == 0
    assert e.counters["stun.acks"] > e.counters["stun.requests"]   # acked by several siblings


def test_duration_instead_of_transitions():
    e = run_stress(test_topology(), "strict", duration_s=1.0, seed=8)
    assert e.failures == [] and e.problems == []
    assert e.counters["cpu.transitions"] > 0 and e.extra["transitions_target"] is None


def test_bad_input():
    topo = test_topology()
    with pytest.raises(BadInput, match="exactly one"):
        run_stress(topo, "strict", transitions=10, duration_s=1)
    with pytest.raises(BadInput, match="exactly one"):
        run_stress(topo, "strict")
    with pytest.raises(BadInput, match="unknown fault"):
        run_stress(topo, "strict", duration_s=1, faults=("meteor",))
    with pytest.raises(BadInput, match="corrupt word"):
        run_stress(topo, "strict", duration_s=1, faults=("corrupt",), corrupt="cosmic ray")
    with pytest.raises(BadInput, match="--workers 3"):
        run_stress(topo, "strict", duration_s=1, workers=3)
    with pytest.raises(BadInput):
        run_stress(topo, "careless", duration_s=1)
