"""The one reader of another process's state: dead, stopped, traced or alive.

A :class:`Proc` holds a pidfd (``pidfd_open``, Linux >= 5.3) taken while the process is known to
be the one meant (a sibling, once the start barrier has published every pid). From then on a
recycled pid cannot make a dead sibling look alive: the pidfd becomes readable when *its*
process exits, whatever later reuses the number. Where the kernel has no pidfd (ENOSYS), or
the process is already gone at open, it falls back to the pid (Method #2 below) and says so.

State, in order of the checks:
  1. dead    -- the pidfd polls readable (exited; a zombie counts: it runs nothing), or, without
               a pidfd, ``kill(pid, 0)`` fails with ESRCH or /proc shows Z/X;
  2. stopped -- /proc/PID/stat state T (SIGSTOP, Ctrl-Z);
  3. traced  -- state t (stopped by a debugger: ptrace). Never killed by a fencer: whoever
               attached a debugger wants it kept;
  4. alive   -- anything else (running, sleeping, disk wait).
``/proc/PID/stat`` is ``pid (comm) state ...``; comm may hold spaces and parentheses, so the
state is the first field after the *last* ')' (proc(5)).

Imports nothing of asirt.
"""
from __future__ import annotations

import ctypes
import enum
import os
import select
import signal
import time

__all__ = ["Life", "Proc", "stat_state", "pid_alive", "tgkill", "kill_if_stopped_again"]

# tgkill(2) has a glibc wrapper since 2.30; Python 3.11's os module has none.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.tgkill.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_libc.tgkill.restype = ctypes.c_int


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to thread ``tid`` of process ``pid`` (a thread-directed signal: no other
    thread of the process can take it). ProcessLookupError when the thread is gone."""
    if _libc.tgkill(pid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise ProcessLookupError(err, f"tgkill({pid}, {tid}, {sig}): {os.strerror(err)}")


def _readable(fd: int, timeout_s: float) -> bool:
    """Whether a pidfd polls readable (its process exited) within ``timeout_s``. poll, not
    select: select cannot take a descriptor numbered 1024 or more."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(max(0, int(timeout_s * 1000))))


class Life(enum.Enum):
    DEAD = "dead"
    STOPPED = "stopped"
    TRACED = "traced"
    ALIVE = "alive"


def _state_of(data: bytes) -> str | None:
    try:
        return data.rsplit(b")", 1)[1].split()[0].decode()
    except IndexError:      # a process exiting while read: treat it as gone
        return None


def stat_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc/PID/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return _state_of(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


def _life_from_stat(state: str | None) -> Life:
    if state is None or state in ("Z", "X", "x"):
        return Life.DEAD
    if state == "T":
        return Life.STOPPED
    if state == "t":
        return Life.TRACED
    return Life.ALIVE


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (by number: Method #2 only)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: it exists
        pass
    return _life_from_stat(stat_state(pid)) is not Life.DEAD


class Proc:
    """One process, followed by pidfd where the kernel has one (module docstring)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        self._stat_fd: int | None = None
        self._dead = pid <= 0
        if self._dead:
            return
        try:                                   # Method #1: a pidfd (Linux >= 5.3)
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._dead = True
        except OSError:                        # ENOSYS, EPERM in some sandboxes: Method #2
            self.fd = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._stat_fd is not None:
            os.close(self._stat_fd)
            self._stat_fd = None

    def state(self) -> str | None:
        """Its one-letter /proc state, re-read through one open descriptor (about 2 us: cheap
        enough to poll); None once it is gone."""
        if self._stat_fd is None:
            try:
                self._stat_fd = os.open(f"/proc/{self.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                return None
        try:
            return _state_of(os.pread(self._stat_fd, 512, 0))
        except ProcessLookupError:        # ESRCH: it exited since the open
            return None

    def __del__(self) -> None:
        self.close()

    def dead(self) -> bool:
        """The cheap test (one poll of the pidfd): has it exited?"""
        if self._dead:
            return True
        if self.fd is not None:
            self._dead = _readable(self.fd, 0)
        else:
            self._dead = not pid_alive(self.pid)
        return self._dead

    def life(self) -> Life:
        if self.dead():
            return Life.DEAD
        life = _life_from_stat(self.state())
        if life is Life.DEAD and self.fd is not None:
            return Life.ALIVE if not self.dead() else Life.DEAD   # /proc raced the exit
        return life

    def kill(self) -> None:
        """SIGKILL it (through the pidfd where there is one: never a recycled pid)."""
        if self._dead:
            return
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            self._dead = True

    def wait_dead(self, timeout_s: float) -> bool:
        """Block until it has exited (True) or ``timeout_s`` passed (False)."""
        if self.dead():
            return True
        if self.fd is not None:
            self._dead = _readable(self.fd, timeout_s)
            return self._dead
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.dead():
                return True
            time.sleep(0.001)
        return False


def kill_if_stopped_again(pid: int, seen_stopped: int, stonith: bool = True) -> int:
    """A lock holder ``pid`` that a waiter checks once per timeout: killed (and waited for, up
    to a second) when it is stopped now and was stopped at the last check too
    (``seen_stopped == pid``) -- the handshake's stop-the-holder policy; a lock the kernel
    drops with its holder then falls free. Returns the pid seen stopped this time (0:
    none), to pass in at the next check."""
    if pid <= 0 or pid == os.getpid():
        return 0
    proc = Proc(pid)
    try:
        if proc.life() is not Life.STOPPED:
            return 0
        if seen_stopped == pid and stonith:
            proc.kill()
            proc.wait_dead(1.0)
            return 0
        return pid
    finally:
        proc.close()
