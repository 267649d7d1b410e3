"""How each injected fault is judged (asirt.scenarios.faults), on made-up evidence: the
evidence must name the victim, a wrong kind of detection is no detection, and only the death a
fault causes is expected of its victim. End-to-end runs of every fault: tests/test_stress.py
and tests/test_soak.py."""
from __future__ import annotations

import numpy as np
import pytest

from asirt.errors import WorkerFailed
from asirt.histogram import NBUCKETS
from asirt.params import StressParams
from asirt.scenarios.common import plan
from asirt.scenarios.faults import Faults, bad_histograms
from shm_layout.counters import COUNTERS


def _faults(*kinds: str, word: str = "mode", **kw) -> Faults:
    """One core of two lanes (slots 2k, 2k+1) per fault; its victim the odd slot."""
    pl = plan([[0, 1]] * len(kinds), "stress", lambda k, lane: StressParams(), monitor=True)
    return Faults(pl, kinds, word, **kw)


def _counters(n: int, **per_slot: dict[str, int]) -> list[dict[str, int]]:
    out = [dict.fromkeys(COUNTERS, 0) for _ in range(n)]
    for slot, given in per_slot.items():
        out[int(slot[1:])].update(given)
    return out


def _judge(faults: Faults, events=(), counters=None, fenced=None, failures=(), hists=None,
           core_sched=()):
    n = len(faults.plan.workers)
    return faults.judge(list(events), counters or _counters(n), fenced or [0] * n,
                        list(failures), hists or {}, core_sched)


def _event(kind: str, slot: int, other: int, ns: int = 2_000_000) -> dict:
    return {"kind": kind, "slot": slot, "other_slot": other, "ns": ns}


def test_a_delay_is_detected_by_the_waits_it_caused_not_by_others():
    """Slow waits used to be counted per CPU: any of them, on any lane, made an injected delay
    'detected'. Only the victim's count of its siblings' waits during its delay counts now."""
    f = _faults("delay")
    busy = {"cpu.slow": 40, "cpu.timeouts": 40}            # the sibling waited, for others
    (r,) = _judge(f, counters=_counters(3, s0=busy, s1={"fault.delays": 1}))
    assert r["injected"] and not r["detected"], r
    (r,) = _judge(f, counters=_counters(3, s1={"fault.delays": 1, "fault.delay_waits": 9}))
    assert r["detected"] and "9 liveness checks" in r["detail"]


def test_a_delay_never_reached_is_not_injected_and_a_fenced_one_is_misjudged():
    f = _faults("delay")
    (r,) = _judge(f)
    assert r["injected"] is False and "never reached" in r["detail"]
    waited = _counters(3, s1={"fault.delays": 1, "fault.delay_waits": 9})
    (r,) = _judge(f, counters=waited, fenced=[0b10, 0, 0])
    assert not r["detected"] and r["fenced_by_slots"] == [0]     # it was alive: never fence


@pytest.mark.parametrize("kind,want", [("kill", "FENCE_DEAD"), ("stop", "FENCE_STOPPED")])
def test_a_kill_or_stop_is_detected_by_a_fence_of_its_own_kind(kind, want):
    f = _faults(kind)
    f.faults[0].injected_ns = 1_000_000
    other = "FENCE_STOPPED" if want == "FENCE_DEAD" else "FENCE_DEAD"
    (r,) = _judge(f, [_event(other, 0, 1)], fenced=[0b10, 0, 0])
    assert not r["detected"] and r["detected_as"] == [other]
    (r,) = _judge(f, [_event(want, 0, 1), _event(want, 0, 0)], fenced=[0b10, 0, 0])
    assert r["detected"] and r["detect_after_ms"] == 1.0
    (r,) = _judge(f, [_event(want, 0, 1)])                       # an event, but nobody fenced
    assert not r["detected"]


def test_a_corrupt_word_needs_a_report_and_the_lane_out():
    f = _faults("corrupt", word="gen")
    f.faults[0].injected_ns = 1_000_000
    report = _event("CORRUPT", 2, 1)                              # the monitor saw it
    (r,) = _judge(f, [report])
    assert not r["detected"], "reported, but the lane kept running"
    (r,) = _judge(f, [report], fenced=[0b10, 0, 0])
    assert r["detected"]
    left = WorkerFailed(1, "exited with status 7", slot=1)
    (r,) = _judge(f, [report], failures=[left])
    assert r["detected"]


