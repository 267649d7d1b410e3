"""Create, attach, validate and unlink the shared region and its semaphores.

Parent owns, children attach: only the creator unlinks (segment and every semaphore it
made). Names are ``/asirt-<creator pid>-<8 hex digits>`` and ``<segment>-<tag>`` so that a
later run can find and reclaim what a dead creator left behind (posix_ipc has no resource
tracker).

Liveness never depends on a pid, which may be reused or belong to another PID namespace
sharing /dev/shm: the creator holds a shared ``flock`` on its segment for the region's whole
life (workers, which only attach, take none). The kernel drops it when the creator dies,
however it dies, so whoever can take the lock exclusively knows the creator is gone; the
pid in the name is for people only. A semaphore lives and dies with its segment.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
import struct
import time
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import posix_ipc

from shm_layout.errors import AsirtError, LayoutMismatch, NotOurs, SegmentMissing, ShmUnavailable
from shm_layout.header import (HEADER_DTYPE, LAYOUT_VERSION, MAGIC, MAX_SECTIONS, STATE_WORD,
                               RegionState)
from shm_layout.sections import ALIGN, Section, dtype_crc, section_dtype

PREFIX = "/asirt-"
DEV_SHM = "/dev/shm"
# The files Region.create and Region.semaphore make in /dev/shm (glibc's sem_open prefixes
# "sem."), matched whole: "asirt-1-cafe.txt" or a run directory is never taken for one.
SEGMENT_RE = re.compile(r"asirt-(\d+)-[0-9a-f]{8}", re.ASCII)
SEMAPHORE_RE = re.compile(r"sem\.(asirt-(\d+)-[0-9a-f]{8})-[A-Za-z0-9_]+", re.ASCII)
_TAG_RE = re.compile(r"[A-Za-z0-9_]+", re.ASCII)
# A name posix_ipc can take: one leading slash and no other, printable ASCII (it crashes on a
# NUL), short enough for glibc's "sem." and a tag within NAME_MAX.
_IPC_NAME_RE = re.compile(r"/[\x21-\x2e\x30-\x7e]{1,200}", re.ASCII)
_CREATE_TRIES = 3
#: A segment without a header, or a semaphore without a segment, younger than this may be
#: being made or removed by an asirt of another layout, which takes no lock: only an older
#: one is surely abandoned. Making or removing them takes microseconds.
_GRACE_S = 60.0


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
                 owner: bool, lock: posix_ipc.SharedMemory | None = None) -> None:
        self.name = name
        self.owner = owner
        self._mmap = mapping
        self._lock = lock      # the creator's open segment: its flock says "alive"
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
        name, shm = _create_segment(prefix, total)
        try:
            mapping = mmap.mmap(shm.fd, total)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise
        region = cls(name, mapping, planned, owner=True, lock=shm)
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
        if not _TAG_RE.fullmatch(tag):     # what reclaim recognises (SEMAPHORE_RE)
            raise ValueError(f"semaphore tag {tag!r}: use letters, digits and _ only")
        sem_name = f"{self.name}-{tag}"
        if self.owner:
            try:
                sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=0o600,
                                          initial_value=initial)
            except OSError as err:       # its file in /dev/shm: full, or read-only
                raise _shm_error(err, f"semaphore {sem_name}") from err
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
        if self._lock is not None:     # from now on reclaim takes the segment for stale
            self._lock.close_fd()
            self._lock = None

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


#: the bytes of a region's segment file that its locks take (ByteLock): core k's lock takes
#: byte k (asirt.sync.corelock), the page-table lock this one (asirt.mm.pagetable)
PTLOCK_BYTE = 1 << 40
_FLOCK = "hhqqi4x"          # struct flock on Linux x86-64 / arm64: type, whence, start, len, pid


class ByteLock:
    """An exclusive lock on one byte of a region's segment file: an *open file description*
    lock (``fcntl(F_OFD_SETLK)``, Linux >= 3.15), which the kernel drops when the descriptor
    is closed -- process death included, so no SIGKILL can leave it held. It belongs to the
    descriptor, not the process: two ByteLocks in one process exclude each other as two
    processes do. It does not interact with the ``flock`` the region's creator holds on the
    same file. Non-blocking: callers poll :meth:`try_acquire` (answering what they must
    meanwhile)."""

    def __init__(self, region: Region, byte: int) -> None:
        path = os.path.join(DEV_SHM, region.name.lstrip("/"))
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._take = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        self._drop = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, byte, 1, 0)

    def try_acquire(self) -> bool:
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, self._take)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, self._drop)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)          # drops the lock if held
            self.fd = -1


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


def _create_segment(prefix: str, size: int) -> tuple[str, posix_ipc.SharedMemory]:
    """A new segment of ``size`` bytes, its memory allocated, this process's lock on it."""
    for _ in range(_CREATE_TRIES):
        name = f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:
            continue                     # 32 random bits collided: another name
        except OSError as err:           # read-only, not writable, ...: may exist half-made
            with contextlib.suppress(posix_ipc.Error, OSError):
                posix_ipc.unlink_shared_memory(name)
            raise _shm_error(err, f"a {_mib(size)} region") from err
        try:
            # Waits only while a reclaimer holds the lock: one that found the segment before
            # we locked it took it for stale and unlinked it (st_nlink 0): take another name.
            fcntl.flock(shm.fd, fcntl.LOCK_SH)
            if os.fstat(shm.fd).st_nlink == 0:
                shm.close_fd()
                continue
            # Real pages now: a full /dev/shm is refused here, not a SIGBUS at first touch.
            os.posix_fallocate(shm.fd, 0, size)
        except BaseException as err:
            shm.close_fd()
            _unlink_quietly(posix_ipc.unlink_shared_memory, name)
            if isinstance(err, OSError):
                raise _shm_error(err, f"a {_mib(size)} region") from err
            raise
        return name, shm
    raise AsirtError(f"could not create a shared-memory segment in {_CREATE_TRIES} tries "
                     f"(names taken, or reclaimed as they were made); run again")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _shm_error(err: OSError, what: str) -> ShmUnavailable:
    """Why /dev/shm cannot hold ``what`` (a region, a semaphore), and what to do about it."""
    if err.errno in (errno.ENOSPC, errno.ENOMEM):
        try:
            vfs = os.statvfs(DEV_SHM)
            room = (f" (size {_mib(vfs.f_blocks * vfs.f_frsize)}, "
                    f"{_mib(vfs.f_bavail * vfs.f_frsize)} free)")
        except OSError:
            room = ""
        return ShmUnavailable(DEV_SHM, f"has no room for {what}{room}",
                              f"free it ('asirt cleanup'; see 'ls -la {DEV_SHM}') or, as root, "
                              f"make it larger: mount -o remount,size=2G {DEV_SHM}")
    if err.errno == errno.EROFS:
        return ShmUnavailable(DEV_SHM, "is mounted read-only",
                              f"as root, remount it writable: mount -o remount,rw {DEV_SHM}")
    return ShmUnavailable(DEV_SHM, f"refused {what} ({err.strerror or err})",
                          "it must be a tmpfs this user can create files in (mode drwxrwxrwt, "
                          "like /tmp)")


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
class Status(enum.Enum):
    ACTIVE = "active"       # its creator holds the lock: a run is using it
    STALE = "stale"         # nobody holds the lock: its creator is gone; reclaim unlinks it
    UNJUDGED = "unjudged"   # ours, but not a region of this layout (another asirt version, which
                            # takes no lock, or not a region at all): only 'cleanup --all'
    SKIPPED = "skipped"     # not ours to touch: not a regular file, another user's, unreadable


