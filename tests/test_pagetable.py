"""Page tables in the pool: map/unmap/walk, table reuse, pool limits, corrupt entries."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asirt.errors import AsirtError, BadInput
from asirt.mm import pagetable
from asirt.mm.memclass import DoubleFree, PoolExhausted
from asirt.mm.pagetable import (NX, PRESENT, AlreadyMapped, CorruptEntry, LockTimeout, NotOwner,
                                PageTables, check_va, index, make_pte, pte_frame)
from shm_layout.asi import GLOBAL_OWNER
from shm_layout.header import STOP_WORD
from shm_layout.region import PTLOCK_BYTE, ByteLock
from tests.fixtures import cpu_region

VA = 0xFFFF_8880_0012_3000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def pt(aregion):
    p = PageTables(aregion)
    try:
        yield p
    finally:
        p.close()


def _root(pt: PageTables, owner: int = 1) -> int:
    with pt:
        return pt.alloc_table(4, owner)


def test_map_walk_unmap(pt):
    root = _root(pt)
    used = pt.ntables - pt.free_tables()
    with pt:
        pt.set_pte(root, VA, make_pte(7), 1)
    assert pte_frame(pt.walk(root, VA)) == 7
    assert pt.walk(root, VA) & NX and pt.walk(root, VA) & PRESENT
    assert pt.walk(root, VA + 4096) == 0
    assert pt.ntables - pt.free_tables() == used + 3      # PDPT, PD, PT made on the way
    assert pt.mappings(root) == {VA: make_pte(7)}
    with pt:
        assert pte_frame(pt.clear_pte(root, VA, 1)) == 7
        assert pt.clear_pte(root, VA, 1) == 0
    assert pt.walk(root, VA) == 0
    assert pt.ntables - pt.free_tables() == used + 1      # empty PT and PD freed, PDPT kept
    assert pt.q[pt.seq] % 2 == 0


def test_index_and_canonical_addresses():
    assert index(VA, 4) == 273 and index(VA, 1) == 0x123
    for bad in (0x0000_8000_0000_0000, VA + 1, -4096, 1 << 64):
        with pytest.raises(BadInput, match="canonical"):
            check_va(bad)
    assert check_va(0x7FFF_FFFF_F000) == 0x7FFF_FFFF_F000


def test_remap_same_is_noop_and_different_is_refused(pt):
    root = _root(pt)
    with pt:
        pt.set_pte(root, VA, make_pte(3), 1)
        pt.set_pte(root, VA, make_pte(3), 1)
        with pytest.raises(AlreadyMapped, match="already mapped to frame 3"):
            pt.set_pte(root, VA, make_pte(4), 1)
    assert pte_frame(pt.walk(root, VA)) == 3


def test_table_pool_exhaustion_changes_nothing(pt):
    root = _root(pt)
    with pt:
        while pt.free_tables() > 2:
            pt.alloc_table(1, 1)
        seq = pt.q[pt.seq]
        with pytest.raises(PoolExhausted, match=r"page-table pool is exhausted.*asi_tables"):
            pt.set_pte(root, VA, make_pte(1), 1)
        assert pt.q[pt.seq] == seq and pt.free_tables() == 2
    assert pt.mappings(root) == {}


def test_double_free_of_a_table(pt):
    root = _root(pt)
    with pt:
        pt.free_table(root)
        with pytest.raises(DoubleFree, match=f"double free of page table {root}"):
            pt.free_table(root)


def test_a_tree_cannot_write_tables_it_shares(pt):
    with pt:
        shared = pt.alloc_table(3, GLOBAL_OWNER)
        root = pt.alloc_table(4, 1)
        pt.tables[root][273] = make_pte(shared)
        with pytest.raises(NotOwner, match="shared global tables"):
            pt.set_pte(root, VA, make_pte(1), 1)
    assert pt.tables[shared].sum() == 0


def test_free_tree_frees_only_own_tables(pt):
    with pt:
        shared = pt.alloc_table(3, GLOBAL_OWNER)
        root = pt.alloc_table(4, 2)
        pt.tables[root][273] = make_pte(shared)
        pt.set_pte(root, 0xFFFF_8900_0000_1000, make_pte(5), 2)
        free = pt.free_tables()
        assert pt.free_tree(root, 2) == 4
        assert pt.free_tables() == free + 4 and pt.meta["state"][shared] == 1


def test_a_walk_inside_its_own_change_does_not_take_it_for_a_dead_writers(pt):
    """The OFD lock never refuses the description that holds it: a walk by the holder itself,
    on its own odd seqcount, must leave the change alone (it would end it half-way)."""
    with pt:
        pt._begin()                                  # mid-change, the lock held
        pt._seq_wait(65)
        pt._seq_start -= 1.0                         # long past SEQ_RECOVER_S
        pt._seq_wait(66)
        assert pt.q[pt.seq] & 1                      # still the holder's change
        pt._end()
    assert pt.q[pt.seq] % 2 == 0


def test_lock_is_exclusive_and_released_on_error(pt, aregion):
    with pytest.raises(RuntimeError):
        with pt:
            pt._begin()
            raise RuntimeError
    assert pt.q[pt.seq] % 2 == 0 and pt.q[pt.lock_pid] == 0
    other = ByteLock(aregion, PTLOCK_BYTE)
    try:
        with pt:
            assert pt.q[pt.lock_pid] == os.getpid()
            assert not other.try_acquire()
        assert other.try_acquire()
        other.release()
    finally:
        other.close()


def test_a_stuck_lock_holder_is_named_not_waited_for(aregion, monkeypatch):
    monkeypatch.setattr(pagetable, "LOCK_TIMEOUT_S", 0.1)
    calls = []
    holder, waiter = PageTables(aregion), PageTables(aregion, service=lambda: calls.append(1))
    try:
        with holder:
            with pytest.raises(LockTimeout, match=f"holder pid {os.getpid()}"):
                with waiter:
                    pass
        assert calls                      # it answered shootdowns while it waited
        with waiter:
            pass
    finally:
        holder.close()
        waiter.close()


def test_walk_waits_out_a_writer(pt, aregion):
    """A walk that starts while the seqcount is odd retries until the writer, who holds the
    lock, finishes: it never takes the change for a dead writer's."""
    root = _root(pt)
    with pt:
        pt.set_pte(root, VA, make_pte(9), 1)
    writer = ByteLock(aregion, PTLOCK_BYTE)
    assert writer.try_acquire()
    pt.q[pt.seq] += 1                       # a writer is mid-change

    def finish() -> None:
        pt.q[pt.seq] += 1
        writer.release()
    timer = threading.Timer(0.05, finish)
    timer.start()
    try:
        t0 = time.monotonic()
        assert pte_frame(pt.walk(root, VA)) == 9
        assert time.monotonic() - t0 >= 0.04
    finally:
        timer.join()
        writer.close()
    assert pt.q[pt.seq] % 2 == 0


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_corrupt_entry_is_caught_at_every_level(pt, level):
    root = _root(pt)
    with pt:
        pt.set_pte(root, VA, make_pte(2), 1)
    t = root
    for lvl in (4, 3, 2, 1):
        w = pt.tbase + t * 512 + index(VA, lvl)
        if lvl == level:
            limit = pt.nframes if lvl == 1 else pt.ntables
            pt.q[w] = make_pte(limit + 5)
            break
        t = pte_frame(pt.q[w])
    with pytest.raises(CorruptEntry, match=f"level-{level} table .* outside the pool") as err:
        pt.walk(root, VA)
    assert isinstance(err.value, AsirtError) and err.value.address == VA
    if level > 1:
        with pytest.raises(CorruptEntry):
            pt.mappings(root)


