"""What a worker program gets: its attached region, its slot, and hot-path helpers.

Layering: workers import shm_layout and asirt primitives, never the CLI or the orchestrator.
A program is a module ``workers.<role>`` with a function ``run(ctx: WorkerContext) -> None``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from shm_layout import Region
from shm_layout.header import STOP_WORD


@dataclass
class WorkerContext:
    region: Region
    slot: int                    # index of this worker's slot in the "slots" section
    cpu: int                     # the logical CPU it is pinned to
    role: str
    params: dict[str, Any]       # scenario parameters (JSON from the parent)
    metric_names: list[str]      # names of the histogram metrics, in region order
    words: memoryview = field(init=False)
    parent_pid: int = field(default_factory=os.getppid)

    def __post_init__(self) -> None:
        self.words = self.region.words

    def slot_word(self, slot: int, fieldname: str) -> int:
        """int64 word index of a field of any CPU's slot (offsets from SLOT_DTYPE)."""
        return self.region.word_index("slots", slot, fieldname)

    def hist_base(self, metric: str) -> int:
        """Word index of bucket 0 of this worker's histogram for ``metric``."""
        m = self.metric_names.index(metric)
        return self.region.word_index("hist", self.slot * len(self.metric_names) + m)

    def stop_requested(self) -> bool:
        """The parent asked every worker to finish, or the parent died (we were orphaned)."""
        return self.words[STOP_WORD] != 0 or os.getppid() != self.parent_pid
