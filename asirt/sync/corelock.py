"""Each core's lock: guards its shared record (``core_sync``: the rendezvous round, the core
scheduling state), released by the kernel when its holder dies.

The lock on core ``k`` is a :class:`shm_layout.region.ByteLock` on byte ``k`` of the region's
segment file under /dev/shm: an open file description lock, which the kernel drops when its
holder dies, so no SIGKILL window can leave it held (a semaphore-based lock with the holder's
pid beside it had two: a holder killed between taking the semaphore and publishing its pid,
and a waiter killed while breaking a dead holder's lock).

A waiter polls the lock without blocking in the kernel, answering at its CPU's safe point
between tries (the lock is taken only in ASI or IDLE, so acking a stun request there is the R2
wait's H1: the VM-entry barrier re-checks every generation before GUEST), so a requester never
waits on a sibling that waits on the lock. Past the ack timeout it checks the holder (named by
``lock_pid``): a dead holder's lock is free already; one that stays stopped is killed (the
handshake's STONITH policy) and its lock falls free with it. A caller's deadline is honoured.
One lock object per CPU: every user on that CPU (rendezvous, core scheduling) shares it.
"""
from __future__ import annotations

import os

from asirt.clock import now
from asirt.cpu import Cpu
from asirt.cpu.wait import Outcome
from asirt.proc import kill_if_stopped_again
from shm_layout.cpu import Phase
from shm_layout.region import ByteLock

__all__ = ["CoreLock"]


class CoreLock:
    """Core ``core``'s lock, as CPU ``cpu`` takes it (module docstring)."""

    def __init__(self, cpu: Cpu, core: int | None = None) -> None:
        self.cpu = cpu
        self.core = cpu.core if core is None else core
        region = cpu.region
        self.lock = ByteLock(region, self.core)
        self.i_pid = region.word_index("core_sync", self.core, "lock_pid")
        self.i_seq = region.word_index("core_sync", self.core, "lock_seq")
        self.pid = os.getpid()
        self.held = False

    def close(self) -> None:
        self.lock.close()              # drops the lock if held

    def try_acquire(self) -> bool:
        if not self.lock.try_acquire():
            return False
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
        """Past a timeout: kill a holder that stays stopped (its lock falls free with it)."""
        return kill_if_stopped_again(self.cpu.w[self.i_pid], seen_stopped,
                                     self.cpu.params.stonith)

    def release(self) -> None:
        self.cpu.w[self.i_pid] = 0
        self.held = False
        self.lock.release()

    def __enter__(self) -> "CoreLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
