"""Independent checkers of the safety properties S1-S3 (DESIGN.md) and the event ring they
report into.

Each checker reads only what CPUs *publish* -- the mode and domain words under their seqlock,
the ``fenced`` masks, process liveness -- and the core buffer's tokens, never a protocol
object's attributes nor the taints a protocol decides its flushes with. Tests show each can
fail (tests/test_checks.py, tests/test_invariants.py):

(a) :class:`TransitionChecker`, run by the state writer of every CPU when it enters GUEST (S1,
    S2 against every sibling; S3: the core buffer holds nothing the domain may not see), when
    it leaves GUEST (S1, S2: did a sibling get in beside it?) and when it enters HOST (S1: is a
    sibling still in GUEST?). Each is a load after the CPU's own store of its new mode: on
    x86-TSO two CPUs that change mode at the same instant can each miss the other (store
    buffering), so without ``check_fence`` a violation that exists only for that instant can
    go unseen here; with it a real fence (asirt.fence.fence) sits between store and loads.
    The sampling monitor is the second line either way.
(b) :class:`Monitor` (the ``monitor`` worker), which takes consistent snapshots of every core:
    two collects of every live CPU's ``mseq``, equal and even, bracket the reads of mode and
    domain, so those held at one common instant (no false positives). A lane that is fenced
    off or dead is left out of the consistency requirement: a worker killed half-way through a
    transition keeps its seqlock odd forever, and must not blind the monitor to the others.
(c) :func:`sample_leaks`: a CPU in GUEST(d) looks at its core's buffer, as a side-channel
    attacker would, and counts every token it sees that d may not see (each deposit once).

A mode word that holds no mode at all is garbage (asirt.cpu.guard): (a) and (b) report it as
CORRUPT instead of judging with it.

Violations are counted per CPU (``check.*``, ``monitor.*`` counters) and written, timestamped,
into the CPU's event ring; asirt.collect reads them back in the parent. A violation that
involves a CPU some sibling fenced off, or whose process is gone, is not counted: a dead CPU
runs nothing. (A leak is counted whoever left the token: a dead CPU's data is still data.)
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from asirt.clock import now
from asirt.fence import fence
from asirt.proc import Proc
from shm_layout import Region
from shm_layout.counters import COUNTER
from shm_layout.cpu import (EVENT_DTYPE, EVENTS, MAX_DOMAINS, EventKind, MemClass, Source,
                            Word, token_class)
from shm_layout.header import STOP_WORD
from shm_layout.sections import Mode

if TYPE_CHECKING:
    from asirt.cpu.cpu import Cpu

__all__ = ["EventRing", "TransitionChecker", "Monitor", "sample_leaks", "count_leaks",
           "SEQLOCK_RETRIES"]

_EV_WORDS = EVENT_DTYPE.itemsize // 8
_EV_MASK = EVENTS - 1
assert EVENTS & _EV_MASK == 0 and _EV_WORDS == 8
_S3, _LEAK = int(EventKind.S3), int(EventKind.LEAK)
_TRANSITION, _BUFFER = int(Source.TRANSITION), int(Source.BUFFER)
HOST, ASI, GUEST, STUNNED = int(Mode.HOST), int(Mode.ASI), int(Mode.GUEST), int(Mode.STUNNED)
#: reads of a sibling's seqlock before a checker gives up on a consistent (mode, domain)
SEQLOCK_RETRIES = 16
_SENSITIVE = int(MemClass.SENSITIVE)


class EventRing:
    """The writer side of one worker's event ring (single writer: that worker)."""

    def __init__(self, region: Region, slot: int) -> None:
        self.w = region.words
        self.slot = slot
        self.head = region.word_index("cpu_events", slot, "head")
        self.base = (region.word_index("cpu_events", slot)
                     + region.section("cpu_events").dtype.fields["ev"][1] // 8)

    def emit(self, kind: int, source: int, other: int = -1, a: int = 0, b: int = 0,
             c: int = 0) -> None:
        """One event (``kind``, ``source``: EventKind and Source values, as plain ints on the
        hot paths: an IntEnum costs a conversion per store)."""
        w = self.w
        h = w[self.head]
        i = self.base + (h & _EV_MASK) * _EV_WORDS
        w[i], w[i + 1], w[i + 2], w[i + 3] = now(), kind, self.slot, other
        w[i + 4], w[i + 5], w[i + 6], w[i + 7] = source, a, b, c
        w[self.head] = h + 1


class TransitionChecker:
    """Checker (a) of one CPU (module docstring)."""

    def __init__(self, cpu: "Cpu") -> None:
        self.cpu, self.w = cpu, cpu.w
        self.fence = fence if cpu.params.check_fence else None
        c = cpu.cnt
        self.c_checks, self.c_ns = c + COUNTER["check.checks"], c + COUNTER["check.ns"]
        self.c_v = {EventKind.S1: c + COUNTER["check.s1"], EventKind.S2: c + COUNTER["check.s2"],
                    EventKind.S3: c + COUNTER["check.s3"]}
        self.c_s3 = self.c_v[EventKind.S3]
        self.sibs = [(j, cpu.s_mode[j], cpu.s_dom[j], cpu.s_mseq[j]) for j in cpu.sibs]
        self.classes = min(cpu.params.domains, MAX_DOMAINS) + 1

    def _report(self, kind: EventKind, j: int, a: int, b: int, c: int) -> None:
        cpu = self.cpu
        if not cpu.counts(j):
            return
        self.w[self.c_v[kind]] += 1
        cpu.events.emit(int(kind), _TRANSITION, cpu.slot_of[j], a, b, c)

    def _consistent(self, iq: int, im: int, idom: int) -> tuple[int, int] | None:
        """A sibling's (mode, domain) read under its seqlock: a pair that held at one instant
        (mode and domain are two words: a plain read can tear, e.g. GUEST(2) -> IDLE(0) read as
        GUEST(0)). None after SEQLOCK_RETRIES torn reads: a sibling stopped or killed half-way
        keeps its seqlock odd, and this check must not wait for it (the monitor covers it)."""
        w = self.w
        for _ in range(SEQLOCK_RETRIES):
            s1 = w[iq]
            m, e = w[im], w[idom]
            if not s1 & 1 and w[iq] == s1:
                return m, e
        return None

    def _siblings(self, in_guest: bool, mode: int, d: int) -> None:
        w = self.w
        for j, im, idom, iq in self.sibs:
            m = w[im]
            if m > STUNNED or m < 0:            # no mode at all: garbage (asirt.cpu.guard)
                if self.cpu.counts(j):
                    self.cpu.guard.report(self.cpu.slot_of[j], Word.MODE, m, _TRANSITION)
            elif in_guest:
                if m == HOST:
                    self._report(EventKind.S1, j, mode, m, w[idom])
                elif (m == ASI or m == GUEST) and w[idom] != d:
                    pair = self._consistent(iq, im, idom)
                    if pair is not None and (pair[0] == ASI or pair[0] == GUEST) and pair[1] != d:
                        self._report(EventKind.S2, j, mode, pair[0], pair[1])
            elif m == GUEST:
                self._report(EventKind.S1, j, mode, m, w[idom])

    def guest_entry(self) -> None:
        t0 = now()
        if self.fence is not None:
            self.fence()
        state = self.cpu.state
        d = state.dom
        self._siblings(True, state.mode, d)
        dirty = self.cpu.buffer.dirty_for(d, self.classes)
        if dirty is not None:
            # S3 is about the buffer, not a sibling: reported whoever left the token
            self.w[self.c_s3] += 1
            self.cpu.events.emit(_S3, _TRANSITION, self.cpu.slot_of[dirty.lane],
                                 dirty.lane, dirty.token, d)
        w = self.w
        w[self.c_checks] += 1
        w[self.c_ns] += now() - t0

    def guest_exit(self) -> None:
        t0 = now()
        state = self.cpu.state
        self._siblings(True, state.mode, state.dom)
        w = self.w
        w[self.c_checks] += 1
        w[self.c_ns] += now() - t0

    def host_entry(self) -> None:
        t0 = now()
        if self.fence is not None:
            self.fence()
        state = self.cpu.state
        self._siblings(False, state.mode, state.dom)
        w = self.w
        w[self.c_checks] += 1
        w[self.c_ns] += now() - t0


_C_SAMPLES, _C_LEAKS = COUNTER["check.samples"], COUNTER["check.leaks"]
_C_HOST, _C_DOMAIN = COUNTER["check.leak_host"], COUNTER["check.leak_domain"]


def sample_leaks(cpu: "Cpu") -> int:
    """Checker (c): while in GUEST(d), look at the core buffer as the guest would; count each
    token d may not see (each deposit, each open period, once). Returns how many."""
    return count_leaks(cpu, cpu.buffer.new_leaks(cpu.state.dom))


def count_leaks(cpu: "Cpu", seen: list) -> int:
    """Count one sample's foreign tokens ``seen`` by the guest of this CPU's domain (a
    :meth:`CoreBuffer.new_leaks` list), the first as an event. Returns how many."""
    d = cpu.state.dom
    w, c = cpu.w, cpu.cnt
    w[c + _C_SAMPLES] += 1
    if not seen:
        return 0
    host = 0
    for x in seen:
        if token_class(x.token) == _SENSITIVE:
            host += 1
    w[c + _C_LEAKS] += len(seen)
    w[c + _C_HOST] += host
    w[c + _C_DOMAIN] += len(seen) - host
    first = seen[0]
    cpu.events.emit(_LEAK, _BUFFER, cpu.slot_of[first.lane], first.lane, first.token, d)
    return len(seen)


class Monitor:
    """Checker (b): consistent snapshots of every core's modes, S1/S2 checked on each."""

    def __init__(self, region: Region, slot: int, cores: list[list[int]]) -> None:
        self.w = region.words
        self.ring = EventRing(region, slot)
        cnt = region.word_index("cpu_state", slot, "counters")
        self.c = {name: cnt + COUNTER[f"monitor.{name}"] for name in
                  ("samples", "retries", "s1", "s2", "ns")}
        self.c_corrupt = cnt + COUNTER["check.corrupt"]
        self.garbage: dict[int, int] = {}      # slot -> the garbage mode last reported
        wi = region.word_index
        self.cores = [(list(slots), [wi("cpu_state", s, "mseq") for s in slots],
                       [wi("slots", s, "mode") for s in slots],
                       [wi("slots", s, "domain") for s in slots],
                       [wi("cpu_state", s, "fenced") for s in slots],
                       [wi("slots", s, "pid") for s in slots]) for slots in cores]
        self.procs: dict[int, Proc] = {}

    def _gone(self, slot: int, pid_word: int) -> bool:
        p = self.procs.get(slot)
        if p is None or p.pid != self.w[pid_word]:
            p = self.procs[slot] = Proc(self.w[pid_word])
        return p.dead()

    def _out(self, slots: list[int], fenced: list[int], pids: list[int]) -> int:
        """Lanes of a core left out: fenced off by any sibling (a mask that names lanes the
        core does not have is garbage: ignored), or dead."""
        w, mask, full = self.w, 0, (1 << len(slots)) - 1
        for i in fenced:
            m = w[i]
            if 0 <= m <= full:
                mask |= m
        for a, s in enumerate(slots):
            if not mask >> a & 1 and self._gone(s, pids[a]):
                mask |= 1 << a
        return mask

    def sample(self) -> int:
        """One snapshot of every core; returns the violations found in it."""
        w, c = self.w, self.c
        found = 0
        t0 = now()
        for slots, seqs, modes, doms, fenced, pids in self.cores:
            out = 0
            for attempt in range(SEQLOCK_RETRIES):
                s1 = [w[i] for i in seqs]
                m = [w[i] for i in modes]
                d = [w[i] for i in doms]
                s2 = [w[i] for i in seqs]
                bad = [a for a in range(len(slots)) if s1[a] != s2[a] or s1[a] & 1]
                if not bad:
                    break
                if attempt == 1:      # twice torn: leave the dead and fenced out of the test
                    out = self._out(slots, fenced, pids)
                if out and all(out >> a & 1 for a in bad):
                    break
                w[c["retries"]] += 1
            else:
                continue          # this core changes too fast to read now: next round
            w[c["samples"]] += 1
            for a, mode in enumerate(m):
                if (mode > STUNNED or mode < 0) and not out >> a & 1:
                    self._garbage(slots[a], mode)
            found += self._judge(slots, m, d, out, fenced, pids)
        w[c["ns"]] += now() - t0
        return found

    def _garbage(self, slot: int, mode: int) -> None:
        """A mode word that holds no mode (asirt.cpu.guard): reported once per value seen
        (the monitor cannot fence; the lane's siblings do)."""
        if self.garbage.get(slot) != mode:
            self.garbage[slot] = mode
            self.w[self.c_corrupt] += 1
            self.ring.emit(EventKind.CORRUPT, Source.MONITOR, slot, Word.MODE, mode, 0)

    def _judge(self, slots: list[int], m: list[int], d: list[int], out: int,
               fenced: list[int], pids: list[int]) -> int:
        found = 0
        n = len(slots)
        for a in range(n):
            if m[a] != GUEST or out >> a & 1:
                continue
            for b in range(n):
                if b == a or out >> b & 1:
                    continue
                kind = None
                if m[b] == HOST:
                    kind = EventKind.S1
                elif m[b] == ASI and d[b] != d[a]:
                    kind = EventKind.S2
                elif m[b] == GUEST and d[b] != d[a] and b > a:
                    kind = EventKind.S2      # two guests: one violation, found from a < b
                if kind is None:
                    continue
                if self._out(slots, fenced, pids) & ((1 << a) | (1 << b)):
                    continue                 # one of them died or was fenced meanwhile
                found += 1
                self.w[self.c["s1" if kind == EventKind.S1 else "s2"]] += 1
                self.ring.emit(kind, Source.MONITOR, slots[b], m[b], d[b], slots[a])
        return found

    def run(self, interval_s: float = 0.0) -> None:
        """Sample until the parent asks to stop; yield (or sleep ``interval_s``) between
        samples so a monitor that shares a CPU with a worker never starves it."""
        w = self.w
        sched_yield, sleep = os.sched_yield, time.sleep
        while not w[STOP_WORD]:
            self.sample()
            if interval_s > 0:
                sleep(interval_s)
            else:
                sched_yield()