def test_only_the_death_a_fault_causes_is_expected_and_only_of_its_victim():
    f = _faults("kill", "delay", "corrupt")                     # victims: slots 1, 3, 5
    killed = "was killed by SIGKILL"
    assert f.expected(WorkerFailed(1, killed, slot=1))
    assert not f.expected(WorkerFailed(1, killed, slot=6))     # the monitor, on the same CPU
    assert not f.expected(WorkerFailed(1, killed, slot=0))
    assert not f.expected(WorkerFailed(1, killed, slot=3))     # a delayed worker must live
    assert not f.expected(WorkerFailed(1, "exited with status 3", slot=1))
    assert f.expected(WorkerFailed(1, "exited with status 7", slot=5))


def test_a_histogram_that_is_not_one_of_its_samples_is_found():
    good = np.zeros(NBUCKETS, np.int64)
    good[200] = 5
    negative = good.copy()
    negative[0] = -7
    hists = np.stack([good, negative, good]).reshape(3, 1, NBUCKETS)
    counters = _counters(3, s0={"cpu.guest_entries": 5}, s1={"cpu.guest_entries": 5},
                         s2={"cpu.guest_entries": 6})
    bad = bad_histograms(hists, counters, [0, 1, 2], failed=set())
    assert sorted(bad) == [1, 2] and "bucket 0 holds -7" in bad[1] and "5 samples" in bad[2]
    assert sorted(bad_histograms(hists, counters, [0, 1, 2], failed={2})) == [1]  # one short


def test_where_nobody_waits_an_undetected_fault_is_survived_not_missed():
    """asirt stress --strategy none: no lane waits for a sibling, so a kill, stop or delay may
    stall nobody: undetected, it is None ("nobody waits"), not a failed detection; a corrupt
    word is still read (and must be caught); a stopped victim may stay stopped to the end."""
    f = _faults("kill", "stop", "delay", "corrupt", word="gen", waits_on_siblings=False)
    for x in f.faults:
        x.injected_ns = 1_000_000
    counters = _counters(9, s5={"fault.delays": 1})
    r = _judge(f, counters=counters)
    assert [x["detected"] for x in r] == [None, None, None, False]
    assert "survivors" in r[0]["detail"]
    fenced = _judge(f, [_event("FENCE_DEAD", 0, 1)], counters=counters,
                    fenced=[0b10] + [0] * 8)
    assert fenced[0]["detected"] is True                # a fence still counts when it happens
    assert f.expected(WorkerFailed(1, "did not stop", slot=3))
    assert not _faults("stop").expected(WorkerFailed(1, "did not stop", slot=1))


def test_under_smt_off_the_victim_is_the_lane_that_runs():
    f = _faults("kill", "delay", victim_lane=0)
    assert [x.victim for x in f.faults] == [0, 2]


def test_where_nobody_waits_a_victim_still_holding_a_task_is_a_missed_detection():
    """Under coresched a dead victim's task blocks every other cookie on its core until a
    sibling fences it: one that still runs a task (or claims the core) at the end, unfenced,
    was missed -- not "nobody waits" (the review found a kill passing with the fence of
    asirt.sync.coresched switched off)."""
    f = _faults("kill", "stop", waits_on_siblings=False)   # victims: slots 1 and 3, lane 1
    for x in f.faults:
        x.injected_ns = 1_000_000
    r = _judge(f, core_sched=[(0b10, 0, 0), (0b00, 2, 1)])
    assert [x["detected"] for x in r] == [False, False]
    assert "ran a task" in r[0]["detail"] and "claimed the core" in r[1]["detail"]
    r = _judge(f, core_sched=[(0b01, 0, 0), (0b00, 0, 1)])  # only its sibling runs a task
    assert [x["detected"] for x in r] == [None, None]


def test_where_nobody_waits_a_fenced_delay_victim_stays_misjudged():
    f = _faults("delay", waits_on_siblings=False)
    counters = _counters(3, s1={"fault.delays": 1})
    (r,) = _judge(f, counters=counters, fenced=[0b10, 0, 0])    # alive, yet fenced
    assert r["detected"] is False and r["fenced_by_slots"] == [0]
