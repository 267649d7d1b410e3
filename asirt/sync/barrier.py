"""The VM-entry barrier: what a CPU establishes about its siblings before it enters GUEST(d).

The condition (model/stun.pml, B1-B4), for every sibling that is not fenced off:

  B1  no active stun request (its generation is even);
  B2  not in HOST (defensive; the model shows the protocol is safe without it);
  B3  no other domain (its domain is 0 -- idle -- or d);
(a mode or domain that is none at all is garbage in the sibling's words: the lane is fenced
off as corrupt, asirt.cpu.guard, or the entry waits;)
then, if this CPU's own taints say the buffer may hold what d must not see, a flush (KVM's
conditional L1D flush at VM entry: asirt.cpu.state.State.needs_flush); then B4: mode := GUEST.
The barrier never looks at the core buffer: that is the S3 checker's evidence.

Two implementations, both measuring the time from the first check to the VM entry
(``barrier_wait``: until the store of GUEST, without the transition-time assertion that
follows it, whose cost is counted apart):

- :class:`SpinBarrier` -- spin with bail-out: check; when a sibling blocks entry, bail out to
  the safe point and wait, spinning then yielding, for *that sibling's* state to change (its
  mode seqlock or its generation), then re-check everything. Nothing is written, so there is
  nothing to undo.
- :class:`RendezvousBarrier` -- Xen-style (core scheduling with ``sched-gran=core``): the
  siblings meet on the core's lock-protected record (``core_sync``). Each arriving CPU sets
  its bit in ``rv_arrived``; the one that completes the set of present siblings (not IDLE,
  not fenced) opens the round (``rv_epoch += 1``) and all of them enter together, after the
  same B1-B4. A waiter with a pending stun request leaves the round and handles it first, so
  a rendezvous never blocks the handshake; every wait has the handshake's timeouts.
"""
from __future__ import annotations

import enum
from typing import Callable

from asirt.clock import now
from asirt.cpu import HOST, IDLE, STUNNED
from asirt.cpu.wait import Outcome
from asirt.sync.corelock import CoreLock
from asirt.sync.stun import Stun
from shm_layout.counters import COUNTER
from shm_layout.cpu import MAX_DOMAINS, Phase, Word

__all__ = ["BARRIERS", "Result", "check", "SpinBarrier", "RendezvousBarrier", "make_barrier"]

BARRIERS = ("spin", "rendezvous")
Recorder = Callable[[int], None]


class Result(enum.IntEnum):
    OK = 0        # the CPU is now in GUEST
    BUSY = 1      # a sibling has an active request or is in HOST
    DOMAIN = 2    # a sibling runs another domain: switch domain (via HOST) or wait
    STOP = 3      # the run is stopping
    TIMEOUT = 4   # the caller's bound on waiting passed


_C = {k: COUNTER[f"barrier.{k}"] for k in ("tries", "busy", "dom", "flushes", "rv_rounds")}


def check(stun: Stun, flush_always: bool = False) -> tuple[Result, int]:
    """B1-B3 per live sibling, then the flush this CPU's taints ask for (``flush_always``:
    a flush at every entry, tainted or not: KVM's ``vmentry_l1d_flush=always``).
    (result, lane)."""
    cpu = stun.cpu
    w, dl, c = cpu.w, cpu.dl, cpu.cnt
    d = cpu.state.dom
    w[c + _C["tries"]] += 1
    for j in cpu.live:
        if w[stun.s_gen[j]] & 1:                                  # B1
            w[c + _C["busy"]] += 1
            return Result.BUSY, j
        if dl:
            dl()
        m = w[cpu.s_mode[j]]
        if m == HOST or m > STUNNED or m < 0:                     # B2 (or no mode at all)
            if m != HOST and cpu.corrupt(j, Word.MODE, m):
                continue                                          # fenced off: no sibling
            w[c + _C["busy"]] += 1
            return Result.BUSY, j
        if dl:
            dl()
        e = w[cpu.s_dom[j]]                                       # B3
        if e != 0 and e != d:
            if not 0 < e <= MAX_DOMAINS:                          # (no domain at all)
                if cpu.corrupt(j, Word.DOMAIN, e):
                    continue
                w[c + _C["busy"]] += 1
                return Result.BUSY, j
            w[c + _C["dom"]] += 1
            return Result.DOMAIN, j
        if dl:
            dl()
    if stun.proto.flushes and (flush_always or cpu.state.needs_flush(d)):
        cpu.state.flush(c + _C["flushes"])
    return Result.OK, -1


