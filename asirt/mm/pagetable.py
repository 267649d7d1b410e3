"""x86-64-style 4-level page tables in the region's table pool, and the lock that guards them.

Entries are u64: bit 0 present, bit 1 writable, bit 8 global, bit 63 NX, bits 12..51 a frame
number. A non-leaf entry's frame number is the index of a table in the pool; a leaf's is a
frame of ``asi_frames``. Every table belongs to one owner (an ASI instance, or the template
tree of shared global tables); a change through a tree may only touch tables of that tree's
owner, so a restricted tree can never write to the tables it shares.

Writers hold the region's page-table lock and bracket each change with the ``seq`` seqcount
(odd while changing). Walks take no lock: they read ``seq``, walk, and retry if it moved; on
x86 (TSO) loads are not reordered with loads, nor stores with stores, so this needs no fence.

The lock is a :class:`shm_layout.region.ByteLock` (byte ``PTLOCK_BYTE`` of the segment file),
which the kernel drops when its holder dies: a CPU killed in a map or unmap (``asirt stress
--faults kill``, or a sibling's STONITH of a stopped one) cannot hold it for good, as a
semaphore did. If it died in a change, the seqcount stays odd: the next holder closes it, and
so does a walk that finds it odd for ``SEQ_RECOVER_S`` with the lock free. The tables are then
as the dead writer left them, each entry whole (a change is single-word stores, and a walk
validates every frame number). A walk checks every frame number against its pool before using it, so a corrupt
entry raises :class:`CorruptEntry` instead of reading outside the pool.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from asirt.errors import AsirtError, BadInput
from asirt.mm.memclass import DoubleFree, PoolExhausted
from asirt.params import CpuParams
from asirt.proc import kill_if_stopped_again
from shm_layout.asi import GLOBAL_OWNER, PAGE_SIZE, PT_ENTRIES, PTMETA_DTYPE, u64_view, word
from shm_layout.region import PTLOCK_BYTE, ByteLock, Region

PRESENT = 1 << 0
WRITABLE = 1 << 1
PTE_GLOBAL = 1 << 8
NX = 1 << 63
PFN_SHIFT = 12
PFN_MASK = (1 << 40) - 1
LEVELS = 4
_NONLEAF = PRESENT | WRITABLE          # permissions are decided at the leaf
_SIGN = 0xFFFF << 48

_META_WORDS = PTMETA_DTYPE.itemsize // 8
_OWNER = PTMETA_DTYPE.fields["owner"][1] // 8
_NVALID = PTMETA_DTYPE.fields["nvalid"][1] // 8

LOCK_TIMEOUT_S = 10.0     # a holder this slow is dead or stopped: say who it is
SEQ_TIMEOUT_S = 10.0
#: how long a walk spins on an odd seqcount before it tries the lock: a rate limit on that
#: fcntl, not evidence (what shows the writer died is that its lock could be taken)
SEQ_RECOVER_S = 0.01


def make_pte(pfn: int, flags: int = PRESENT | WRITABLE | NX) -> int:
    return (pfn << PFN_SHIFT) | flags | PRESENT


def pte_frame(pte: int) -> int:
    return (pte >> PFN_SHIFT) & PFN_MASK


def index(va: int, level: int) -> int:
    """The entry of ``va`` in its level-``level`` table (4: PML4 ... 1: PT)."""
    return (va >> (PFN_SHIFT + 9 * (level - 1))) & (PT_ENTRIES - 1)


def check_va(va: int) -> int:
    """A canonical, page-aligned 48-bit virtual address, as an unsigned 64-bit int."""
    if not (0 <= va < 1 << 47 or _SIGN | 1 << 47 <= va < 1 << 64) or va % PAGE_SIZE:
        raise BadInput(f"address {va:#x}", "is not a canonical page-aligned 48-bit address",
                       "use 0..0x00007ffffffff000 or 0xffff800000000000.. in 4 KiB steps")
    return va


class CorruptEntry(AsirtError):
    """A table entry names a frame outside its pool; the walk stopped before using it."""

    exit_code = 1

    def __init__(self, address: int, level: int, table: int, entry: int, limit: int) -> None:
        super().__init__(address, level, table, entry, limit)
        self.address, self.level, self.table, self.entry, self.limit = (
            address, level, table, entry, limit)

    def message(self) -> str:
        return (f"corrupt page-table entry walking {self.address:#x}: level-{self.level} "
                f"table {self.table} holds {self.entry:#018x}, whose frame "
                f"{pte_frame(self.entry)} is outside the pool of {self.limit}")


class AlreadyMapped(AsirtError):
    def __init__(self, address: int, existing: int, wanted: int) -> None:
        super().__init__(address, existing, wanted)
        self.address, self.existing, self.wanted = address, existing, wanted

    def message(self) -> str:
        return (f"{self.address:#x} is already mapped to frame {pte_frame(self.existing)} "
                f"(entry {self.existing:#x}); unmap it before mapping frame "
                f"{pte_frame(self.wanted)}")


class NotOwner(AsirtError):
    """A change through one tree would write a table that belongs to another (shared) tree."""

    def __init__(self, address: int, table: int, owner: int, table_owner: int) -> None:
        super().__init__(address, table, owner, table_owner)
        self.address, self.table, self.owner, self.table_owner = address, table, owner, table_owner

    def message(self) -> str:
        whose = "the shared global tables" if self.table_owner == GLOBAL_OWNER else \
            f"tree {self.table_owner}"
        return (f"changing {self.address:#x} through tree {self.owner} would write table "
                f"{self.table}, which belongs to {whose}; map global memory through the "
                f"template tree")


class LockTimeout(AsirtError):
    exit_code = 1

    def __init__(self, what: str, holder: int, waited_s: float) -> None:
        super().__init__(what, holder, waited_s)
        self.what, self.holder, self.waited_s = what, holder, waited_s

    def message(self) -> str:
        return (f"{self.what} not released after {self.waited_s:.1f} s (holder pid "
                f"{self.holder}); the holder is dead or stopped")


class PageTables:
    """The table pool of one attached region. ``service`` runs while waiting for the lock."""

    def __init__(self, region: Region, service: Callable[[], None] | None = None,
                 params: CpuParams = CpuParams()) -> None:
        self.q = u64_view(region)
        self.lock = ByteLock(region, PTLOCK_BYTE)
        self.service = service
        #: the stop-the-holder policy while waiting for the lock: the CPU's own (``params``;
        #: the parent has no CPU and takes the defaults)
        self.stonith = params.stonith
        self.holder_check_s = params.ack_timeout_ms / 1e3
        sec = region.section("asi_tables")
        self.tbase, self.ntables = sec.offset // 8, sec.count
        self.nframes = region.section("asi_frames").count
        self.mbase = word(region, "asi_ptmeta", 0)
        self.seq = word(region, "asi_ctl", 0, "seq")
        self.lock_pid = word(region, "asi_ctl", 0, "lock_pid")
        self.held = False                     # this instance holds the lock (in a change)
        self.meta = region.array("asi_ptmeta")
        self.tables = region.array("asi_tables")

    def close(self) -> None:
        del self.meta, self.tables
        self.lock.close()
        self.q.release()

    # -- the lock and the seqcount ------------------------------------------------------
    def __enter__(self) -> "PageTables":
        if not self.lock.try_acquire():
            self._acquire_slow()
        self.held = True
        self.q[self.lock_pid] = os.getpid()
        self._close_seq()            # the last holder may have died in a change (docstring)
        return self

    def _acquire_slow(self) -> None:
        """Poll the lock (answering shootdowns meanwhile); once per ``holder_check_s`` look at
        its holder: one stopped at two looks is killed (``stonith``), and its lock falls free
        with it -- the handshake's stop-the-holder policy, with the CPU's own settings."""
        start = time.monotonic()
        check_at, stopped = start + self.holder_check_s, 0
        while True:
            if self.service is not None:
                self.service()       # answer shootdowns while we wait (the holder may wait on us)
                os.sched_yield()
            else:
                time.sleep(0.001)
            if self.lock.try_acquire():
                return
            t = time.monotonic()
            if t >= check_at:
                check_at = t + self.holder_check_s
                stopped = kill_if_stopped_again(self.q[self.lock_pid], stopped, self.stonith)
            if t - start > LOCK_TIMEOUT_S:
                raise LockTimeout("page-table lock", self.q[self.lock_pid],
                                  time.monotonic() - start)

    def __exit__(self, *exc: object) -> None:
        self._close_seq()            # an exception inside a change
        self.q[self.lock_pid] = 0
        self.held = False
        self.lock.release()

    def _close_seq(self) -> None:
        """With the lock held: end a change nobody will end (the seqcount even again)."""
        if self.q[self.seq] & 1:
            self.q[self.seq] += 1

    def _begin(self) -> None:
        self.q[self.seq] += 1

    def _end(self) -> None:
        self.q[self.seq] += 1

    # -- lock-free walk -----------------------------------------------------------------
    def walk(self, root: int, va: int) -> int:
        """The leaf entry mapping ``va`` in the tree at ``root``, 0 if none. Takes no lock."""
        q, tb, n, nf, sw = self.q, self.tbase, self.ntables, self.nframes, self.seq
        tries = 0
        while True:
            s = q[sw]
            if not s & 1:
                t = root
                for shift in (39, 30, 21):
                    e = q[tb + (t << 9) + ((va >> shift) & 511)]
                    if not e & 1:
                        if q[sw] == s:
                            return 0
                        break
                    child = (e >> 12) & PFN_MASK
                    if child >= n:
                        if q[sw] == s:
                            raise CorruptEntry(va, (shift - 3) // 9, t, e, n)
                        break
                    t = child
                else:
                    e = q[tb + (t << 9) + ((va >> 12) & 511)]
                    if q[sw] == s:
                        if not e & 1:
                            return 0
                        if (e >> 12) & PFN_MASK < nf:
                            return e
                        raise CorruptEntry(va, 1, t, e, nf)
            tries += 1
            if tries > 64:
                self._seq_wait(tries)

    def _seq_wait(self, tries: int) -> None:
        if tries == 65:
            self._seq_start = time.monotonic()
        else:
            waited = time.monotonic() - self._seq_start
            # an OFD lock never refuses its own holder: a walk inside this instance's own
            # change (at a safe point) must not take it as a dead writer's
            if (waited > SEQ_RECOVER_S and not self.held and self.q[self.seq] & 1
                    and self.lock.try_acquire()):
                try:                 # odd, and nobody holds the lock: its writer died
                    self._close_seq()
                finally:
                    self.lock.release()
            elif waited > SEQ_TIMEOUT_S:
                raise LockTimeout("page-table seqcount", self.q[self.lock_pid], waited)
        os.sched_yield()

    # -- under the lock -----------------------------------------------------------------
    def _path(self, root: int, va: int) -> list[tuple[int, int]]:
        """(table, word of the entry) from the root down, as far as entries are present."""
        q, tb, n = self.q, self.tbase, self.ntables
        path, t = [], root
        for shift in (39, 30, 21):
            w = tb + (t << 9) + ((va >> shift) & 511)
            path.append((t, w))
            e = q[w]
            if not e & PRESENT:
                return path
            child = (e >> PFN_SHIFT) & PFN_MASK
            if child >= n:
                raise CorruptEntry(va, (shift - 3) // 9, t, e, n)
            t = child
        path.append((t, tb + (t << 9) + ((va >> 12) & 511)))
        return path

    def lookup(self, root: int, va: int) -> int:
        """The leaf entry of ``va`` (0 if none), for a caller that holds the lock."""
        path = self._path(root, va)
        return self.q[path[-1][1]] if len(path) == LEVELS else 0

    def _check_owner(self, va: int, path: list[tuple[int, int]], owner: int) -> None:
        q, m = self.q, self.mbase + _OWNER
        for t, _ in path:
            if q[m + t * _META_WORDS] != owner:
                raise NotOwner(va, t, owner, q[m + t * _META_WORDS])

    def set_pte(self, root: int, va: int, pte: int, owner: int) -> None:
        """Map ``va`` to leaf entry ``pte`` in ``owner``'s tree at ``root``, making tables."""
        check_va(va)
        path = self._path(root, va)
        self._check_owner(va, path, owner)
        if len(path) == LEVELS:
            old = self.q[path[-1][1]]
            if old & PRESENT:
                if old == pte:
                    return
                raise AlreadyMapped(va, old, pte)
        need = LEVELS - len(path)
        if need and need > self.free_tables():      # a count over the whole pool
            raise PoolExhausted("page-table", self.ntables, f"{need} tables to map {va:#x}",
                                "asi_tables")
        q, tb, nv = self.q, self.tbase, self.mbase + _NVALID
        self._begin()
        try:
            t, w = path[-1]
            for level in range(LEVELS - len(path), 0, -1):
                child = self.alloc_table(level, owner)
                q[w] = make_pte(child, _NONLEAF)
                q[nv + t * _META_WORDS] += 1
                t, w = child, tb + (child << 9) + index(va, level)
            q[w] = pte
            q[nv + t * _META_WORDS] += 1
        finally:
            self._end()

    def clear_pte(self, root: int, va: int, owner: int) -> int:
        """Unmap ``va``; free page tables (PT, PD) left empty. Returns the old entry, or 0."""
        check_va(va)
        path = self._path(root, va)
        if len(path) < LEVELS or not self.q[path[-1][1]] & PRESENT:
            return 0
        self._check_owner(va, path, owner)
        q, nv = self.q, self.mbase + _NVALID
        old = q[path[-1][1]]
        self._begin()
        try:
            q[path[-1][1]] = 0
            q[nv + path[-1][0] * _META_WORDS] -= 1
            for level in (1, 2):       # tables of levels 3 and 4 stay: roots share them
                t = path[LEVELS - level][0]
                if q[nv + t * _META_WORDS]:
                    break
                self.free_table(t)
                parent, w = path[LEVELS - level - 1]
                q[w] = 0
                q[nv + parent * _META_WORDS] -= 1
        finally:
            self._end()
        return old

    def alloc_table(self, level: int, owner: int) -> int:
        free = np.flatnonzero(self.meta["state"] == 0)
        if not free.size:
            raise PoolExhausted("page-table", self.ntables, f"a level-{level} table",
                                "asi_tables")
        t = int(free[0])
        self.tables[t] = 0
        self.meta[t] = (1, owner, level, 0)
        return t

    def link_new(self, table: int, slot: int, pte: int) -> None:
        """Fill ``slot`` of a table that no walker can reach yet (just allocated, not
        published): no seqcount needed. Used to hang the shared global PDPT in new roots."""
        assert self.meta["nvalid"][table] == 0 and not self.tables[table][slot], (table, slot)
        self.tables[table][slot] = pte
        self.meta["nvalid"][table] = 1

    def free_table(self, t: int) -> None:
        if not 0 <= t < self.ntables:
            raise BadInput(f"page table {t}", f"is outside the pool of {self.ntables}")
        if not self.meta["state"][t]:
            raise DoubleFree("page table", t, t * PAGE_SIZE)
        self.meta[t] = (0, 0, 0, 0)
        self.tables[t] = 0

    def free_tree(self, root: int, owner: int) -> int:
        """Free every table reachable from ``root`` that ``owner`` owns; the count freed."""
        self._begin()
        try:
            return self._free_owned(root, owner)
        finally:
            self._end()

    def _free_owned(self, t: int, owner: int) -> int:
        if int(self.meta["owner"][t]) != owner:
            return 0
        n = 0
        if int(self.meta["level"][t]) > 1:
            for e in self.tables[t][self.tables[t] & PRESENT != 0]:
                child = pte_frame(int(e))
                if child < self.ntables:
                    n += self._free_owned(child, owner)
        self.free_table(t)
        return n + 1

    def free_tables(self) -> int:
        return int(np.count_nonzero(self.meta["state"] == 0))

    # -- bulk reads ---------------------------------------------------------------------
    def mappings(self, root: int) -> dict[int, int]:
        """Every mapped page of the tree at ``root``: {virtual address: leaf entry}."""
        out: dict[int, int] = {}
        self._collect(root, LEVELS, 0, out)
        return out

    def _collect(self, t: int, level: int, prefix: int, out: dict[int, int]) -> None:
        table = self.tables[t]
        for i in np.flatnonzero(table & PRESENT):
            e = int(table[i])
            va = prefix | int(i) << (PFN_SHIFT + 9 * (level - 1))
            if level == 1:
                out[va | _SIGN if va >> 47 else va] = e
                continue
            child = pte_frame(e)
            if child >= self.ntables:
                raise CorruptEntry(va, level, t, e, self.ntables)
            self._collect(child, level - 1, va, out)
