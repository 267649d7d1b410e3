"""The only writer of a CPU's mode and domain words, its deposit periods and its taints.

Every mode or domain change -- ASI entering or leaving a restricted space, the stun parking a
CPU, a VM entry or exit, core scheduling running a task -- goes through :meth:`State.set` (or
its fast variants below), so the monitor, the S3 check and the transition-time assertions see
every transition:

- the mode and domain are published under a seqlock (``cpu_state.mseq``, odd while they
  change), so a reader can take a consistent (mode, domain) pair;
- a mode *period* deposits into the core buffer for as long as it lasts: HOST deposits host
  data, ASI(d) and GUEST(d) domain d's local data (asirt.cpu.buffer). A period opens before
  the new mode shows and closes after the old one is gone, so the buffer never looks cleaner
  than the CPU's mode says;
- taints are the protocol's own bookkeeping of what a flush must clear (KVM's conditional
  L1D flush, the 2025 ASI proposals' taints): KERNEL once a HOST period ended or a sensitive
  frame was loaded, GUEST for the local data of ``taint_dom``, OTHER once a second domain's
  local data was loaded, and KERNEL too when this CPU fenced a dead sibling (the dead lane's
  last period may still be in the buffer). :meth:`needs_flush` is what a VM entry or
  ``asi_enter`` decides with; a flush clears them. The checkers never read taints: their
  evidence is the buffer itself.
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable

from asirt.clock import now
from shm_layout.counters import COUNTER
from shm_layout.cpu import CLASS_SHIFT, FRAME_BITS, OWNER_MASK, MemClass
from shm_layout.sections import Mode

if TYPE_CHECKING:
    from asirt.cpu.cpu import Cpu

__all__ = ["State", "Taint", "IDLE", "HOST", "ASI", "GUEST", "STUNNED"]

IDLE, HOST, ASI, GUEST, STUNNED = (int(m) for m in Mode)
_SENSITIVE = int(MemClass.SENSITIVE)


class Taint(enum.IntFlag):
    KERNEL = 1
    GUEST = 2
    OTHER = 4


ALL_TAINTS = int(Taint.KERNEL | Taint.GUEST | Taint.OTHER)
_KERNEL, _GUEST, _OTHER = int(Taint.KERNEL), int(Taint.GUEST), int(Taint.OTHER)
C_TRANSITIONS = COUNTER["cpu.transitions"]
C_GUEST_ENTRIES, C_HOST_ENTRIES = COUNTER["cpu.guest_entries"], COUNTER["cpu.host_entries"]
C_FLUSHES, C_DEPOSITS = COUNTER["buffer.flushes"], COUNTER["buffer.deposits"]
C_FLUSH_NS = COUNTER["buffer.flush_ns"]
C_IDLE_FLUSHES = COUNTER["cpu.idle_flushes"]


class State:
    """One CPU's mode, domain, periods and taints (module docstring)."""

    def __init__(self, cpu: "Cpu", mode: int = IDLE, dom: int = 0) -> None:
        region, slot = cpu.region, cpu.slot
        self.cpu, self.w, self.buffer = cpu, cpu.w, cpu.buffer
        wi = region.word_index
        self.i_mode = wi("slots", slot, "mode")
        self.i_dom = wi("slots", slot, "domain")
        self.i_mseq = wi("cpu_state", slot, "mseq")
        self.i_taint = wi("cpu_state", slot, "taint")
        self.i_tdom = wi("cpu_state", slot, "taint_dom")
        self.cnt = cpu.cnt
        self.checker = cpu.checker
        self.mseq = self.w[self.i_mseq]
        self.taint, self.tdom = self.w[self.i_taint], self.w[self.i_tdom]
        self.mode, self.dom, self.period = -1, 0, -1
        self.ntrans = 0
        self.set(mode, dom)

    # -- transitions --------------------------------------------------------------------------
    def set(self, mode: int, dom: int) -> None:
        """Publish a new mode and domain (under the seqlock), opening and closing periods."""
        w = self.w
        old = self.period
        new = 0 if mode == HOST else dom if (mode == ASI or mode == GUEST) and dom > 0 else -1
        if new != old and new >= 0:
            self.buffer.open_period(new)             # before the mode shows ...
        elif new < 0 and old >= 0:
            self.buffer.close()                      # (a period ends: its data stays)
        s = self.mseq + 1
        w[self.i_mseq] = s
        w[self.i_mode] = mode
        w[self.i_dom] = dom
        w[self.i_mseq] = s + 1
        self.mseq = s + 1
        self.mode, self.dom = mode, dom
        if new != old:                               # the period of a mode: 0 host data,
            self.period = new                        # d domain d's data, -1 none
            if old >= 0:                             # ... and taints after it is gone
                self._taint_period(old)
        self.ntrans += 1

    def enter_host(self) -> None:
        """To the unrestricted kernel (keeping the vCPU's domain), asserting S1 after it."""
        self.set(HOST, self.dom)
        self.w[self.cnt + C_HOST_ENTRIES] += 1
        if self.checker is not None:
            self.checker.host_entry()

    def enter_guest(self) -> int:
        """VM entry (after a barrier said yes). Returns the clock read just after the mode
        store, before the transition-time assertion: where a barrier's wait ends (the
        assertion's own cost is counted apart, in ``check.ns``)."""
        self.set(GUEST, self.dom)
        t = now()
        self.w[self.cnt + C_GUEST_ENTRIES] += 1
        if self.checker is not None:
            self.checker.guest_entry()
        return t

    def exit_guest(self, mode: int = ASI) -> None:
        """A VM exit: GUEST -> ASI(d) (or HOST, for a kernel that never restricts), asserting
        first that no sibling got in beside the guest."""
        if self.checker is not None:
            self.checker.guest_exit()
        if mode == HOST:
            self.enter_host()
        else:
            self.set(mode, self.dom)

    def stunned(self, acks: list[tuple[int, int]], park_word: int = -1) -> None:
        """H2 and H3 in one seqlock section: mode := STUNNED, *then* the acks ``(word,
        value)`` -- an ack must never be visible before the store of STUNNED (model/README.md).
        ``park_word`` (naive's exposure window; -1: none) gets the time between the two."""
        w = self.w
        s = self.mseq + 1
        w[self.i_mseq] = s
        w[self.i_mode] = STUNNED
        if park_word >= 0:
            w[park_word] = now()
        for i, g in acks:
            w[i] = g
        w[self.i_mseq] = s + 1
        self._stunned_after(s + 1)

    def poll_stun1(self, gen: int, ack: int, acked: list[int], j: int, park_word: int,
                   check_every: int, checkpoint: Callable[[], bool | None]) -> bool | None:
        """A guest's wait for one sibling's stun request, H2 and H3 written out (the stun round
        trip's critical path: nothing between seeing the request and its ack). A request of
        lane ``j`` is pending when its generation (word ``gen``) is odd and not ``acked[j]``;
        then mode := STUNNED, ``park_word`` (-1: none) := now, ack (word ``ack``) := it, and
        True: the caller runs P1/P2. Every ``check_every`` polls ``checkpoint()``; what it
        returns other than None ends the wait (False: still in GUEST). The same stores, in the
        same order, as :meth:`stunned` (tests/test_state.py checks the two agree)."""
        w, im, imode, stunned = self.w, self.i_mseq, self.i_mode, STUNNED
        s0 = acked[j]          # an odd generation we have not acked differs from it: pending
        s = self.mseq + 1      # the seqlock's next value, ready (only a checkpoint changes it)
        n = 0
        while True:
            g = w[gen]
            if g != s0:
                if g & 1 and g != acked[j]:
                    w[im] = s
                    w[imode] = stunned
                    if park_word >= 0:
                        w[park_word] = now()
                    w[ack] = g
                    w[im] = s + 1
                    acked[j] = g
                    self._stunned_after(s + 1)
                    return True
                s0 = g
            n += 1
            if n >= check_every:
                n = 0
                r = checkpoint()
                if r is not None:
                    return r
                s = self.mseq + 1

    def _stunned_after(self, mseq: int) -> None:
        """The bookkeeping of a park, after the stores the siblings wait for."""
        self.mseq = mseq
        self.mode = STUNNED
        old = self.period
        if old >= 0:
            self.buffer.close()
            self.period = -1
            self._taint_period(old)
        self.ntrans += 1

    def go_idle(self, flush: bool = True) -> None:
        """To the idle task without the kernel (model/README.md, step I): IDLE keeping the
        domain -- the VM-entry barrier's B3 still refuses a sibling another VM -- then the flush
        of what the ended period left (when this CPU's taints ask for it; ``flush=False``: a
        strategy that never flushes), then domain 0. A sibling that reads domain 0 finds the
        buffer flushed."""
        if self.mode != IDLE:
            self.set(IDLE, self.dom)
        if flush and self.taint:
            self.flush(self.cnt + C_IDLE_FLUSHES)
        if self.dom:
            self.set(IDLE, 0)

    def set_domain(self, dom: int) -> None:
        """R4: the domain changes only in HOST (schedule() picks another vCPU, or idles)."""
        assert self.mode == HOST, self.mode
        self.set(HOST, dom)

    # -- loads, taints and the flush ------------------------------------------------------
    def load(self, token: int) -> None:
        """A load of a frame whose token is ``token`` (non-zero): deposit it, taint."""
        self.buffer.deposit(token)
        self.w[self.cnt + C_DEPOSITS] += 1
        if token >> CLASS_SHIFT == _SENSITIVE:
            self._taint(_KERNEL)
        else:
            self._taint_local((token >> FRAME_BITS) & OWNER_MASK)

    def _taint_period(self, period: int) -> None:
        if period == 0:
            self._taint(_KERNEL)
        else:
            self._taint_local(period)

    def _taint_local(self, dom: int) -> None:
        t = self.taint
        if not t & _GUEST:
            self.tdom = dom
            self.w[self.i_tdom] = dom
            self._taint(_GUEST)
        elif self.tdom != dom:
            self._taint(_OTHER)

    def _taint(self, bits: int) -> None:
        t = self.taint | bits
        if t != self.taint:
            self.taint = t
            self.w[self.i_taint] = t

    def taint_fenced(self) -> None:
        """A sibling was fenced off: what it left in the buffer is this CPU's to flush."""
        self._taint(_KERNEL)

    def needs_flush(self, dom: int, protect: int = ALL_TAINTS) -> bool:
        """Whether entering domain ``dom`` requires a flush first: a taint in ``protect``
        other than this domain's own local data."""
        t = self.taint & protect
        return bool(t) and (t != _GUEST or self.tdom != dom)

    def flush(self, reason: int) -> None:
        """Flush the core buffer (real L1D-sized eviction work) and clear this CPU's taints.
        ``reason``: the counter word of the mechanism that asked (``stun.flushes``, ...)."""
        w = self.w
        t0 = now()
        self.buffer.flush(self.cpu.fenced_any())
        if self.taint:
            self.taint = 0
            w[self.i_taint] = 0
        c = self.cnt
        w[c + C_FLUSH_NS] += now() - t0
        w[c + C_FLUSHES] += 1
        w[reason] += 1
