"""The one safe point of a CPU: where every pending request of every mechanism is answered.

Mechanisms register an *answerer* -- the stun handshake (ack, or park until released), the
TLB (flush for a shootdown), core scheduling (note that a sibling wants the core) -- and every
wait loop of every mechanism calls the safe point, so a CPU waiting for one mechanism never
stalls another: a CPU spinning in a TLB shootdown still parks for a stun request, and a CPU
parked by the stun still flushes its TLB for a shootdown.

An answerer returns True when it changed this CPU's state (the stun parked it: a CPU that was
in GUEST is then in ASI and must run its VM-entry barrier again). An answerer is never
re-entered: while one runs (the stun's park loop calls the safe point for the others), the
nested calls skip it.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["SafePoint", "Answer"]

Answer = Callable[[], bool]


class SafePoint:
    def __init__(self) -> None:
        self._answers: list[Answer] = []
        self._busy = 0

    def register(self, answer: Answer) -> int:
        """Add an answerer; its index names it to :meth:`others`."""
        self._answers.append(answer)
        return len(self._answers) - 1

    def __call__(self) -> bool:
        """Answer every pending request; True when an answerer changed this CPU's state."""
        changed = False
        for i, answer in enumerate(self._answers):
            bit = 1 << i
            if self._busy & bit:
                continue
            self._busy |= bit
            try:
                if answer():
                    changed = True
            finally:
                self._busy &= ~bit
        return changed

    def others(self, index: int) -> bool:
        """The safe point from inside answerer ``index`` (it is running: skip it)."""
        bit = 1 << index
        was = self._busy & bit
        self._busy |= bit
        try:
            return self()
        finally:
            if not was:
                self._busy &= ~bit

    def __len__(self) -> int:
        return len(self._answers)
