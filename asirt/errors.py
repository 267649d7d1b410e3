"""Every error asirt raises on purpose. The CLI catches AsirtError once and exits with its code.

The base class lives in shm_layout.errors (the bottom of the stack); it is re-exported here.
Subclasses keep their constructor arguments in ``args`` so they pickle across processes.
"""
from __future__ import annotations

from shm_layout.errors import AsirtError, LayoutMismatch, SegmentMissing, ShmUnavailable

__all__ = ["AsirtError", "LayoutMismatch", "SegmentMissing", "ShmUnavailable", "BadInput",
           "FeatureMissing", "WorkerFailed", "CheckFailed"]


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
    """A worker process died or reported failure; the run's other results are kept."""

    exit_code = 1

    def __init__(self, cpu: int, status: str, detail: str = "") -> None:
        super().__init__(cpu, status, detail)
        self.cpu, self.status, self.detail = cpu, status, detail

    def message(self) -> str:
        msg = f"worker on CPU {self.cpu} {self.status}"
        return f"{msg}: {self.detail}" if self.detail else msg


class CheckFailed(AsirtError):
    """A safety check failed (violation, or a leak under a strategy that claims safety)."""

    exit_code = 1
