"""Section dtypes of the region and the registry that attach validates against.

A region is a header followed by named sections, each an array of ``count`` items of one
registered dtype, every section starting on a 128-byte boundary (two cache lines: the
adjacent-line prefetcher pulls pairs, so per-CPU data never shares a 128-byte block).
Other modules of this package add their own sections with :func:`register`.
"""
from __future__ import annotations

import enum
import zlib
from typing import NamedTuple

import numpy as np

from shm_layout.header import SECTION_NAME_LEN

ALIGN = 128
MAX_SIBLINGS = 8

_REGISTRY: dict[str, np.dtype] = {}


def register(name: str, dtype: np.dtype) -> np.dtype:
    """Declare a section kind; its dtype is what every attach checks against."""
    assert len(name.encode()) <= SECTION_NAME_LEN, name
    assert name not in _REGISTRY or _REGISTRY[name] == dtype, f"section {name} registered twice"
    _REGISTRY[name] = dtype
    return dtype


def section_dtype(name: str) -> np.dtype | None:
    return _REGISTRY.get(name)


def dtype_crc(dtype: np.dtype) -> int:
    return zlib.crc32(repr(dtype.descr).encode())


class Section(NamedTuple):
    """One section to create: a registered name and how many items it holds."""
    name: str
    count: int


class WorkerState(enum.IntEnum):
    """A worker's ``state`` word in its slot (written by the worker only)."""
    EMPTY = 0
    ATTACHED = 1   # pinned, attached, validated
    READY = 2      # waiting on the start barrier
    RUNNING = 3
    DONE = 4       # finished its program and recorded everything
    FAILED = 5     # raised; ``err`` holds a code, the parent reads its stderr


class Mode(enum.IntEnum):
    """A CPU's mode word (DESIGN.md, vocabulary)."""
    IDLE = 0
    HOST = 1
    ASI = 2
    GUEST = 3
    STUNNED = 4


# Per-CPU slot: all int64 so the hot path reads and writes it through one memoryview('q').
# Every field has exactly one writer: the worker pinned to that CPU.
SLOT_DTYPE = register("slots", np.dtype([
    ("cpu", "<i8"),        # logical CPU this slot belongs to
    ("pid", "<i8"),        # worker process id
    ("state", "<i8"),      # WorkerState
    ("mode", "<i8"),       # Mode
    ("domain", "<i8"),     # security domain of the current mode (0 = host)
    ("ping", "<i8"),       # request sequence number (transport benchmarks)
    ("pong", "<i8"),       # last request sequence number answered
    ("progress", "<i8"),   # loop iterations, for liveness and progress display
    ("samples", "<i8"),    # latency samples recorded
    ("err", "<i8"),        # non-zero error code when state == FAILED
    ("_pad", "<i8", (6,)),
]))
assert SLOT_DTYPE.itemsize == ALIGN, SLOT_DTYPE.itemsize

# Per-core record (a physical core, or an emulated pseudo-core): written by the parent.
CORE_DTYPE = register("cores", np.dtype([
    ("core", "<i8"),
    ("nsiblings", "<i8"),
    ("cpus", "<i8", (MAX_SIBLINGS,)),    # slot indices of the siblings, -1 for unused
    ("emulated", "<i8"),
    ("l1d_bytes", "<i8"),
    ("_pad", "<i8", (4,)),
]))
assert CORE_DTYPE.itemsize == ALIGN, CORE_DTYPE.itemsize

# Metric names, so the region describes its own histograms. Written by the parent.
METRIC_DTYPE = register("metrics", np.dtype([
    ("name", "S48"),
    ("unit", "S8"),
    ("_pad", "<i8", (9,)),
]))
assert METRIC_DTYPE.itemsize == ALIGN, METRIC_DTYPE.itemsize

# Log-linear latency histograms, one per (slot, metric), item index slot * nmetrics + metric.
# The bucketing scheme lives in asirt.histogram, which asserts it fits HIST_BUCKETS.
HIST_BUCKETS = 2304
HIST_DTYPE = register("hist", np.dtype(("<i8", (HIST_BUCKETS,))))
assert HIST_DTYPE.itemsize % ALIGN == 0
