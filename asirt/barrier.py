"""The VM-entry barrier: what a CPU establishes about its siblings before it enters GUEST(d).

The condition (model/stun.pml, B1-B4), for every sibling that is not fenced off:

  B1  no active stun request (its generation is even);
  B2  not in HOST;
  B3  no other domain (its domain is 0 -- idle -- or d);
  and the core buffer holds nothing d may not see (under ``noflush`` this is not checked).

Two implementations, both measuring the time from the first check to the VM entry
(``barrier_wait``: until the store of GUEST, without the transition-time assertion that
follows it, whose cost is counted apart):

- :class:`SpinBarrier` -- spin with bail-out: check; when a sibling blocks entry, bail out to
  the safe point (ack and park for any pending request) and wait, spinning then yielding,
  for *that sibling's* state to change (its mode seqlock or its generation), then re-check
  everything. Nothing is written, so there is nothing to undo.
- :class:`RendezvousBarrier` -- Xen-style (core scheduling with ``sched-gran=core``): the
  siblings meet on a lock-protected core record (``stun_core``, lock = the POSIX semaphore
  ``stuncore<k>``). Each arriving CPU sets its bit in ``rv_arrived``; the one that completes
  the set of present siblings (not IDLE, not fenced) opens the round (``rv_epoch += 1``) and
  all of them enter together, after the same B1-B4 check. A waiter with a pending stun
  request leaves the round (clears its bit under the lock) and handles it first, so a
  rendezvous never blocks the handshake; every wait has the handshake's timeouts.

``check`` is the shared condition; ``run_barrier`` picks an implementation by name.
"""
from __future__ import annotations

import enum
import os
from typing import Callable

import posix_ipc

from asirt.clock import now
from asirt.stun import HOST, IDLE, Phase, StunCpu, Wait, liveness
from shm_layout import Region
from shm_layout.region import sem_wait
from shm_layout.header import STOP_WORD
from shm_layout.stun import COUNTER, EventKind, Source

__all__ = ["BARRIERS", "Result", "check", "SpinBarrier", "RendezvousBarrier", "CoreLock",
           "make_barrier", "init_core"]

BARRIERS = ("spin", "rendezvous")


class Result(enum.IntEnum):
    OK = 0        # the CPU is now in GUEST
    BUSY = 1      # a sibling has an active request or is in HOST
    DOMAIN = 2    # a sibling runs another domain: switch domain (via HOST) or wait
    STOP = 3      # the run is stopping
    TIMEOUT = 4   # the caller's bound on waiting passed


C_TRIES, C_BUSY, C_DOM, C_DIRTY, C_ENTRY_FLUSHES = (
    COUNTER[k] for k in ("barrier_tries", "barrier_busy", "barrier_dom", "barrier_dirty",
                         "entry_flushes"))


def check(cpu: StunCpu) -> tuple[Result, int]:
    """B1-B3 per sibling, then the buffer (flushing it when dirty). (result, blocking lane)."""
    w, d, dl = cpu.w, cpu.dom, cpu.dl
    c = cpu.cnt
    w[c + C_TRIES] += 1
    for j in cpu.live_sibs:
        if w[cpu.s_gen[j]] & 1:                                   # B1
            w[c + C_BUSY] += 1
            return Result.BUSY, j
        if dl:
            dl()
        if w[cpu.s_mode[j]] == HOST:                              # B2
            w[c + C_BUSY] += 1
            return Result.BUSY, j
        if dl:
            dl()
        e = w[cpu.s_dom[j]]                                       # B3
        if e != 0 and e != d:
            w[c + C_DOM] += 1
            return Result.DOMAIN, j
        if dl:
            dl()
    if cpu.flush_on and cpu.buffer_dirty(d) is not None:
        # Never happens under the strict protocol (the requester flushed before releasing):
        # counted, then made safe by a flush of our own.
        w[c + C_DIRTY] += 1
        cpu.flush()
        w[c + C_ENTRY_FLUSHES] += 1
        if cpu.buffer_dirty(d) is not None:
            return Result.BUSY, cpu.lane
    return Result.OK, -1


