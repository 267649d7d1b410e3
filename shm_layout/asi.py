"""Sections of the Address Space Isolation state: frames, page tables, ASI instances, and per-CPU
ASI state with its TLB. (The core buffer these CPUs load into is the CPU layer's: shm_layout.cpu;
their counters are in ``cpu_state.counters``.)

Every field is an unsigned 64-bit word so the hot paths read all of them through one
``memoryview('Q')`` over the region (:func:`u64_view`); page-table entries use bit 63 (NX),
which a signed view could not store. Word indices come from the dtypes (:func:`word`).

Writers, field by field (DESIGN.md: one writer per field, or a lock):
- ``asi_ctl``, ``asi_frames``, ``asi_ptmeta``, ``asi_tables``, ``asi_inst``: whoever holds the
  region's page-table lock (a ByteLock on PTLOCK_BYTE: the parent during init; any CPU's
  map/unmap later). Walkers
  read tables lock-free and validate with the ``seq`` seqcount.
- ``asi_cpu[c]``: CPU ``c`` only (its pinned worker).
"""
from __future__ import annotations

import numpy as np

from shm_layout.region import Region
from shm_layout.sections import ALIGN, register

PAGE_SIZE = 4096
PT_ENTRIES = 512      # entries per table, every level
MAX_ASI = 64          # instance slots; an instance's PCID is its index, 0 is the full tree
TLB_ENTRIES = 64      # per CPU, direct-mapped by page number
TLB_WORDS = 2         # tag, pte per TLB entry (asirt.mm.tlb packs the tag)

U8 = "<u8"

# Region-wide control. ``seq`` is alone on its 128-byte block: every walk reads it.
ASI_CTL_DTYPE = register("asi_ctl", np.dtype([
    ("seq", U8),                  # page-table seqcount: odd while a map/unmap is in progress
    ("_pad0", U8, (15,)),
    ("lock_pid", U8),             # pid holding the page-table lock (0: free), to name it
    ("template", U8),             # root table of the template tree (shared global tables)
    ("ncores", U8),
    ("shootdowns_sent", U8),      # flush requests a sender waited for (a CPU was inside)
    ("shootdowns_avoided", U8),   # online CPUs not inside: left to flush lazily
    ("lives", U8),                # instance incarnations so far (each live instance's state)
    ("_pad1", U8, (10,)),
]))

# One emulated physical frame.
FRAME_DTYPE = register("asi_frames", np.dtype([
    ("cls", U8),                  # asirt.memclass.MemClass; 0 = free
    ("owner", U8),                # domain (0 = host kernel)
    ("token", U8),                # deposited in the core buffer on a load; 0 = none (global)
    ("used", U8),                 # bytes handed out by the object allocator (PAGE_SIZE: whole)
]))

# Bookkeeping of one page table of the pool.
PTMETA_DTYPE = register("asi_ptmeta", np.dtype([
    ("state", U8),                # 0 free, 1 in use
    ("owner", U8),                # instance index whose tree owns it, or GLOBAL_OWNER
    ("level", U8),                # 4 = PML4 ... 1 = PT
    ("nvalid", U8),               # present entries
]))
GLOBAL_OWNER = MAX_ASI            # owner of the template tree and the shared global tables

PT_DTYPE = register("asi_tables", np.dtype((U8, (PT_ENTRIES,))))
assert PT_DTYPE.itemsize == PAGE_SIZE

# One ASI instance (index = PCID). Index 0 is the full kernel tree.
INST_DTYPE = register("asi_inst", np.dtype([
    ("state", U8),                # 0 free, else this incarnation's number (asi_ctl.lives)
    ("refcount", U8),
    ("cls", U8),                  # asirt.asi.AsiClassId
    ("domain", U8),
    ("root", U8),                 # table index of the PML4
    ("gen", U8),                  # TLB generation: bumped by every unmap from this tree
    ("_pad", U8, (10,)),
]))

# Per-CPU ASI state: written by that CPU only.
CPU_DTYPE = register("asi_cpu", np.dtype([
    ("online", U8),               # 1 while a worker drives this CPU (shootdowns wait for it)
    ("pid", U8),
    ("current", U8),              # instance the CPU runs in now (0: the full tree)
    ("target", U8),               # instance asi_enter last chose; kept across asi_exit
    ("intr_depth", U8),           # asi_intr_enter nesting
    ("_pad", U8, (11,)),
    ("seen", U8, (MAX_ASI,)),     # per PCID: the instance generation this TLB is flushed to
    ("tlb", U8, (TLB_ENTRIES * TLB_WORDS,)),
]))

for _dt in (ASI_CTL_DTYPE, INST_DTYPE, CPU_DTYPE):
    assert _dt.itemsize % ALIGN == 0, _dt
for _dt in (ASI_CTL_DTYPE, FRAME_DTYPE, PTMETA_DTYPE, INST_DTYPE, CPU_DTYPE):
    assert all(f[1] % 8 == 0 for f in _dt.fields.values()), _dt
assert ASI_CTL_DTYPE.fields["lock_pid"][1] == ALIGN        # seq has its block to itself
assert CPU_DTYPE.fields["seen"][1] % ALIGN == 0 and CPU_DTYPE.fields["tlb"][1] % ALIGN == 0


def word(region: Region, section: str, item: int, field: str | None = None) -> int:
    """Index into :func:`u64_view` (or ``region.words``) of a field of one item."""
    s = region.section(section)
    if not 0 <= item < s.count:
        raise IndexError(f"{section}[{item}] out of range (count {s.count})")
    off = s.offset + item * s.dtype.itemsize
    if field is not None:
        off += s.dtype.fields[field][1]
    return off // 8


def u64_view(region: Region) -> memoryview:
    """The whole region as unsigned 64-bit words; release it before closing the region."""
    return region.words.cast("B").cast("Q")
