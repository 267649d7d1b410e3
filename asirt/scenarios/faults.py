"""The faults ``asirt stress`` injects, and how each is judged.

Each fault has its own victim, the last lane of its own core (run_stress plans at least a
core per fault), so that each is judged apart: one victim for ``kill,stop`` would be killed
and never stopped. The parent injects at about a third of the run:

  kill     SIGKILL. A sibling must find it dead and fence it off (FENCE_DEAD).
  stop     SIGSTOP. A sibling must find it stopped twice, kill it and fence it off
           (FENCE_STOPPED).
  delay    the victim itself sleeps DELAY_S inside HOST at its DELAY_AT-th sensitive section
           (workers/stress.py): alive, so its siblings must wait for it -- liveness checks
           that find it alive, counted by the victim for the time of its delay only -- and
           never fence it.
  corrupt  garbage (GARBAGE: negative, odd) in one of the victim's published words
           (CORRUPT_WORDS): its mode, its stun generation, its ack of lane 0's request, or its
           barrier_wait histogram. A reader must report it (CORRUPT) and the lane must end
           fenced off or gone (asirt.cpu.guard); a histogram is checked by the parent against
           the victim's guest entries and left out of the merge. The victim's own next write
           would hide the garbage, so the parent writes it again at every look (50 ms) until
           the lane is out: it stands for a writer that keeps hitting the word (a single write
           that nobody reads before its owner overwrites it harms nobody and shows nothing).

A fault is *detected* when the evidence names its victim: the fence of the expected kind
(kill, stop), the victim's own count of the waits its delay caused (delay), a CORRUPT report
and the lane out (corrupt). A victim's death is expected only for the fault that kills it.
Where no lane has to wait for a sibling (``asirt stress --strategy`` none, smt-off,
coresched: nobody stuns, no barrier; core scheduling waits only behind a task the victim
holds, and fences it then) a kill, stop or delay may stall nobody and have nothing to be
detected by. Undetected and unfenced, its ``detected`` is None ("nobody waits") and the
survivors' progress is what is judged -- unless a dead or stopped victim still holds a task
or a claim in its core's scheduling record at the end: then it blocked every other cookie
and nobody found it, and it stays a failed detection. A stopped victim nobody had to wait
for stays stopped until the run's end, which kills it.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from asirt.errors import Corrupted, WorkerFailed
from asirt.histogram import invalid
from asirt.scenarios.common import Plan
from shm_layout import Region
from shm_layout.sections import WorkerState

__all__ = ["FAULTS", "CORRUPT_WORDS", "GARBAGE", "DELAY_S", "DELAY_AT", "Fault", "Faults",
           "bad_histograms"]

FAULTS = ("kill", "stop", "delay", "corrupt")
CORRUPT_WORDS = ("mode", "gen", "ack", "hist")
#: what the corrupt fault writes: negative (out of every word's range) and odd (a generation
#: that reads as an active request)
GARBAGE = -0x5A5A_5A5A_5A5A_5A5B
DELAY_S, DELAY_AT = 0.5, 20
#: how each fault's victim may end: the failure statuses it causes (WorkerFailed.status)
_DEATHS = {"kill": ("was killed by SIGKILL",), "stop": ("was killed by SIGKILL",),
           "corrupt": ("was killed by SIGKILL",
                       f"exited with status {Corrupted.worker_status}"), "delay": ()}
_FENCE = {"kill": "FENCE_DEAD", "stop": "FENCE_STOPPED"}


@dataclass
class Fault:
    """One fault and what became of it."""
    kind: str
    victim: int                        # its slot
    core: list[int]                    # the slots of the victim's core
    cpu: int
    word: str = ""                     # corrupt: which of CORRUPT_WORDS
    injected_ns: int = 0               # CLOCK_MONOTONIC of the (first) injection; 0: none
    writes: int = 0                    # corrupt: times the garbage was written
    index: int = -1                    # corrupt: the word index written

    @property
    def lane(self) -> int:
        return self.core.index(self.victim)


class Faults:
    """The faults of one stress run, their victims, injection and verdicts."""

    def __init__(self, plan: Plan, kinds: Sequence[str], word: str = "mode",
                 victim_lane: int = -1, waits_on_siblings: bool = True) -> None:
        """``victim_lane``: each victim's lane in its core (a lane that runs: under SMT off
        only the first does); ``waits_on_siblings``: False where no lane waits for another
        (module docstring)."""
        self.plan, self.waits = plan, waits_on_siblings
        self.faults = [Fault(kind, plan.cores[i][victim_lane], plan.cores[i], plan.workers[
            plan.cores[i][victim_lane]].cpu, word if kind == "corrupt" else "")
            for i, kind in enumerate(kinds)]
        self.victims = {f.victim for f in self.faults}

    # -- injection (the parent, during the run) -------------------------------------------
    def inject(self, slots: np.ndarray, region: Region | None) -> None:
        """Every fault the parent injects (the delay fault injects itself); ``slots`` the
        region's (the victims' pids), ``region`` for the corrupt fault's writes."""
        for f in self.faults:
            if f.kind == "delay" or (f.kind == "corrupt" and region is None):
                continue
            f.injected_ns = time.perf_counter_ns()
            pid = int(slots["pid"][f.victim])
            if f.kind == "kill":
                _signal(pid, signal.SIGKILL)
            elif f.kind == "stop":
                _signal(pid, signal.SIGSTOP)
            elif region is not None:
                f.index = self._word(region, f)
                self._write(region, f)

    def keep_on(self, region: Region) -> None:
        """At every look after injection: write the garbage again where the owner overwrote it
        and its lane is still in (module docstring)."""
        for f in self.faults:
            if f.kind != "corrupt" or f.word == "hist" or not f.writes:
                continue
            w = region.words
            out = any(int(m) >> f.lane & 1 for m in region.array("cpu_state")["fenced"][f.core])
            state = int(region.array("slots")["state"][f.victim])
            if not out and state != WorkerState.FAILED and w[f.index] != GARBAGE:
                self._write(region, f)

    @staticmethod
    def _write(region: Region, f: Fault) -> None:
        region.words[f.index] = GARBAGE
        f.writes += 1

    def _word(self, region: Region, f: Fault) -> int:
        wi = region.word_index
        if f.word == "mode":
            return wi("slots", f.victim, "mode")
        if f.word == "gen":
            return wi("stun_cpu", f.victim, "gen")
        if f.word == "ack":
            return wi("stun_cpu", f.victim, "ack")          # its ack of lane 0's requests
        return wi("hist", f.victim * int(region.section("metrics").count))   # bucket 0

    # -- verdicts (the parent, after the run) ----------------------------------------------
    def expected(self, failure: WorkerFailed) -> bool:
        """Whether a worker's failure is the one a fault was meant to cause."""
        return any(f.victim == failure.slot and f.word != "hist" and (
            failure.status in _DEATHS[f.kind]
            or (f.kind == "stop" and not self.waits and failure.status == "did not stop"))
            for f in self.faults)

    def judge(self, events: list[dict[str, Any]], counters: list[dict[str, int]],
              fenced: list[int], failures: Sequence[WorkerFailed],
              corrupt_hists: dict[int, str],
              core_sched: Sequence[tuple[int, int, int]] = ()) -> list[dict[str, Any]]:
        """One report per fault: injected, detected, how, and how soon (module docstring).
        ``core_sched``: per core, (running lanes, claim, claim's lane) at the run's end."""
        out = [self._judge(f, events, counters, fenced, failures, corrupt_hists)
               for f in self.faults]
        if self.waits:
            return out
        for f, r in zip(self.faults, out):
            if (f.kind not in ("kill", "stop", "delay") or not r["injected"] or r["detected"]
                    or r.get("fenced_by_slots") or r.get("detected_as")):
                continue              # detected, or misjudged: a verdict stands as it is
            held = self._holds(f, core_sched)
            if held and f.kind != "delay":
                r["detail"] = (f"it still {held} at the end and nobody fenced it: every "
                               "other cookie starved on its core")
                continue
            r.update(detected=None, detail="nobody had to wait for it long enough to check "
                     "it (no stun, no barrier; core scheduling waits only behind a task it "
                     "holds, and it held none): the survivors' progress is judged")
        return out

    def _holds(self, f: Fault, core_sched: Sequence[tuple[int, int, int]]) -> str:
        """What the victim holds in its core's scheduling record ("" if nothing)."""
        k = self.plan.cores.index(f.core)
        if k >= len(core_sched):
            return ""
        running, want, want_lane = core_sched[k]
        if running >> f.lane & 1:
            return "ran a task"
        return "claimed the core" if want and want_lane == f.lane else ""

    def _judge(self, f: Fault, events: list[dict[str, Any]], counters: list[dict[str, int]],
               fenced: list[int], failures: Sequence[WorkerFailed],
               corrupt_hists: dict[int, str]) -> dict[str, Any]:
        out: dict[str, Any] = {"fault": f.kind, "slot": f.victim, "cpu": f.cpu}
        mine = [e for e in events if e["other_slot"] == f.victim
                and e["kind"] in ("FENCE_DEAD", "FENCE_STOPPED", "FENCE_CORRUPT", "CORRUPT")]
        fenced_by = [s for s in f.core if s != f.victim and fenced[s] >> f.lane & 1]
        if f.kind == "delay":
            delays = counters[f.victim]["fault.delays"]
            waits = counters[f.victim]["fault.delay_waits"]
            out.update(injected=delays > 0, detected=waits > 0 and not fenced_by,
                       fenced_by_slots=fenced_by,
                       detail=f"{waits} liveness checks found it alive during its "
                       f"{DELAY_S * 1e3:.0f} ms in HOST and waited" if delays else
                       f"it never reached its {DELAY_AT}th sensitive section")
            return out
        out["injected"] = bool(f.injected_ns)
        if not f.injected_ns:
            out.update(detected=False, detail="the run ended before injection")
            return out
        kinds = sorted({e["kind"] for e in mine})
        out.update(detected_as=kinds or None, fenced_by_slots=fenced_by)
        if f.kind in _FENCE:
            want = _FENCE[f.kind]
            first = [e for e in mine if e["kind"] == want]
            out.update(expected=want, detected=bool(fenced_by) and bool(first))
        elif f.word == "hist":
            why = corrupt_hists.get(f.victim)
            out.update(word=f.word, writes=f.writes, detected=why is not None, detail=why)
            return out
        else:
            first = [e for e in mine if e["kind"] == "CORRUPT"]
            left = any(x.slot == f.victim and x.status in _DEATHS["corrupt"] for x in failures)
            out.update(word=f.word, writes=f.writes,
                       detected=bool(first) and (bool(fenced_by) or left),
                       # the victim's own audit, a sibling's range check, the monitor
                       reported_by_slots=sorted({e["slot"] for e in first}))
        out["detect_after_ms"] = (round((first[0]["ns"] - f.injected_ns) / 1e6, 1)
                                  if first else None)
        return out


def bad_histograms(hists: Any, counters: list[dict[str, int]], slots: Sequence[int],
                   failed: set[int], counter: str = "cpu.guest_entries",
                   loose: str | None = None) -> dict[int, str]:
    """The slots whose first metric's histogram is not one sample per ``counter`` (the
    handshake's walk: barrier_wait, one per guest entry, asirt.sync.barrier.gate; the vCPU
    loop: exit_handling, one per exit): slot -> why. A worker killed between the count and
    the sample may be one short; with ``loose``, so may each of its counts (an exit whose
    handling was given up) and the exit the run's stop cut short."""
    out = {}
    for s in slots:
        n = counters[s][counter]
        slack = (1 if s in failed or loose else 0) + (counters[s][loose] if loose else 0)
        why = invalid(hists[s, 0], n, slack=slack)
        if why is not None:
            out[s] = why
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

