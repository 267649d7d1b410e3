"""Create, attach, validate and unlink the shared region and its semaphores.

Parent owns, children attach: only the creator unlinks (segment and every semaphore it
made). Names are ``/asirt-<creator pid>-<random>`` so that a later run can find and reclaim
what a dead creator left behind (posix_ipc has no resource tracker).
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import time
from typing import Iterable, NamedTuple

import numpy as np
import posix_ipc

from shm_layout.errors import AsirtError, LayoutMismatch, SegmentMissing
from shm_layout.header import (HEADER_DTYPE, LAYOUT_VERSION, MAGIC, MAX_SECTIONS, STATE_WORD,
                               RegionState)
from shm_layout.sections import ALIGN, Section, dtype_crc, section_dtype

PREFIX = "/asirt-"
DEV_SHM = "/dev/shm"
_LEFTOVER_RE = re.compile(r"^(sem\.)?asirt-(\d+)-[0-9a-f]+")
# A name posix_ipc can take: one leading slash and no other, printable ASCII (it crashes on a
# NUL), short enough for glibc's "sem." and a tag within NAME_MAX.
_IPC_NAME_RE = re.compile(r"/[\x21-\x2e\x30-\x7e]{1,200}", re.ASCII)


class PlannedSection(NamedTuple):
    name: str
    offset: int
    count: int
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def _round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def plan(sections: Iterable[Section]) -> tuple[list[PlannedSection], int]:
    """Offsets of each section after the header, and the total size: the one place they're computed."""
    out: list[PlannedSection] = []
    offset = HEADER_DTYPE.itemsize
    for sec in sections:
        dtype = section_dtype(sec.name)
        if dtype is None:
            raise ValueError(f"unknown section {sec.name!r}")
        if sec.count < 0:
            raise ValueError(f"section {sec.name!r}: negative count {sec.count}")
        out.append(PlannedSection(sec.name, offset, sec.count, dtype))
        offset = _round_up(offset + sec.count * dtype.itemsize)
    if len(out) > MAX_SECTIONS:
        raise ValueError(f"{len(out)} sections; the header holds at most {MAX_SECTIONS}")
    if len({s.name for s in out}) != len(out):
        raise ValueError("a section name appears twice")
    return out, max(offset, HEADER_DTYPE.itemsize)