class SpinBarrier:
    """Spin with bail-out, re-checking after the blocking sibling's last state change."""

    name = "spin"

    def __init__(self, cpu: StunCpu, rec: Callable[[int], None] | None = None) -> None:
        self.cpu = cpu
        self.rec = rec

    def enter(self, max_wait_ns: int | None = None) -> Result:
        """Wait until the barrier holds, then enter GUEST. The CPU must be in ASI(d), d != 0."""
        cpu, rec = self.cpu, self.rec
        t0 = now()
        deadline = None if max_wait_ns is None else t0 + max_wait_ns
        while True:
            cpu.safe_point()
            r = gate(cpu, t0, deadline, rec)
            if r is not None:
                return r


def gate(cpu: StunCpu, t0: int, deadline: int | None,
         rec: Callable[[int], None] | None) -> Result | None:
    """The end of both barriers: B1-B3 and the buffer, then B4 (OK, the wait since ``t0``
    recorded), DOMAIN, STOP or TIMEOUT; None: not yet, go round again (after waiting for the
    lane that blocked, answering requests meanwhile)."""
    r, j = check(cpu) if cpu.barrier_on else (Result.OK, -1)
    if r == Result.OK:
        if cpu.dl:
            cpu.dl()
        t = cpu.enter_guest()
        if rec is not None:
            rec(t - t0)
        return r
    if r == Result.DOMAIN:
        return r
    if j == cpu.lane:      # our flush did not leave the buffer clean: try again, within bounds
        if cpu.w[STOP_WORD]:
            return Result.STOP
        if deadline is not None and now() > deadline:
            return Result.TIMEOUT
        return None
    return wait_change(cpu, j, deadline, Phase.BARRIER)


def wait_change(cpu: StunCpu, j: int, deadline: int | None, phase: Phase) -> Result | None:
    """Spin (then yield) until lane j's mode seqlock or generation changes, or a request is
    pending (returns None: re-check); STOP/TIMEOUT when the run stops or the deadline passes."""
    w = cpu.w
    im, ig = cpu.s_mseq[j], cpu.s_gen[j]
    m0, g0 = w[im], w[ig]
    n, start, state, limit = 0, 0, [0], cpu.limit
    while w[im] == m0 and w[ig] == g0:
        if cpu.pending():
            return None
        n += 1
        if n >= limit:
            if not start:
                start = now()
            if deadline is not None and now() > deadline:
                return Result.TIMEOUT
            r = cpu.tick(start, j, phase, state)
            if r == Wait.STOP:
                return Result.STOP
            if r == Wait.FENCED:
                return None
    return None


# -- the Xen-style rendezvous ---------------------------------------------------------------

def init_core(region: Region, core: int, nlanes: int) -> None:
    """Parent, before workers start: core ``core``'s record, its lock (value 1) and the
    lock's break token (value 1, see :class:`CoreLock`)."""
    region.semaphore(f"stuncore{core}", initial=1)
    region.semaphore(f"stunbreak{core}", initial=1)
    region.array("stun_core")[core]["nlanes"] = nlanes


#: how long a lock waiter blocks in the kernel before it answers stun requests again
LOCK_POLL_S = 0.001