def gate(stun: Stun, t0: int, deadline: int | None, rec: Recorder | None,
         flush_always: bool = False) -> Result | None:
    """The end of both barriers: B1-B3 and the flush, then B4 (OK, the wait since ``t0``
    recorded), DOMAIN, STOP or TIMEOUT; None: not yet, go round again (after waiting for the
    lane that blocked, answering requests meanwhile)."""
    r, j = check(stun, flush_always) if stun.proto.barrier else (Result.OK, -1)
    if r == Result.OK:
        if stun.cpu.dl:
            stun.cpu.dl()
        t = stun.cpu.state.enter_guest()
        if rec is not None:
            rec(t - t0)
        return r
    if r == Result.DOMAIN:
        return r
    return wait_change(stun, j, deadline, Phase.BARRIER)


def wait_change(stun: Stun, j: int, deadline: int | None, phase: Phase) -> Result | None:
    """Spin (then yield) until lane j's mode seqlock or generation changes, or a request is
    pending (None: re-check); STOP/TIMEOUT when the run stops or the deadline passes."""
    cpu = stun.cpu
    w = cpu.w
    im, ig = cpu.s_mseq[j], stun.s_gen[j]
    m0, g0 = w[im], w[ig]
    n, limit = 0, cpu.waiter.limit
    wait = None
    try:
        while w[im] == m0 and w[ig] == g0:
            if stun.pending():
                return None
            n += 1
            if n >= limit:
                if wait is None:
                    wait = cpu.waiter.begin(j, phase, deadline)
                cpu.safepoint()
                r = wait.slow()
                if r == Outcome.STOP:
                    return Result.STOP
                if r == Outcome.DEADLINE:
                    return Result.TIMEOUT
                if r == Outcome.FENCED:
                    return None
        return None
    finally:
        if wait is not None:
            wait.done()


class SpinBarrier:
    """Spin with bail-out, re-checking after the blocking sibling's last state change."""

    name = "spin"

    def __init__(self, stun: Stun, rec: Recorder | None = None) -> None:
        self.stun, self.rec = stun, rec
        self.flush_always = False       # flush at every entry (check), not only when tainted

    def enter(self, max_wait_ns: int | None = None) -> Result:
        """Wait until the barrier holds, then enter GUEST. The CPU must be in ASI(d), d != 0."""
        stun, rec = self.stun, self.rec
        sp = stun.cpu.safepoint
        t0 = now()
        deadline = None if max_wait_ns is None else t0 + max_wait_ns
        while True:
            sp()
            r = gate(stun, t0, deadline, rec, self.flush_always)
            if r is not None:
                return r