class Region:
    """A mapped asirt region. Use :meth:`create` (the orchestrator) or :meth:`attach` (workers)."""

    def __init__(self, name: str, mapping: mmap.mmap, sections: list[PlannedSection],
                 owner: bool) -> None:
        self.name = name
        self.owner = owner
        self._mmap = mapping
        self._sections = {s.name: s for s in sections}
        self._sems: dict[str, posix_ipc.Semaphore] = {}
        self._sem_names: list[str] = []
        self.header = np.ndarray((), HEADER_DTYPE, buffer=mapping, offset=0)
        #: the whole region as int64 words: the hot path's view (see word_index)
        self.words = memoryview(mapping).cast("q")
        self.closed = False

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, sections: Iterable[Section], prefix: str = PREFIX) -> "Region":
        planned, total = plan(sections)
        name = f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=total)
        except posix_ipc.ExistentialError as err:  # pragma: no cover - 32 random bits collided
            raise AsirtError(f"shared-memory segment {name} already exists; run again") from err
        try:
            mapping = mmap.mmap(shm.fd, total)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise
        shm.close_fd()
        region = cls(name, mapping, planned, owner=True)
        try:
            region._write_header(planned, total)
        except BaseException:
            region.close()
            region.unlink()
            raise
        return region

    def _write_header(self, planned: list[PlannedSection], total: int) -> None:
        h = self.header
        h["state"] = RegionState.CREATING
        h["magic"] = MAGIC
        h["version"] = LAYOUT_VERSION
        h["header_size"] = HEADER_DTYPE.itemsize
        h["total_size"] = total
        h["creator_pid"] = os.getpid()
        h["creator_uid"] = os.getuid()
        h["created_ns"] = time.time_ns()
        h["nsections"] = len(planned)
        for i, s in enumerate(planned):
            h["sections"][i] = (s.name.encode(), s.offset, s.nbytes, s.count, s.dtype.itemsize,
                                dtype_crc(s.dtype))
        h["state"] = RegionState.READY

    @classmethod
    def attach(cls, name: str) -> "Region":
        """Map an existing region, refusing anything that is not a live region of this build."""
        if not isinstance(name, str) or not _IPC_NAME_RE.fullmatch(name):
            raise LayoutMismatch(str(name)[:80], "name", "/ then up to 200 printable ASCII "
                                 "characters other than /", str(name)[:80])
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as err:
            raise SegmentMissing(name) from err
        except (posix_ipc.Error, OSError, ValueError) as err:
            # a symbolic link (ELOOP), a directory (posix_ipc's ValueError), no permission
            raise LayoutMismatch(name, "file", "a shared-memory segment it can open",
                                 f"one it cannot ({err})") from err
        try:
            mapping, planned = _map_validated(name, shm.fd, writable=True)
        finally:
            shm.close_fd()
        return cls(name, mapping, planned, owner=False)

    # -- access -------------------------------------------------------------------------
    def section(self, name: str) -> PlannedSection:
        try:
            return self._sections[name]
        except KeyError:
            raise AsirtError(f"region {self.name} has no section {name!r}; "
                             f"it has {sorted(self._sections)}") from None

    def has_section(self, name: str) -> bool:
        return name in self._sections

    def array(self, name: str) -> np.ndarray:
        """A numpy view of a whole section (bulk work; not for hot paths)."""
        s = self.section(name)
        return np.ndarray((s.count,), s.dtype, buffer=self._mmap, offset=s.offset)

    def word_index(self, name: str, item: int, field: str | None = None) -> int:
        """Index into :attr:`words` of an int64 field of one item: offsets come from the dtype."""
        s = self.section(name)
        if not 0 <= item < s.count:
            raise IndexError(f"{name}[{item}] out of range (count {s.count})")
        off = s.offset + item * s.dtype.itemsize
        if field is not None:
            ftype, foff = s.dtype.fields[field][:2]
            assert ftype.base == np.dtype("<i8") and foff % 8 == 0, (name, field)
            off += foff
        return off // 8

    @property
    def state(self) -> RegionState:
        return RegionState(self.words[STATE_WORD])

    def set_state(self, state: RegionState) -> None:
        assert self.owner, "only the creator writes the header"
        self.words[STATE_WORD] = int(state)

    # -- semaphores -----------------------------------------------------------------------
    def semaphore(self, tag: str, initial: int = 0) -> posix_ipc.Semaphore:
        """The region's semaphore ``tag``: created (O_EXCL, 0600) by the owner, opened by others."""
        if tag in self._sems:
            return self._sems[tag]
        sem_name = f"{self.name}-{tag}"
        if self.owner:
            sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=0o600,
                                      initial_value=initial)
            self._sem_names.append(sem_name)
        else:
            try:
                sem = posix_ipc.Semaphore(sem_name)
            except posix_ipc.ExistentialError as err:
                raise SegmentMissing(sem_name) from err
        self._sems[tag] = sem
        return sem

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and close semaphores; safe to call twice. Never unlinks."""
        if self.closed:
            return
        self.closed = True
        for sem in self._sems.values():
            sem.close()
        self._sems.clear()
        del self.header
        try:
            self.words.release()
            self._mmap.close()
        except BufferError:
            # A caller still holds a numpy view; the mapping goes when that view does.
            pass

    def unlink(self) -> None:
        """Remove the segment and every semaphore this process created. Creator only; idempotent."""
        if not self.owner:
            raise AsirtError(f"only the creator (pid {os.getpid()} is not) may unlink {self.name}")
        for sem_name in self._sem_names:
            _unlink_quietly(posix_ipc.unlink_semaphore, sem_name)
        self._sem_names.clear()
        _unlink_quietly(posix_ipc.unlink_shared_memory, self.name)

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()


def sem_wait(sem: posix_ipc.Semaphore, timeout_s: float | None) -> None:
    """``sem.acquire(timeout_s)`` that a signal does not break.

    posix_ipc raises SignalError when a handled signal (the signal transport's SIGUSR1)
    interrupts the wait; this waits again for the time left. BusyError on timeout.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            sem.acquire(timeout_s)
            return
        except posix_ipc.SignalError:
            if deadline is not None:
                timeout_s = max(0.0, deadline - time.monotonic())


def _unlink_quietly(fn, name: str) -> None:
    try:
        fn(name)
    except posix_ipc.ExistentialError:
        pass


def _map_validated(name: str, fd: int, writable: bool) -> tuple[mmap.mmap, list[PlannedSection]]:
    """Map the open segment ``fd`` after checking the file, then validate its header."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise LayoutMismatch(name, "file type", "a regular file", stat.filemode(st.st_mode))
    if st.st_uid != os.getuid():
        raise LayoutMismatch(name, "owner uid", os.getuid(), st.st_uid)
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise LayoutMismatch(name, "mode", "0o600", oct(stat.S_IMODE(st.st_mode)))
    if st.st_size < HEADER_DTYPE.itemsize:
        raise LayoutMismatch(name, "size", f">= {HEADER_DTYPE.itemsize}", st.st_size)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    mapping = mmap.mmap(fd, st.st_size, prot=prot)
    try:
        return mapping, _validate(name, mapping, st.st_size)
    except BaseException:
        mapping.close()
        raise


def _validate(name: str, mapping: mmap.mmap, size: int) -> list[PlannedSection]:
    h = np.ndarray((), HEADER_DTYPE, buffer=mapping, offset=0).copy()
    if int(h["magic"]) != MAGIC:
        raise LayoutMismatch(name, "magic", hex(MAGIC), hex(int(h["magic"])))
    if int(h["version"]) != LAYOUT_VERSION:
        raise LayoutMismatch(name, "layout version", LAYOUT_VERSION, int(h["version"]))
    if int(h["header_size"]) != HEADER_DTYPE.itemsize:
        raise LayoutMismatch(name, "header size", HEADER_DTYPE.itemsize, int(h["header_size"]))
    if int(h["total_size"]) != size:
        raise LayoutMismatch(name, "total size", size, int(h["total_size"]))
    if int(h["creator_uid"]) != os.getuid():
        raise LayoutMismatch(name, "creator uid", os.getuid(), int(h["creator_uid"]))
    state = int(h["state"])
    if state not in (RegionState.READY, RegionState.RUNNING):
        found = RegionState(state).name if state in RegionState._value2member_map_ else state
        raise LayoutMismatch(name, "state", "READY or RUNNING", found)
    n = int(h["nsections"])
    if n > MAX_SECTIONS:
        raise LayoutMismatch(name, "section count", f"<= {MAX_SECTIONS}", n)
    wanted: list[Section] = []
    for entry in h["sections"][:n]:
        sname = bytes(entry["name"]).decode(errors="replace")
        dtype = section_dtype(sname)
        if dtype is None:
            raise LayoutMismatch(name, "section name", "a known section", sname)
        if any(w.name == sname for w in wanted):
            raise LayoutMismatch(name, f"section {sname}", "once in the table", "twice")
        if int(entry["itemsize"]) != dtype.itemsize:
            raise LayoutMismatch(name, f"section {sname} item size", dtype.itemsize,
                                 int(entry["itemsize"]))
        if int(entry["dtype_crc"]) != dtype_crc(dtype):
            raise LayoutMismatch(name, f"section {sname} dtype", hex(dtype_crc(dtype)),
                                 hex(int(entry["dtype_crc"])))
        wanted.append(Section(sname, int(entry["count"])))
    planned, total = plan(wanted)
    for entry, p in zip(h["sections"][:n], planned):
        if (int(entry["offset"]), int(entry["nbytes"])) != (p.offset, p.nbytes):
            raise LayoutMismatch(name, f"section {p.name} placement", (p.offset, p.nbytes),
                                 (int(entry["offset"]), int(entry["nbytes"])))
    if total != size:
        raise LayoutMismatch(name, "size implied by the section table", total, size)
    return planned


# -- leftovers ---------------------------------------------------------------------------
class Leftover(NamedTuple):
    path: str        # file under /dev/shm
    ipc_name: str    # the POSIX name ("/asirt-...")
    kind: str        # "segment" or "semaphore"
    creator_pid: int
    alive: bool


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a zombie has finished for good)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in (b"Z", b"X")


def list_leftovers(dev_shm: str = DEV_SHM) -> list[Leftover]:
    """Every asirt segment or semaphore of this user, with whether its creator still runs."""
    out = []
    try:
        entries = os.listdir(dev_shm)
    except FileNotFoundError:
        return out
    for entry in sorted(entries):
        m = _LEFTOVER_RE.match(entry)
        if not m:
            continue
        path = os.path.join(dev_shm, entry)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except FileNotFoundError:
            continue
        is_sem = m.group(1) is not None
        ipc_name = "/" + (entry[len("sem."):] if is_sem else entry)
        pid = int(m.group(2))
        out.append(Leftover(path, ipc_name, "semaphore" if is_sem else "segment", pid,
                            pid_alive(pid)))
    return out


def reclaim(dev_shm: str = DEV_SHM, *, include_alive: bool = False) -> list[Leftover]:
    """Unlink leftovers whose creator is dead (or all of ours, with include_alive)."""
    done = []
    for lo in list_leftovers(dev_shm):
        if lo.alive and not include_alive:
            continue
        fn = posix_ipc.unlink_semaphore if lo.kind == "semaphore" else posix_ipc.unlink_shared_memory
        _unlink_quietly(fn, lo.ipc_name)
        done.append(lo)
    return done
