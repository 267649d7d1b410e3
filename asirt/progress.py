"""The one progress line of a long run, on stderr: rewritten in place on a terminal, one line
per entry otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO

import numpy as np

__all__ = ["ProgressLine"]


class ProgressLine:
    """One status line on stderr, rewritten in place on a terminal, one line per entry otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, quiet: bool = False) -> None:
        self.total, self.stream, self.quiet = total, stream, quiet
        self.tty = stream.isatty()
        self.index, self.label, self._last = 0, "", 0.0

    def start(self, label: str) -> None:
        self.index += 1
        self.label = label
        if not self.quiet and not self.tty:
            print(f"[{self.index}/{self.total}] {label} ...", file=self.stream, flush=True)

    def update(self, fraction: float, slots: np.ndarray) -> None:
        now = time.monotonic()
        if self.quiet or not self.tty or now - self._last < 0.2:
            return
        self._last = now
        samples = int(slots["samples"].sum())
        print(f"\r[{self.index}/{self.total}] {self.label}  {fraction:4.0%}  "
              f"{samples:,} samples\033[K", end="", file=self.stream, flush=True)

    def done(self, summary: str) -> None:
        if self.quiet:
            return
        prefix = "\r" if self.tty else ""
        end = "\033[K\n" if self.tty else "\n"
        print(f"{prefix}[{self.index}/{self.total}] {self.label}  {summary}", end=end,
              file=self.stream, flush=True)
