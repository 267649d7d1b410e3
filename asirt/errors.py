"""Every error asirt raises on purpose. The CLI catches AsirtError once and exits with its code.

The base class lives in shm_layout.errors (the bottom of the stack); it is re-exported here.
Subclasses keep their constructor arguments in ``args`` so they pickle across processes.
"""
from __future__ import annotations

from shm_layout.errors import AsirtError, LayoutMismatch, SegmentMissing, ShmUnavailable

__all__ = ["AsirtError", "LayoutMismatch", "SegmentMissing", "ShmUnavailable", "BadInput",
           "FeatureMissing", "WorkerFailed", "CheckFailed", "Corrupted"]


class BadInput(AsirtError):
    """A user-supplied value is wrong: names the input, what is wrong, and the fix."""

    exit_code = 2

    def __init__(self, what: str, problem: str, fix: str = "") -> None:
        super().__init__(what, problem, fix)
        self.what, self.problem, self.fix = what, problem, fix

    def message(self) -> str:
        msg = f"{self.what}: {self.problem}"
        return f"{msg}; {self.fix}" if self.fix else msg


class FeatureMissing(AsirtError):
    """The host lacks something the requested mode needs (e.g. CONFIG_SCHED_CORE)."""

    exit_code = 2

    def __init__(self, feature: str, detail: str, fix: str) -> None:
        super().__init__(feature, detail, fix)
        self.feature, self.detail, self.fix = feature, detail, fix

    def message(self) -> str:
        return f"this host lacks {self.feature} ({self.detail}); {self.fix}"


class WorkerFailed(AsirtError):
    """A worker process died or reported failure; the run's other results are kept.

    ``slot`` and ``role`` name the worker itself: several workers may share a CPU (a monitor
    beside a vCPU, an oversubscribed run), so a failure is matched to a worker by its slot,
    never by its CPU."""

    exit_code = 1

    def __init__(self, cpu: int, status: str, detail: str = "", slot: int = -1,
                 role: str = "") -> None:
        super().__init__(cpu, status, detail, slot, role)
        self.cpu, self.status, self.detail = cpu, status, detail
        self.slot, self.role = slot, role

    def message(self) -> str:
        who = f" ({self.role}, slot {self.slot})" if self.slot >= 0 else ""
        msg = f"worker on CPU {self.cpu} {self.status}{who}"
        return f"{msg}: {self.detail}" if self.detail else msg


class CheckFailed(AsirtError):
    """A safety check failed (violation, or a leak under a strategy that claims safety)."""

    exit_code = 1


class Corrupted(AsirtError):
    """A CPU found one of its own published words changed behind its back: the region was
    written by someone who does not own the word (asirt.cpu.guard). Its worker leaves, with
    ``worker_status``."""

    exit_code = 1
    worker_status = 7

    def __init__(self, slot: int, word: str, wrote: int, found: int) -> None:
        super().__init__(slot, word, wrote, found)
        self.slot, self.word, self.wrote, self.found = slot, word, wrote, found

    def message(self) -> str:
        return (f"slot {self.slot}: its {self.word} word reads {self.found:#x} but it wrote "
                f"{self.wrote:#x}: the shared region was written behind its back; it leaves "
                "the core, and its siblings fence it off")