class RendezvousBarrier:
    """Xen-style rendezvous on the core record, then B1-B4 (module docstring)."""

    name = "rendezvous"

    def __init__(self, stun: Stun, lock: CoreLock, rec: Recorder | None = None) -> None:
        self.stun, self.lock, self.rec = stun, lock, rec
        cpu = stun.cpu
        wi = cpu.region.word_index
        self.i_epoch = wi("core_sync", cpu.core, "rv_epoch")
        self.i_arrived = wi("core_sync", cpu.core, "rv_arrived")
        self.i_rv_dom = wi("core_sync", cpu.core, "rv_dom")
        self.i_rounds = wi("core_sync", cpu.core, "rv_rounds")
        self.bit = 1 << cpu.lane

    def _needed(self) -> int:
        """Lanes that must arrive: neither fenced off nor idle (an idle CPU runs no vCPU)."""
        cpu = self.stun.cpu
        w = cpu.w
        mask = self.bit
        for j in cpu.live:
            if w[cpu.s_mode[j]] != IDLE:
                mask |= 1 << j
        return mask

    def _try_complete(self) -> bool:
        """Under the lock: open the round if everyone needed is here."""
        w = self.stun.w
        needed = self._needed()
        if w[self.i_arrived] & needed == needed:
            w[self.i_arrived] = 0
            w[self.i_rounds] += 1
            w[self.i_epoch] += 1
            return True
        return False

    def _locked(self, deadline: int | None) -> Result | None:
        r = self.lock.acquire(deadline)
        if r == Outcome.DONE:
            return None
        return Result.STOP if r == Outcome.STOP else Result.TIMEOUT

    def _leave(self, epoch: int) -> None:
        w = self.stun.w
        if self._locked(None) is not None:
            return
        if w[self.i_epoch] == epoch:
            w[self.i_arrived] &= ~self.bit
        self.lock.release()

    def enter(self, max_wait_ns: int | None = None) -> Result:
        stun = self.stun
        cpu = stun.cpu
        w, dl = cpu.w, cpu.dl
        t0 = now()
        deadline = None if max_wait_ns is None else t0 + max_wait_ns
        while True:
            cpu.safepoint()
            r = self._locked(deadline)
            if r is not None:
                return r
            arrived = w[self.i_arrived]
            if arrived & ~self.bit == 0:
                w[self.i_rv_dom] = cpu.state.dom
            elif w[self.i_rv_dom] != cpu.state.dom:
                self.lock.release()
                w[cpu.cnt + _C["dom"]] += 1
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
            w[cpu.cnt + _C["rv_rounds"]] += 1
            # The round is open: every present sibling arrived. Re-check what safety needs.
            r = gate(stun, t0, deadline, self.rec)
            if r is not None:
                return r

    def _wait_round(self, epoch: int, deadline: int | None) -> Result | None:
        """Wait for the round to open (None). BUSY: a request is pending; STOP; TIMEOUT."""
        stun = self.stun
        cpu = stun.cpu
        w = cpu.w
        ie = self.i_epoch
        seqs = [cpu.s_mseq[j] for j in cpu.live]
        last = [w[i] for i in seqs]
        n, limit = 0, cpu.waiter.limit
        wait = None
        try:
            while w[ie] == epoch:
                if stun.pending():
                    return Result.BUSY
                n += 1
                if n < limit:
                    continue
                if wait is None:
                    wait = cpu.waiter.begin(self._missing(), Phase.RENDEZVOUS, deadline)
                seen = [w[i] for i in seqs]
                if seen != last:       # a sibling changed mode (went idle?): re-evaluate
                    last = seen
                    r = self._locked(deadline)
                    if r is not None:
                        return r
                    opened = w[ie] == epoch and self._try_complete()
                    self.lock.release()
                    if opened:
                        return None
                wait.lane = self._missing()
                cpu.safepoint()
                r = wait.slow()
                if r == Outcome.STOP:
                    return Result.STOP
                if r == Outcome.DEADLINE:
                    return Result.TIMEOUT
                if r == Outcome.FENCED:
                    seqs = [cpu.s_mseq[j] for j in cpu.live]
                    last = []
            return None
        finally:
            if wait is not None:
                wait.done()

    def _missing(self) -> int:
        """A lane the round waits for (for the liveness check), -1 if none."""
        cpu = self.stun.cpu
        arrived = cpu.w[self.i_arrived]
        for j in cpu.live:
            if not arrived >> j & 1:
                return j
        return -1


def make_barrier(name: str, stun: Stun, lock: CoreLock | None = None,
                 rec: Recorder | None = None) -> SpinBarrier | RendezvousBarrier:
    if name == "spin":
        return SpinBarrier(stun, rec)
    if name == "rendezvous":
        return RendezvousBarrier(stun, lock if lock is not None else CoreLock(stun.cpu), rec)
    raise ValueError(f"barrier {name!r}; choose from {', '.join(BARRIERS)}")