class CoreLock:
    """Core ``k``'s lock: a POSIX semaphore, with the holder's pid in ``stun_core.lock_pid`` so
    a waiter that times out can tell a dead holder from a slow one.

    A waiter blocks on the semaphore ``LOCK_POLL_S`` at a time and acks pending stun requests
    between waits (the lock is taken only in ASI or IDLE, where acking is the R2 wait's H1:
    the VM-entry barrier re-checks every generation before GUEST), so a requester never waits
    on a sibling that waits on the lock. Past the ack timeout it checks the holder's liveness.

    A dead holder's lock is *taken over*, not released: the semaphore stays taken and the
    waiter writes its own pid into ``lock_pid``. Only one waiter may do so -- with three lanes
    or more, two waiters can see the same dead holder -- so the take-over runs under a second
    semaphore, ``stunbreak<k>``: under it the waiter re-reads ``lock_pid`` and takes over only
    if it still names the dead holder (the semaphore operations are full fences, so the next
    waiter under it reads the new pid and keeps waiting).

    Two windows stay open, both a SIGKILL between two Python statements: a holder that dies
    after acquiring the semaphore but before writing ``lock_pid`` (or after clearing it but
    before releasing) leaves ``lock_pid`` 0, which names no one to check, and a waiter that
    dies holding ``stunbreak<k>`` blocks later take-overs. Either leaves the lock held for the
    rest of the run: its waiters keep answering stun requests and end when the run stops.
    A *stopped* holder is not broken here (it may resume inside its critical section); a
    sibling's stun handshake kills and fences it (STONITH), after which it is dead.
    """

    def __init__(self, cpu: StunCpu, core: int) -> None:
        self.cpu = cpu
        region = cpu.region
        self.sem = region.semaphore(f"stuncore{core}")
        self.brk = region.semaphore(f"stunbreak{core}")
        self.i_pid = region.word_index("stun_core", core, "lock_pid")
        self.pid = os.getpid()

    def acquire(self) -> bool:
        """False when the run is stopping."""
        cpu, w = self.cpu, self.cpu.w
        sem = self.sem
        try:
            sem.acquire(0)
        except posix_ipc.BusyError:
            start = now()
            ack_pending = cpu.ack_pending
            while True:
                ack_pending()
                try:
                    sem_wait(sem, LOCK_POLL_S)
                    break
                except posix_ipc.BusyError:
                    pass
                if w[STOP_WORD]:
                    return False
                if now() - start < cpu.cfg.ack_timeout_ns:
                    continue
                holder = w[self.i_pid]
                if holder and liveness(holder) == "dead" and self._take_over(holder):
                    cpu.ring.emit(EventKind.TIMEOUT, Source.LIVENESS, -1, Phase.LOCK,
                                  now() - start, holder)
                    break
                start = now()
        w[self.i_pid] = self.pid
        return True

    def _take_over(self, dead: int) -> bool:
        """Become the holder of a lock whose holder ``dead`` died inside its critical section,
        unless another waiter already did (see the class docstring)."""
        try:
            sem_wait(self.brk, LOCK_POLL_S)
        except posix_ipc.BusyError:
            return False              # another waiter is taking over: wait for the lock
        try:
            if self.cpu.w[self.i_pid] != dead:
                return False
            self.cpu.w[self.i_pid] = self.pid
            return True
        finally:
            self.brk.release()

    def release(self) -> None:
        self.cpu.w[self.i_pid] = 0
        self.sem.release()


