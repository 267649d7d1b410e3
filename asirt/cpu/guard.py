"""Corrupt published words: garbage in a word of the region that its one writer never wrote
(a wild write, a flipped bit; ``asirt stress --faults corrupt`` injects it on purpose).

Every published word has exactly one writer (DESIGN.md), which gives two checks:

- a *reader* checks the range of what it reads: a mode that is no Mode, a domain outside
  0..MAX_DOMAINS, a negative seqlock, generation or ack, a fence mask naming lanes the core
  does not have. :meth:`Guard.garbage` checks all of a lane's words; the liveness check of
  every slow wait runs it (a wait that went slow is exactly what garbage in a sibling's
  generation or ack causes). Hot paths check the one word they read, inline: the barrier's
  B2/B3 and the transition checker look at the mode, the monitor at every mode it samples.
- the *owner* checks that its own words still hold what it last wrote (:meth:`Guard.audit`,
  at each step of a loop that can afford it: asirt stress's walk). It also catches garbage
  that happens to be in range.

What follows a find: a reader that finds a sibling's word corrupt reports it (CORRUPT event,
``check.corrupt``) and fences the lane off, killing it first as a stopped one (asirt.cpu.cpu:
a lane whose state cannot be read must not run beside a guest); a checker that cannot fence
(the transition checker, the monitor) reports it. An owner that finds its own word changed
behind its back reports it and raises :class:`asirt.errors.Corrupted`: its worker leaves
(exit status 7) and its siblings fence it off as dead.

Mechanisms declare their words: the CPU its mode, domain, seqlock and fence mask; the stun
handshake its generation and acks (asirt.sync.stun.Stun). A reader checks only what a sibling
wrote on its own: a sibling's ack of *this* CPU's requests, never its acks of a third lane,
which may echo that lane's garbage.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from asirt.errors import Corrupted
from shm_layout.counters import COUNTER
from shm_layout.cpu import EventKind, Source, Word

if TYPE_CHECKING:
    from asirt.cpu.cpu import Cpu

__all__ = ["Guard", "NO_LIMIT"]

#: the top of a range with no upper bound (a generation, a seqlock)
NO_LIMIT = (1 << 63) - 1
_CORRUPT, _LIVENESS = int(EventKind.CORRUPT), int(Source.LIVENESS)


class Guard:
    """One CPU's corruption checks (module docstring)."""

    def __init__(self, cpu: "Cpu") -> None:
        self.cpu = cpu
        #: per word: (which, its index in every lane (index = lane), lowest, highest)
        self.ranges: list[tuple[Word, list[int], int, int]] = []
        #: per own word: (which, its index, what this CPU last wrote there)
        self.own: list[tuple[Word, int, Callable[[], int]]] = []
        self.c_corrupt = cpu.cnt + COUNTER["check.corrupt"]

    def declare(self, which: Word, lanes: list[int], lo: int, hi: int) -> None:
        """A word every lane publishes at ``lanes[lane]``, valid in ``lo..hi``."""
        self.ranges.append((which, lanes, lo, hi))

    def mine(self, which: Word, index: int, wrote: Callable[[], int]) -> None:
        """This CPU's own word at ``index``: ``wrote()`` is what it last wrote there."""
        self.own.append((which, index, wrote))

    def garbage(self, j: int) -> tuple[Word, int] | None:
        """The first of lane j's words out of its range, and what it holds; None if none is."""
        w = self.cpu.w
        for which, lanes, lo, hi in self.ranges:
            v = w[lanes[j]]
            if not lo <= v <= hi:
                return which, v
        return None

    def report(self, slot: int, which: int, value: int, source: int = _LIVENESS,
               own: bool = False) -> None:
        """Count and record one corrupt word of ``slot``'s."""
        cpu = self.cpu
        cpu.w[self.c_corrupt] += 1
        cpu.events.emit(_CORRUPT, source, slot, int(which), value, int(own))

    def audit(self) -> None:
        """Raise Corrupted (after reporting it) if an own word differs from what this CPU
        last wrote. Call it where no write of those words is half-way (and, under the signal
        transport, where the handler does not act: it acks). A CPU audits itself before it
        accuses a sibling: a sibling may echo its garbage (an ack of a corrupt generation)."""
        w = self.cpu.w
        for which, i, mine in self.own:
            wrote, found = mine(), w[i]
            if found != wrote:
                cpu = self.cpu
                self.report(cpu.slot, which, found, own=True)
                raise Corrupted(cpu.slot, which.name.lower(), wrote, found)
