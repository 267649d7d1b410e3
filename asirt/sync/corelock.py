"""Each core's lock: guards its shared record (``core_sync``: the rendezvous round, the core
scheduling state), released by the kernel when its holder dies.

The lock on core ``k`` is an *open file description* lock (``fcntl(F_OFD_SETLK)``, Linux >=
3.15) on byte ``k`` of the region's segment file under /dev/shm. The kernel drops it when the
holder's descriptor is closed, which process death does: no SIGKILL window can leave it held
(a semaphore-based lock with the holder's pid beside it had two: a holder killed between
taking the semaphore and publishing its pid, and a waiter killed while breaking a dead
holder's lock). Unlike a POSIX record lock it belongs to the descriptor, not the process, so
two handles in one process exclude each other as two processes do (the in-process tests), and
it does not interact with the ``flock`` the region's creator holds on the same file.

A waiter polls the lock without blocking in the kernel, answering at its CPU's safe point
between tries (the lock is taken only in ASI or IDLE, so acking a stun request there is the R2
wait's H1: the VM-entry barrier re-checks every generation before GUEST), so a requester never
waits on a sibling that waits on the lock. Past the ack timeout it checks the holder (named by
``lock_pid``): a dead holder's lock is free already; one that stays stopped is killed (the
handshake's STONITH policy) and its lock falls free with it. A caller's deadline is honoured.
One lock object per CPU: every user on that CPU (rendezvous, core scheduling) shares it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from asirt.clock import now
from asirt.cpu import Cpu
from asirt.cpu.wait import Outcome
from asirt.proc import Life, Proc
from shm_layout.cpu import Phase
from shm_layout.region import DEV_SHM

__all__ = ["CoreLock"]

_FLOCK = "hhqqi4x"          # struct flock on Linux x86-64 / arm64: type, whence, start, len, pid


def _lockreq(kind: int, core: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, core, 1, 0)


class CoreLock:
    """Core ``core``'s lock, as CPU ``cpu`` takes it (module docstring)."""

    def __init__(self, cpu: Cpu, core: int | None = None) -> None:
        self.cpu = cpu
        self.core = cpu.core if core is None else core
        region = cpu.region
        path = os.path.join(DEV_SHM, region.name.lstrip("/"))
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        self.i_pid = region.word_index("core_sync", self.core, "lock_pid")
        self.i_seq = region.word_index("core_sync", self.core, "lock_seq")
        self.pid = os.getpid()
        self._take = _lockreq(fcntl.F_WRLCK, self.core)
        self._drop = _lockreq(fcntl.F_UNLCK, self.core)
        self.held = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)          # drops the lock if held
            self.fd = -1

    def try_acquire(self) -> bool:
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, self._take)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        w = self.cpu.w
        w[self.i_pid] = self.pid
        w[self.i_seq] += 1
        self.held = True
        return True

    def acquire(self, deadline: int | None = None) -> Outcome:
        """DONE when held; STOP when the run stops, DEADLINE when ``deadline`` (ns) passes."""
        if self.try_acquire():
            return Outcome.DONE
        cpu = self.cpu
        wait = cpu.waiter.begin(-1, Phase.LOCK, deadline)
        sp = cpu.safepoint
        timeout = int(cpu.params.ack_timeout_ms * 1e6)
        check_at = now() + timeout
        stopped = 0
        try:
            while not self.try_acquire():
                sp()
                r = wait.slow()                      # yields: a holder holds for microseconds
                if r != Outcome.GO_ON:
                    return r
                t = now()
                if t >= check_at:
                    check_at = t + timeout
                    stopped = self._check_holder(stopped)
            return Outcome.DONE
        finally:
            wait.done()

    def _check_holder(self, seen_stopped: int) -> int:
        """Past a timeout: kill a holder that stays stopped (its lock falls free with it).
        Returns the pid seen stopped this time (0: none)."""
        pid = self.cpu.w[self.i_pid]
        if pid <= 0 or pid == self.pid:
            return 0
        proc = Proc(pid)
        try:
            life = proc.life()
            if life is Life.STOPPED:
                if seen_stopped == pid and self.cpu.params.stonith:
                    proc.kill()
                    proc.wait_dead(1.0)
                    return 0
                return pid
            return 0
        finally:
            proc.close()

    def release(self) -> None:
        self.cpu.w[self.i_pid] = 0
        self.held = False
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, self._drop)

    def __enter__(self) -> "CoreLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