class Leftover(NamedTuple):
    path: str             # the file under /dev/shm
    ipc_name: str         # its POSIX name ("/asirt-...")
    kind: str             # "segment" or "semaphore"
    creator_pid: int      # from the name: for people, never for liveness
    status: Status
    why: str = ""         # what the status rests on, in words
    removed: bool = False  # reclaim unlinked it

    @property
    def alive(self) -> bool:
        """False only when its creator is known to be gone."""
        return self.status is not Status.STALE


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a device"


def check_owned(st: os.stat_result) -> None:
    """NotOurs unless ``st`` (an lstat or fstat) is a regular file of this user."""
    if not stat.S_ISREG(st.st_mode):
        raise NotOurs(f"{_file_kind(st.st_mode)}, not a file asirt makes; remove it by hand "
                      f"if it is yours")
    if st.st_uid != os.getuid():
        raise NotOurs(f"owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")


@contextlib.contextmanager
def creator_lock(path: str) -> Iterator[int | None]:
    """Try to take the creator's lock on ``path`` exclusively, without waiting.

    Yields the open descriptor, locked, when nobody holds the lock (its creator is gone; until
    the block ends no creator can start on it either), None while a creator holds it. The
    file is opened never through a link (O_NOFOLLOW) nor waiting on a FIFO (O_NONBLOCK), and
    must be a regular file of this user (NotOurs says why not).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotOurs("a symbolic link, not a file asirt makes; remove it by hand if it "
                          "is yours") from err
        raise
    try:
        check_owned(os.fstat(fd))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
        else:
            yield fd
    finally:
        os.close(fd)      # and with it the lock


def _header_says(fd: int) -> tuple[Status, str]:
    """What a segment nobody holds is, from its header (and its age, if it has none)."""
    data = os.pread(fd, HEADER_DTYPE.itemsize, 0)
    if not any(data):
        if _young(os.fstat(fd)):
            return Status.UNJUDGED, ("has no header yet: being made by an asirt that takes no "
                                     "lock, or its creator has just died")
        return Status.STALE, "its creator died while making it (no header)"
    if len(data) < HEADER_DTYPE.itemsize:
        return Status.UNJUDGED, "too short for a region header: not a region asirt made"
    h = np.frombuffer(data, HEADER_DTYPE)[0]
    if int(h["magic"]) != MAGIC:
        return Status.UNJUDGED, "does not start with asirt's magic: not a region asirt made"
    if int(h["version"]) != LAYOUT_VERSION:
        return Status.UNJUDGED, (f"made by another asirt version (layout {int(h['version'])}, "
                                 f"this one {LAYOUT_VERSION}), whose runs may take no lock, so "
                                 "this one cannot tell whether it is in use")
    return Status.STALE, "its creator is gone (nobody holds its lock)"


Remove = Callable[[Status], bool]


def _young(st: os.stat_result) -> bool:
    return time.time() - st.st_ctime < _GRACE_S


def _unlink(lo: Leftover, examined: os.stat_result) -> Leftover:
    """Unlink ``lo.path`` if it is still the file that was examined."""
    try:
        now = os.lstat(lo.path)
        if (now.st_dev, now.st_ino) != (examined.st_dev, examined.st_ino):
            return lo._replace(status=Status.SKIPPED, why="replaced while it was examined")
        os.unlink(lo.path)
    except FileNotFoundError:
        pass                    # gone meanwhile, as wanted
    except OSError as err:
        return lo._replace(why=f"{lo.why}; cannot unlink it ({err.strerror or err})")
    return lo._replace(removed=True)


def _examine(lo: Leftover, judge: Callable[[], Leftover]) -> Leftover | None:
    """``judge()``, or what stopped it: None if the file vanished meanwhile, else ``lo``
    saying why it was left alone."""
    try:
        return judge()
    except FileNotFoundError:
        return None
    except NotOurs as err:
        return lo._replace(why=err.why)
    except OSError as err:
        return lo._replace(why=f"cannot be examined ({err.strerror or err})")


def _segment(dev_shm: str, entry: str, pid: int, remove: Remove) -> Leftover | None:
    """Judge (and unlink, if ``remove`` says so) one segment; None if it vanished."""
    path = os.path.join(dev_shm, entry)
    lo = Leftover(path, "/" + entry, "segment", pid, Status.SKIPPED)

    def judge() -> Leftover:
        with creator_lock(path) as fd:
            if fd is None:
                return lo._replace(status=Status.ACTIVE, why="in use (its creator holds its lock)")
            status, why = _header_says(fd)
            judged = lo._replace(status=status, why=why)
            return _unlink(judged, os.fstat(fd)) if remove(status) else judged   # still locked
    return _examine(lo, judge)


def _semaphore(dev_shm: str, entry: str, segment: str, pid: int,
               remove: Remove) -> Leftover | None:
    """Judge (and unlink) one semaphore: it is what its segment is, stale when that is gone."""
    path = os.path.join(dev_shm, entry)
    lo = Leftover(path, "/" + entry[len("sem."):], "semaphore", pid, Status.SKIPPED)

    def judge() -> Leftover:
        st = os.lstat(path)
        check_owned(st)
        seg = _segment(dev_shm, segment, pid, lambda status: False)
        if seg is None and _young(st):
            judged = lo._replace(status=Status.UNJUDGED, why=f"its segment /{segment} is gone, "
                                 "just now: it may be being removed by an asirt that takes no lock")
        elif seg is None or seg.status is Status.STALE:
            judged = lo._replace(status=Status.STALE, why=f"its segment /{segment} is "
                                 + ("gone" if seg is None else "stale"))
        else:
            judged = lo._replace(status=seg.status, why=f"its segment /{segment}: {seg.why}")
        return _unlink(judged, st) if remove(judged.status) else judged
    return _examine(lo, judge)


def _scan(dev_shm: str, remove: Remove) -> list[Leftover]:
    try:
        entries = sorted(os.listdir(dev_shm))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise ShmUnavailable(dev_shm, f"cannot be listed ({err.strerror or err})",
                             "it must be a directory this user can read") from err
    # Semaphores first, as Region.unlink does: each is judged by its segment, still there.
    out: list[Leftover | None] = []
    for entry in entries:
        if m := SEMAPHORE_RE.fullmatch(entry):
            out.append(_semaphore(dev_shm, entry, m.group(1), int(m.group(2)), remove))
    for entry in entries:
        if m := SEGMENT_RE.fullmatch(entry):
            out.append(_segment(dev_shm, entry, int(m.group(1)), remove))
    return [lo for lo in out if lo is not None]


def list_leftovers(dev_shm: str = DEV_SHM) -> list[Leftover]:
    """Every file under an asirt segment or semaphore name, each with its status and why."""
    return _scan(dev_shm, lambda status: False)


def reclaim(dev_shm: str = DEV_SHM, *, unjudged: bool = False) -> list[Leftover]:
    """Unlink the stale segments and semaphores (and the unjudged ones too, with ``unjudged``:
    only when no asirt run of any version is active). Returns every entry looked at, each
    saying whether it was ``removed`` and, if not, why; an entry that cannot be examined or
    unlinked is left with its reason, never raised."""
    return _scan(dev_shm, lambda status: status is Status.STALE
                 or (unjudged and status is Status.UNJUDGED))


class ActiveRun(NamedTuple):
    segment: str                # its POSIX name
    creator_pid: int            # from the name: for people
    cpus: tuple[int, ...]       # the CPUs of its slots


def _slot_cpus(lo: Leftover) -> tuple[int, ...] | None:
    """The CPUs in a segment's ``slots``, mapped read-only and validated; None if it does not
    validate (another version, or a run between states)."""
    try:
        fd = os.open(lo.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        mapping, planned = _map_validated(lo.ipc_name, fd, writable=False)
    except (AsirtError, OSError, ValueError):
        return None
    finally:
        os.close(fd)
    try:
        slots = [p for p in planned if p.name == "slots"]
        if not slots:
            return ()
        view = np.ndarray((slots[0].count,), slots[0].dtype, buffer=mapping,
                          offset=slots[0].offset)
        cpus = tuple(sorted({int(c) for c in view["cpu"]}))
        del view
        return cpus
    finally:
        mapping.close()


def active_runs(dev_shm: str = DEV_SHM) -> list[ActiveRun]:
    """The asirt runs of this user that are active now (their creator holds the lock), with
    the CPUs they use. Call it before making a region of your own, or yours is listed too.
    Best effort: a run between two entries has no region at that moment."""
    out = []
    for lo in list_leftovers(dev_shm):
        if lo.kind == "segment" and lo.status is Status.ACTIVE:
            cpus = _slot_cpus(lo)
            if cpus is not None:
                out.append(ActiveRun(lo.ipc_name, lo.creator_pid, cpus))
    return out
