"""Independent checkers of the safety properties S1-S3 (DESIGN.md), and what they report.

Three checkers, each of which a test shows can fail (tests/test_invariants.py runs a broken
protocol under randomized delays and asserts it is caught):

(a) Transition-time assertions (:class:`TransitionChecker`), run by every worker when it enters
    GUEST (S1, S2, S3), when it leaves GUEST (S1, S2: did a sibling get in beside it?) and when
    it enters HOST (S1: is a sibling still in GUEST?). A few loads each; their cost is measured
    (counters ``checks`` and ``check_ns``). Each is a load after the worker's own store of its
    new mode: on x86-TSO two CPUs that change mode at the same instant can each miss the other
    (store buffering), so without ``check_fence`` a violation that exists only for that instant
    can go unseen here; with ``check_fence`` a real fence (:func:`asirt.fence.fence`, a locked
    instruction) sits between the store and the loads and nothing is missed. The
    sampling monitor is the second line either way.
(b) The sampling monitor (:class:`Monitor`, run by ``workers/monitor.py``), which reads every
    CPU's mode and domain as a consistent snapshot: each CPU publishes its mode under a
    seqlock (``stun_cpu.mseq``, odd while ``slots.mode``/``slots.domain`` change), and the
    monitor accepts a snapshot only when two collects of every ``mseq`` are equal and even.
    Then each CPU's mode held over the whole interval between the two collects, so the modes
    read between them held at one common instant: no false positives.
(c) Buffer sampling (``StunCpu.sample_leaks``, and an optional hook onto ``asirt.uarch``'s
    core buffer for a region that has one, :func:`uarch_hook`; the stun scenarios' regions
    have none): a CPU in GUEST(d) looks at what its core's buffer holds and counts every
    class d may not see as a leak.

Violations and liveness events are counted per worker (``stun_cpu.counters``) and written,
timestamped, into the worker's event ring (``stun_events``); :func:`collect` reads them all
back in the parent. A violation that involves a CPU some sibling has fenced off, or whose
process is gone, is not counted: a dead CPU runs nothing.

This module imports shm_layout, asirt.clock and the standard library only; the stun engine
passes itself in.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Protocol

from asirt.clock import now
from shm_layout import Region
from shm_layout.region import pid_alive
from shm_layout.header import STOP_WORD
from shm_layout.sections import Mode
from shm_layout.stun import (COUNTER, COUNTERS, EVENT_DTYPE, EVENT_FIELDS, RING_ENTRIES, EventKind,
                             Source)

_EV_WORDS = EVENT_DTYPE.itemsize // 8   # EVENT_DTYPE is EVENT_FIELDS, all int64, in order
HOST, ASI, GUEST = int(Mode.HOST), int(Mode.ASI), int(Mode.GUEST)
#: reads of a sibling's seqlock before a checker gives up on a consistent (mode, domain)
SEQLOCK_RETRIES = 16


class EventRing:
    """The writer side of one worker's event ring (single writer: that worker)."""

    def __init__(self, region: Region, slot: int) -> None:
        self.w = region.words
        self.slot = slot
        self.head = region.word_index("stun_events", slot, "head")
        self.base = (region.word_index("stun_events", slot)
                     + region.section("stun_events").dtype.fields["ev"][1] // 8)

    def emit(self, kind: int, source: int, other: int = -1, a: int = 0, b: int = 0,
             c: int = 0) -> None:
        w = self.w
        h = w[self.head]
        i = self.base + (h % RING_ENTRIES) * _EV_WORDS
        w[i], w[i + 1], w[i + 2], w[i + 3] = now(), int(kind), self.slot, other
        w[i + 4], w[i + 5], w[i + 6], w[i + 7] = int(source), a, b, c
        w[self.head] = h + 1


class TransitionChecker:
    """Checker (a): cheap assertions at every transition of one worker (see module doc)."""

    def __init__(self, cpu: Any, ring: EventRing,
                 fence: Callable[[], None] | None = None) -> None:
        self.cpu = cpu
        self.ring = ring
        self.fence = fence
        w = cpu.w
        self.w = w
        self.c_checks = cpu.cnt + COUNTER["checks"]
        self.c_ns = cpu.cnt + COUNTER["check_ns"]
        self.c_s1 = cpu.cnt + COUNTER["v_s1"]
        self.c_s2 = cpu.cnt + COUNTER["v_s2"]
        self.c_s3 = cpu.cnt + COUNTER["v_s3"]

    def _report(self, kind: EventKind, j: int, a: int, b: int, c: int) -> None:
        cpu = self.cpu
        if not cpu.sibling_counts(j):
            return
        counter = {EventKind.S1: self.c_s1, EventKind.S2: self.c_s2, EventKind.S3: self.c_s3}[kind]
        self.w[counter] += 1
        self.ring.emit(kind, Source.TRANSITION, cpu.slot_of[j], a, b, c)

    def _consistent(self, j: int) -> tuple[int, int] | None:
        """Lane j's (mode, domain) read under its seqlock: a pair that held at one instant.
        Mode and domain are two words, so a plain read of both can tear (a sibling leaving
        GUEST(2) for IDLE(0) can read as GUEST(0)); a suspected S2 is confirmed this way.
        None after ``SEQLOCK_RETRIES`` torn reads: a sibling stopped or killed half-way
        through a transition keeps its seqlock odd forever, and this check must not wait for
        it (the sampling monitor, which retries every round, covers that instant)."""
        cpu, w = self.cpu, self.w
        iq, im, idom = cpu.s_mseq[j], cpu.s_mode[j], cpu.s_dom[j]
        for _ in range(SEQLOCK_RETRIES):
            s1 = w[iq]
            m, e = w[im], w[idom]
            if not s1 & 1 and w[iq] == s1:
                return m, e
        return None

    def _sibling_modes(self, want_guest: bool) -> None:
        """S1/S2 against every sibling; ``want_guest``: this CPU is in GUEST(dom)."""
        cpu, w = self.cpu, self.w
        d = cpu.dom
        for j in cpu.live_sibs:
            m = w[cpu.s_mode[j]]
            if want_guest:
                if m == HOST:
                    self._report(EventKind.S1, j, cpu.mode, m, w[cpu.s_dom[j]])
                elif (m == ASI or m == GUEST) and w[cpu.s_dom[j]] != d:
                    pair = self._consistent(j)
                    if pair is None:
                        continue                 # never a consistent read: not reported
                    m, e = pair
                    if (m == ASI or m == GUEST) and e != d:
                        self._report(EventKind.S2, j, cpu.mode, m, e)
            elif m == GUEST:
                self._report(EventKind.S1, j, cpu.mode, m, w[cpu.s_dom[j]])

    def guest_entry(self) -> None:
        t0 = now()
        if self.fence is not None:
            self.fence()
        self._sibling_modes(True)
        dirty = self.cpu.buffer_dirty(self.cpu.dom)
        if dirty is not None:
            lane, cls = dirty
            self._report(EventKind.S3, lane, lane, cls, self.cpu.dom)
        w = self.w
        w[self.c_checks] += 1
        w[self.c_ns] += now() - t0

    def guest_exit(self) -> None:
        t0 = now()
        self._sibling_modes(True)
        w = self.w
        w[self.c_checks] += 1
        w[self.c_ns] += now() - t0

    def host_entry(self) -> None:
        t0 = now()
        if self.fence is not None:
            self.fence()
        self._sibling_modes(False)
        w = self.w
        w[self.c_checks] += 1
        w[self.c_ns] += now() - t0


# -- (c) buffer sampling -----------------------------------------------------------------

class LeakSource(Protocol):
    """Anything that can say which tokens a guest of ``domain`` would see but must not
    (``asirt.uarch.CoreBuffer`` is one)."""

    def leaks(self, domain: int) -> list[int]: ...


def uarch_hook(region: Region, core: int, lane: int) -> Any | None:
    """The ASI model's core buffer for (core, lane) when the region has one, else None."""
    if not region.has_section("asi_uarch"):
        return None
    try:
        from asirt.uarch import CoreBuffer
    except ImportError:    # pragma: no cover - the ASI model is not part of this build
        return None
    return CoreBuffer(region, core, lane)


# -- (b) the sampling monitor ------------------------------------------------------------

class Monitor:
    """Checker (b): consistent snapshots of every core's modes, S1/S2 checked on each."""

    MAX_RETRIES = SEQLOCK_RETRIES

    def __init__(self, region: Region, slot: int, cores: list[list[int]]) -> None:
        self.w = region.words
        self.ring = EventRing(region, slot)
        cnt = region.word_index("stun_cpu", slot, "counters")
        self.c = {name: cnt + COUNTER[name] for name in ("m_samples", "m_retries", "m_s1",
                                                          "m_s2", "m_ns")}
        wi = region.word_index
        self.cores = []
        for slots in cores:
            self.cores.append((
                list(slots),
                [wi("stun_cpu", s, "mseq") for s in slots],
                [wi("slots", s, "mode") for s in slots],
                [wi("slots", s, "domain") for s in slots],
                [wi("stun_cpu", s, "fenced") for s in slots],
                [wi("slots", s, "pid") for s in slots],
            ))

    def sample(self) -> int:
        """Take one snapshot of every core; returns the violations found in it."""
        w = self.w
        found = 0
        t0 = now()
        for slots, seqs, modes, doms, fenced, pids in self.cores:
            for _ in range(self.MAX_RETRIES):
                s1 = [w[i] for i in seqs]
                m = [w[i] for i in modes]
                d = [w[i] for i in doms]
                s2 = [w[i] for i in seqs]
                if s1 == s2 and not any(s & 1 for s in s1):
                    break
                w[self.c["m_retries"]] += 1
            else:
                continue          # this core changes too fast to read now: next round
            w[self.c["m_samples"]] += 1
            n = len(slots)
            for a in range(n):
                if m[a] != GUEST:
                    continue
                for b in range(n):
                    if b == a:
                        continue
                    kind = None
                    if m[b] == HOST:
                        kind = EventKind.S1
                    elif m[b] == ASI and d[b] != d[a]:
                        kind = EventKind.S2
                    elif m[b] == GUEST and d[b] != d[a] and b > a:
                        kind = EventKind.S2      # two guests: one violation, found from a < b
                    if kind is None or not self._counts(a, b, fenced, pids):
                        continue
                    found += 1
                    w[self.c["m_s1" if kind == EventKind.S1 else "m_s2"]] += 1
                    self.ring.emit(kind, Source.MONITOR, slots[b], m[b], d[b], slots[a])
        w[self.c["m_ns"]] += now() - t0
        return found

    def _counts(self, a: int, b: int, fenced: list[int], pids: list[int]) -> bool:
        w = self.w
        mask = 0
        for i in fenced:
            mask |= w[i]
        if mask & ((1 << a) | (1 << b)):
            return False
        return pid_alive(w[pids[a]]) and pid_alive(w[pids[b]])

    def run(self, interval_s: float = 0.0, yield_every: int = 1) -> None:
        """Sample until the parent asks to stop; yield (and sleep ``interval_s``) between
        samples so a monitor that shares a CPU with a worker never starves it."""
        w = self.w
        n = 0
        sched_yield, sleep = os.sched_yield, time.sleep
        while not w[STOP_WORD]:
            self.sample()
            n += 1
            if interval_s > 0:
                sleep(interval_s)
            elif n % yield_every == 0:
                sched_yield()


# -- collection (the parent) -------------------------------------------------------------

def counters(region: Region, slots: list[int] | None = None) -> dict[str, int]:
    """Every counter summed over ``slots`` (default: all)."""
    arr = region.array("stun_cpu")["counters"]
    rows = arr if slots is None else arr[list(slots)]
    total = rows.sum(axis=0)
    return {name: int(total[i]) for i, name in enumerate(COUNTERS)}


def per_slot_counters(region: Region) -> list[dict[str, int]]:
    arr = region.array("stun_cpu")["counters"]
    return [{name: int(row[i]) for i, name in enumerate(COUNTERS)} for row in arr]


def events(region: Region, cpus: list[int] | None = None) -> list[dict[str, Any]]:
    """Every event still in the rings (the last RING_ENTRIES of each worker), oldest first.
    ``cpus[slot]`` names the CPU of each slot in the output."""
    rings = region.array("stun_events")
    out = []
    for ring in rings:
        head = int(ring["head"])
        for k in range(max(0, head - RING_ENTRIES), head):
            ev = ring["ev"][k % RING_ENTRIES]
            rec = {f: int(ev[f]) for f in EVENT_FIELDS}
            out.append(describe(rec, cpus))
    out.sort(key=lambda e: e["ns"])
    return out


def describe(rec: dict[str, int], cpus: list[int] | None = None) -> dict[str, Any]:
    """An event as result.json shows it: names instead of numbers."""
    kind = EventKind(rec["kind"])
    cpu = (lambda s: s if cpus is None or not 0 <= s < len(cpus) else cpus[s])
    out: dict[str, Any] = {"ns": rec["ns"], "kind": kind.name, "source": Source(rec["source"]).name.lower(),
                           "slot": rec["slot"], "cpu": cpu(rec["slot"]),
                           "other_slot": rec["other"], "other_cpu": cpu(rec["other"])}
    if kind in (EventKind.S1, EventKind.S2, EventKind.LEAK, EventKind.S3):
        if Source(rec["source"]) == Source.MONITOR:
            # monitor events: slot = who saw it; other = the CPU in the wrong mode, c = the guest
            out["guest_slot"], out["guest_cpu"] = rec["c"], cpu(rec["c"])
            out["other_mode"] = _mode_name(rec["a"])
            out["other_domain"] = rec["b"]
        elif kind == EventKind.S3 or kind == EventKind.LEAK:
            out["lane"], out["class"], out["domain"] = rec["a"], rec["b"], rec["c"]
        else:
            out["mode"], out["other_mode"], out["other_domain"] = (
                _mode_name(rec["a"]), _mode_name(rec["b"]), rec["c"])
    else:
        out["phase"], out["waited_ns"], out["detail"] = rec["a"], rec["b"], rec["c"]
    return out


def _mode_name(m: int) -> str:
    try:
        return Mode(m).name
    except ValueError:
        return str(m)


VIOLATION_KINDS = ("S1", "S2", "S3", "LEAK")
LIVENESS_KINDS = ("TIMEOUT", "FENCE_DEAD", "FENCE_STOPPED", "ABORT", "STALL")


def summarize_violations(totals: dict[str, int]) -> dict[str, int]:
    """Violations by checker and property, from summed counters."""
    return {
        "transition_s1": totals["v_s1"], "transition_s2": totals["v_s2"],
        "transition_s3": totals["v_s3"], "monitor_s1": totals["m_s1"],
        "monitor_s2": totals["m_s2"], "buffer_leaks": totals["leaks"],
    }


__all__ = ["EventRing", "TransitionChecker", "LeakSource", "uarch_hook", "Monitor",
           "counters", "per_slot_counters", "events", "describe",
           "summarize_violations", "VIOLATION_KINDS", "LIVENESS_KINDS"]
