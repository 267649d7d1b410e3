"""Region header: magic, layout version, total size, creator, state, and the section table.

The header is written by the creator (the orchestrator) only. ``stop`` and ``start_ns`` are
its run-control words: the parent sets them, workers read them.
"""
from __future__ import annotations

import enum

import numpy as np

MAGIC = int.from_bytes(b"ASIRTSHM", "little")
# 3: one core buffer and one per-CPU state for every mechanism, and the creator holds a flock
# on the segment for its whole life (region.py). A segment of another version may take none,
# so this build cannot tell whether its run is alive and leaves it be.
# 4: counters check.sample_ns and cpu.idle_flushes, stun_cpu.vcpu_tid (real vCPUs' kicks).
LAYOUT_VERSION = 4
MAX_SECTIONS = 32   # base 4 + cpu 3 + sync 2 + asi 6 = 15 today, and the kvm scenario's
SECTION_NAME_LEN = 16


class RegionState(enum.IntEnum):
    CREATING = 1   # header being written; attach refuses
    READY = 2      # fully initialised; workers may attach
    RUNNING = 3    # start barrier released
    STOPPING = 4   # parent asked workers to stop
    DONE = 5       # results collected; about to be unlinked


SECTION_ENTRY_DTYPE = np.dtype([
    ("name", f"S{SECTION_NAME_LEN}"),
    ("offset", "<u8"),
    ("nbytes", "<u8"),
    ("count", "<u8"),
    ("itemsize", "<u8"),
    ("dtype_crc", "<u8"),   # crc32 of the item dtype's description: catches reordered fields
])

HEADER_DTYPE = np.dtype([
    ("magic", "<u8"),
    ("version", "<u4"),
    ("header_size", "<u4"),
    ("total_size", "<u8"),
    ("creator_pid", "<i8"),
    ("creator_uid", "<i8"),
    ("created_ns", "<i8"),     # time.time_ns() at creation, for humans and reclaim
    ("state", "<i8"),
    ("stop", "<i8"),           # run control: non-zero asks every worker to finish
    ("start_ns", "<i8"),       # CLOCK_MONOTONIC time the start barrier was released
    ("nsections", "<u8"),
    ("_pad", "<u8", (6,)),
    ("sections", SECTION_ENTRY_DTYPE, (MAX_SECTIONS,)),
], align=False)

# Control words are read by workers through an int64 memoryview: keep them 8-aligned.
for _f in ("state", "stop", "start_ns"):
    assert HEADER_DTYPE.fields[_f][1] % 8 == 0, _f
assert HEADER_DTYPE.fields["sections"][1] % 128 == 0
assert HEADER_DTYPE.itemsize % 128 == 0, HEADER_DTYPE.itemsize

#: int64-word indices of the run-control fields, for hot-path memoryview access.
STATE_WORD = HEADER_DTYPE.fields["state"][1] // 8
STOP_WORD = HEADER_DTYPE.fields["stop"][1] // 8
START_NS_WORD = HEADER_DTYPE.fields["start_ns"][1] // 8