@settings(max_examples=60, deadline=None)
@given(junk=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 2**64 - 1)), max_size=8),
       probes=st.lists(st.integers(0, 2**36 - 1), min_size=1, max_size=16))
def test_walk_never_leaves_the_pool(junk, probes):
    """Random garbage in every table of a tree: a walk returns a valid frame, 0, or raises
    CorruptEntry; it never indexes outside the pool (the memoryview would raise IndexError)."""
    with cpu_region(asi=True, tables=8, frames=8) as region:
        pt = PageTables(region)
        try:
            root = _root(pt)
            with pt:
                pt.set_pte(root, VA, make_pte(1), 1)
            tables = [t for t in range(pt.ntables) if pt.meta["state"][t]]
            for n, (i, value) in enumerate(junk):
                pt.tables[tables[n % len(tables)]][i] = value
            for p in probes:
                va = 0xFFFF_0000_0000_0000 | p << 12 if p >> 35 else p << 12
                try:
                    e = pt.walk(root, va)
                except CorruptEntry:
                    continue
                assert e == 0 or pte_frame(e) < pt.nframes
        finally:
            pt.close()


_WRITER = r"""
import sys, time
from shm_layout import Region
from shm_layout.header import STOP_WORD
from asirt.mm.pagetable import PageTables
r = Region.attach(sys.argv[1])
pt = PageTables(r)
root, vas, ptes = int(sys.argv[2]), eval(sys.argv[3]), eval(sys.argv[4])
ready = r.word_index("slots", 1, "progress")
end = time.monotonic() + 50
n = 0
try:
    while not r.words[STOP_WORD] and time.monotonic() < end:
        va = vas[n % len(vas)]
        with pt:
            pt.set_pte(root, va, ptes[n % len(vas)], 1)
        with pt:
            pt.clear_pte(root, va, 1)
        n += 1
        r.words[ready] = n
finally:
    pt.close()
    r.close()
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_walks_race_unmaps_that_free_and_reuse_tables():
    """Another process maps and unmaps pages far apart, so each unmap frees a PD and a PT
    that the next map reuses elsewhere; walks running meanwhile see the right entry or none,
    never another page's entry, never an error. The walks go on for at least half a second
    and until they have seen both outcomes over 100 writer cycles (a loaded machine may
    schedule the writer rarely), up to 20 s."""
    vas = [VA, VA + (1 << 30), VA + (7 << 30) + (5 << 21)]
    ptes = [make_pte(i + 1) for i in range(len(vas))]
    with cpu_region(asi=True, tables=16) as region:
        pt = PageTables(region)
        proc = None
        try:
            root = _root(pt)
            proc = subprocess.Popen([sys.executable, "-c", _WRITER, region.name, str(root),
                                     repr(vas), repr(ptes)], cwd=ROOT, stdin=subprocess.DEVNULL)
            ready = region.word_index("slots", 1, "progress")
            end = time.monotonic() + 30
            while region.words[ready] < 10:
                assert proc.poll() is None, "the writer died"
                assert time.monotonic() < end, "the writer did not start in 30 s"
                time.sleep(0.001)
            seen, writes = set(), region.words[ready]
            t0 = time.monotonic()
            min_end, end = t0 + 0.5, t0 + 20
            n = 0
            while True:
                i = n % len(vas)
                e = pt.walk(root, vas[i])
                assert e in (0, ptes[i]), (hex(vas[i]), hex(e))
                seen.add(e == ptes[i])
                n += 1
                if n % 64 == 0:
                    t = time.monotonic()
                    done = seen == {False, True} and region.words[ready] > writes + 100
                    if (done and t >= min_end) or t >= end:
                        break
            assert seen == {False, True}, f"{n} walks saw only mapped={seen}"
            assert region.words[ready] > writes + 100, \
                f"{region.words[ready] - writes} writer cycles in 20 s"
        finally:
            region.words[STOP_WORD] = 1
            if proc is not None:
                try:
                    proc.wait(20)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            pt.close()


class _Interleave:
    """A view that runs ``action`` just before the walk's ``at``-th read, then reads on:
    a deterministic stand-in for a writer running between two loads of a walk."""

    def __init__(self, q: memoryview, at: int, action) -> None:
        self.q, self.at, self.action, self.reads = q, at, action, 0

    def __getitem__(self, i: int) -> int:
        self.reads += 1
        if self.reads == self.at:
            self.action()
        return self.q[i]


def test_a_walk_retries_when_its_table_is_freed_and_reused_mid_walk(aregion):
    """The walk has read the PD entry of A when a writer unmaps A (freeing its PT and PD)
    and maps B, which reuses those tables: the leaf slot it reads next now holds B's entry.
    The seqcount makes it retry and report A unmapped; without it, it would return B's."""
    writer, walker = PageTables(aregion), PageTables(aregion)
    try:
        root = _root(writer)
        a, b = VA, VA + (1 << 30)                # same PML4 and PT index, other PDPT entry
        with writer:
            writer.set_pte(root, a, make_pte(1), 1)
        pt_of_a = writer._path(root, a)[-1][0]

        def unmap_a_map_b() -> None:
            with writer:
                writer.clear_pte(root, a, 1)
                writer.set_pte(root, b, make_pte(2), 1)
            assert writer._path(root, b)[-1][0] == pt_of_a    # B's PT is A's old one

        raw = walker.q
        walker.q = _Interleave(raw, 5, unmap_a_map_b)         # seq, L4, L3, L2, then: leaf
        assert walker.walk(root, a) == 0
        assert walker.q.reads > 6                             # it went round again
        walker.q = raw
        assert pte_frame(walker.walk(root, b)) == 2
    finally:
        writer.close()
        walker.close()


