"""How a CPU waits: spin, then yield; a deadline; past the ack timeout a liveness check of the
CPU it waits for (fencing it off when dead, or when its published words are corrupt:
asirt.cpu.guard); give up past ``give_up``; stop when the run stops.

Hot loops poll a word inline (a call per poll would double a round trip) and call
:meth:`Wait.slow` only after ``limit`` polls without progress, then on every poll. Past the
limit the waiter yields the CPU on every poll, so a run never live-locks when workers outnumber
CPUs or share them with other processes. Loops that are not hot use :meth:`Waiter.until`,
which also calls the CPU's safe point on every poll.
"""
from __future__ import annotations

import enum
import os
from typing import TYPE_CHECKING, Callable

from asirt.clock import now
from shm_layout.counters import COUNTER
from shm_layout.cpu import EventKind, Phase, Source
from shm_layout.header import STOP_WORD

if TYPE_CHECKING:
    from asirt.cpu.cpu import Cpu

__all__ = ["Waiter", "Wait", "Outcome", "SPIN_LIMIT", "SPIN_LIMIT_OVERSUBSCRIBED", "spin_limit"]

#: polls before falling back to yielding: about a millisecond of polling on current CPUs
SPIN_LIMIT = 1 << 14
#: when workers outnumber CPUs a spinning waiter only delays the CPU it waits for
SPIN_LIMIT_OVERSUBSCRIBED = 64


def spin_limit(oversubscribed: bool) -> int:
    return SPIN_LIMIT_OVERSUBSCRIBED if oversubscribed else SPIN_LIMIT


class Outcome(enum.IntEnum):
    """What one slow-path tick of a wait says (DONE: what until() returns on success)."""
    GO_ON = 0
    STOP = 1        # the parent asked every worker to stop
    FENCED = 2      # the CPU waited for was fenced off
    GIVE_UP = 3     # waited past give_up for a live CPU
    DEADLINE = 4    # the caller's own bound passed
    DONE = 5


class Wait:
    """One wait in progress, for lane ``lane`` (-1: no one in particular)."""

    __slots__ = ("cpu", "lane", "phase", "deadline", "give_up", "start", "next_check")

    def __init__(self, cpu: "Cpu", lane: int, phase: Phase, deadline: int | None,
                 give_up: bool) -> None:
        self.cpu, self.lane, self.phase = cpu, lane, phase
        self.deadline, self.give_up = deadline, give_up
        self.start = 0
        self.next_check = 0

    def slow(self) -> Outcome:
        """The slow path, after the spin limit: yield; past the ack timeout check the liveness
        of whom we wait for; give up past give_up; stop; the deadline."""
        cpu = self.cpu
        w = cpu.w
        if w[STOP_WORD]:
            return Outcome.STOP
        t = now()
        p = cpu.params
        if not self.start:                     # first slow tick of this wait: arm the timer
            self.start = t
            self.next_check = t + int(p.ack_timeout_ms * 1e6)
            w[cpu.i_phase] = self.phase
        elif t >= self.next_check:
            self.next_check = t + int(p.ack_timeout_ms * 1e6)
            w[cpu.cnt + COUNTER["cpu.timeouts"]] += 1
            j = self.lane
            if j >= 0 and not cpu.fenced_mask >> j & 1:
                cpu.guard.audit()               # not its own garbage echoed, then:
                bad = cpu.guard.garbage(j)      # what it waits for may be garbage it wrote
                if (bad is not None and cpu.corrupt(j, *bad)) or cpu.check_liveness(j, self.phase):
                    cpu.events.emit(EventKind.TIMEOUT, Source.LIVENESS, cpu.slot_of[j],
                                    self.phase, t - self.start, 1)
                    return Outcome.FENCED
            if j >= 0 and cpu.fenced_mask >> j & 1:
                return Outcome.FENCED
            w[cpu.cnt + COUNTER["cpu.slow"]] += 1
            if j >= 0:
                w[cpu.i_alive_waits + j] += 1
            cpu.events.emit(EventKind.TIMEOUT, Source.LIVENESS,
                            cpu.slot_of[j] if j >= 0 else -1, self.phase, t - self.start, 0)
        if self.deadline is not None and t > self.deadline:
            return Outcome.DEADLINE
        if self.give_up and t - self.start > p.give_up_ms * 1e6:
            cpu.events.emit(EventKind.TIMEOUT, Source.LIVENESS,
                            cpu.slot_of[self.lane] if self.lane >= 0 else -1, self.phase,
                            t - self.start, 0)
            return Outcome.GIVE_UP
        os.sched_yield()
        return Outcome.GO_ON

    def done(self) -> None:
        """The wait ended: if it went slow, the CPU is back in its main phase."""
        if self.start:
            self.cpu.w[self.cpu.i_phase] = Phase.MAIN


class Waiter:
    """One CPU's waiting discipline (module docstring)."""

    def __init__(self, cpu: "Cpu") -> None:
        self.cpu = cpu
        over = cpu.params.oversubscribed
        self.limit = spin_limit(bool(over))

    def begin(self, lane: int, phase: Phase, deadline: int | None = None,
              give_up: bool = False) -> Wait:
        return Wait(self.cpu, lane, phase, deadline, give_up)

    def until(self, done: Callable[[], bool], lane: int, phase: Phase,
              deadline: int | None = None, give_up: bool = False,
              safepoint: bool = True) -> Outcome:
        """Poll ``done()`` (answering at the safe point meanwhile) until it holds (DONE) or the
        wait ends otherwise (STOP, FENCED, GIVE_UP, DEADLINE)."""
        wait = Wait(self.cpu, lane, phase, deadline, give_up)
        sp = self.cpu.safepoint
        n, limit = 0, self.limit
        try:
            while not done():
                if safepoint:
                    sp()
                n += 1
                if n >= limit:
                    r = wait.slow()
                    if r != Outcome.GO_ON:
                        return r
            return Outcome.DONE
        finally:
            wait.done()