class RendezvousBarrier:
    """Xen-style rendezvous on the core record, then the B1-B4 check (module docstring)."""

    name = "rendezvous"

    def __init__(self, cpu: StunCpu, core: int, rec: Callable[[int], None] | None = None) -> None:
        self.cpu = cpu
        self.rec = rec
        self.lock = CoreLock(cpu, core)
        wi = cpu.region.word_index
        self.i_epoch = wi("stun_core", core, "rv_epoch")
        self.i_arrived = wi("stun_core", core, "rv_arrived")
        self.i_dom = wi("stun_core", core, "rv_dom")
        self.i_rounds = wi("stun_core", core, "rv_rounds")
        self.bit = 1 << cpu.lane

    def _needed(self) -> int:
        """Lanes that must arrive: neither fenced off nor idle (an idle CPU runs no vCPU)."""
        cpu, w = self.cpu, self.cpu.w
        mask = self.bit
        for j in cpu.live_sibs:
            if w[cpu.s_mode[j]] != IDLE:
                mask |= 1 << j
        return mask

    def _try_complete(self) -> bool:
        """Under the lock: open the round if everyone needed is here."""
        w = self.cpu.w
        arrived = w[self.i_arrived]
        needed = self._needed()
        if arrived & needed == needed:
            w[self.i_arrived] = 0
            w[self.i_rounds] += 1
            w[self.i_epoch] += 1
            return True
        return False

    def _leave(self, epoch: int) -> None:
        w = self.cpu.w
        if not self.lock.acquire():
            return
        if w[self.i_epoch] == epoch:
            w[self.i_arrived] &= ~self.bit
        self.lock.release()

    def enter(self, max_wait_ns: int | None = None) -> Result:
        cpu = self.cpu
        w, dl = cpu.w, cpu.dl
        t0 = now()
        deadline = None if max_wait_ns is None else t0 + max_wait_ns
        while True:
            cpu.safe_point()
            if not self.lock.acquire():
                return Result.STOP
            arrived = w[self.i_arrived]
            if arrived & ~self.bit == 0:
                w[self.i_dom] = cpu.dom
            elif w[self.i_dom] != cpu.dom:
                self.lock.release()
                w[cpu.cnt + COUNTER["barrier_dom"]] += 1
                return Result.DOMAIN
            w[self.i_arrived] = arrived | self.bit
            epoch = w[self.i_epoch]
            opened = self._try_complete()
            self.lock.release()
            if dl:
                dl()
            if not opened:
                r = self._wait_round(epoch, deadline)
                if r is not None:
                    self._leave(epoch)
                    if r == Result.BUSY:
                        continue          # a request is pending: handle it, then a new round
                    return r
            w[cpu.cnt + COUNTER["rv_rounds"]] += 1
            # The round is open: every present sibling arrived. Re-check what safety needs.
            r = gate(cpu, t0, deadline, self.rec)
            if r is not None:
                return r

    def _wait_round(self, epoch: int, deadline: int | None) -> Result | None:
        """Wait for the round to open (None). BUSY: a request is pending; STOP; TIMEOUT."""
        cpu = self.cpu
        w = cpu.w
        ie = self.i_epoch
        seqs = [cpu.s_mseq[j] for j in cpu.live_sibs]
        last = [w[i] for i in seqs]
        n, start, state, limit = 0, 0, [0], cpu.limit
        while w[ie] == epoch:
            if cpu.pending():
                return Result.BUSY
            n += 1
            if n >= limit:
                if not start:
                    start = now()
                if deadline is not None and now() > deadline:
                    return Result.TIMEOUT
                seen = [w[i] for i in seqs]
                if seen != last:       # a sibling changed mode (went idle?): re-evaluate
                    last = seen
                    if not self.lock.acquire():
                        return Result.STOP
                    opened = w[ie] == epoch and self._try_complete()
                    self.lock.release()
                    if opened:
                        return None
                missing = self._missing()
                r = cpu.tick(start, missing, Phase.RENDEZVOUS, state)
                if r == Wait.STOP:
                    return Result.STOP
                if r == Wait.FENCED:
                    seqs = [cpu.s_mseq[j] for j in cpu.live_sibs]
                    last = []
        return None

    def _missing(self) -> int:
        """A lane the round waits for (for the liveness check), -1 if none."""
        w = self.cpu.w
        arrived = w[self.i_arrived]
        for j in self.cpu.live_sibs:
            if not arrived >> j & 1:
                return j
        return -1


def make_barrier(name: str, cpu: StunCpu, core: int,
                 rec: Callable[[int], None] | None = None) -> SpinBarrier | RendezvousBarrier:
    if name == "spin":
        return SpinBarrier(cpu, rec)
    if name == "rendezvous":
        return RendezvousBarrier(cpu, core, rec)
    raise ValueError(f"barrier {name!r}; choose from {', '.join(BARRIERS)}")