_HOLDER = r"""
import sys, time
from shm_layout import Region
from asirt.mm.pagetable import PageTables
r = Region.attach(sys.argv[1])
pt = PageTables(r)
pt.__enter__()
if sys.argv[2] == "mid-change":
    pt._begin()                               # the seqcount is odd
r.words[r.word_index("slots", 1, "progress")] = 1
time.sleep(60)
"""


@contextlib.contextmanager
def _lock_holder(region, how: str):
    """Another process that holds the page-table lock (``how``: "mid-change" leaves the
    seqcount odd too), until the test kills or stops it; killed on the way out."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, region.name, how], cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    try:
        ready = region.word_index("slots", 1, "progress")
        end = time.monotonic() + 30
        while not region.words[ready]:
            assert proc.poll() is None and time.monotonic() < end, "the holder did not start"
            time.sleep(0.001)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_writer_killed_in_a_change_holds_neither_the_lock_nor_the_walks():
    """A CPU killed while it maps or unmaps (stress --faults kill, or a sibling's STONITH of a
    stopped one) held a semaphore for good: every later map failed with LockTimeout after
    LOCK_TIMEOUT_S, every walk after SEQ_TIMEOUT_S on the odd seqcount. The kernel drops the
    lock with its holder now, and the odd seqcount is closed by the next holder or by a walk
    that finds the lock free."""
    with cpu_region(asi=True) as region:
        pt = PageTables(region)
        try:
            root = _root(pt)
            with pt:
                pt.set_pte(root, VA, make_pte(9), 1)
            with _lock_holder(region, "mid-change") as proc:
                assert pt.q[pt.seq] & 1 and not pt.lock.try_acquire()
                proc.kill()
                proc.wait()
            assert pte_frame(pt.walk(root, VA)) == 9          # the walk closed the seqcount
            assert pt.q[pt.seq] % 2 == 0
            pt.q[pt.seq] += 1                                 # as if it died in a change again
            with pt:                                          # no LockTimeout
                assert pt.q[pt.seq] % 2 == 0                  # the next holder closed it
        finally:
            pt.close()


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_stopped_lock_holder_is_killed_and_its_lock_falls_free():
    """A CPU stopped inside a map or unmap: the waiters kill it at their second look (the
    handshake's stop-the-holder policy), and the kernel drops its lock, instead of everyone
    failing with LockTimeout after LOCK_TIMEOUT_S."""
    with cpu_region(asi=True) as region:
        pt = PageTables(region)
        try:
            with _lock_holder(region, "held") as proc:
                os.kill(proc.pid, signal.SIGSTOP)
                with pt:
                    assert pt.q[pt.lock_pid] == os.getpid()
                assert proc.wait(5) == -signal.SIGKILL
        finally:
            pt.close()
