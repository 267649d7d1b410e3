"""Address Space Isolation on one CPU: asi_enter and asi_exit with their class hooks and
taints, interrupt nesting, page-fault-and-retry, loads and speculative touches. Built on
:class:`asirt.mm.spaces.AddressSpaces` (where memory is mapped, instances, shootdowns).

Every mode change goes through the CPU's state writer (asirt.cpu.state): asi_enter publishes
ASI(d), asi_exit HOST, so the checkers see every transition, and every load deposits into the
one core buffer through it. Taints (per CPU, kept by the state writer, as in the 2025 ASI
proposals): KERNEL (the CPU was in the unrestricted kernel, or loaded a sensitive frame),
GUEST (a local frame of ``taint_dom``), OTHER (a second domain's local frame). asi_enter
flushes when the CPU holds a taint the class protects against; GUEST only counts when it is
another domain's. That is KVM's conditional l1tf_flush_l1d.

An access to an address the current restricted tree does not map is a page fault: asi_exit,
retry in the full tree, and count it. A signal handler between asi_intr_enter/asi_intr_exit
stays in the restricted space unless it faults; asi_intr_exit then re-enters.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import NamedTuple

from asirt.cpu import ASI, HOST, IDLE, Cpu
from asirt.errors import AsirtError
from asirt.fence import fence
from asirt.mm.pagetable import LOCK_TIMEOUT_S, PFN_MASK, PFN_SHIFT, LockTimeout
from asirt.mm.spaces import AddressSpaces, AsiClass, AsiStateError, Hook, PageFault
from asirt.mm.tlb import EPOCH_MASK, EPOCH_SHIFT, INST_WORDS, PCID_SHIFT, VALID
from shm_layout.asi import CPU_DTYPE, FRAME_DTYPE, INST_DTYPE, MAX_ASI, word
from shm_layout.counters import COUNTER
from shm_layout.region import Region

__all__ = ["Asi"]

_I = {f: INST_DTYPE.fields[f][1] // 8 for f in INST_DTYPE.names}
_C = {f: CPU_DTYPE.fields[f][1] // 8 for f in CPU_DTYPE.names}
_FRAME_WORDS = FRAME_DTYPE.itemsize // 8
_TOKEN = FRAME_DTYPE.fields["token"][1] // 8
_CNT = {k: COUNTER[f"asi.{k}"] for k in ("enters", "exits", "faults", "flushes", "gadgets",
                                       "gadget_hits")}


class _Entry(NamedTuple):
    """What asi_enter needs of a live instance; asi_enter unpacks it by position."""
    life: int          # the instance's state word when cached: its incarnation
    state_w: int       # word of that state (a mismatch: destroyed or recreated since)
    root: int
    domain: int
    cls: AsiClass
    protect: int
    on_enter: Hook | None
    gen_w: int         # word of the instance's TLB generation
    seen_w: int        # word of this CPU's seen[pcid]
    tag: int           # TLB tag bits of the PCID, without the epoch



class Asi(AddressSpaces):
    """The ASI side of pinned CPU ``cpu`` (module docstring), with the address-space operations
    of :class:`AddressSpaces` too."""

    def __init__(self, region: Region, cpu: Cpu,
                 classes: dict[int, AsiClass] | None = None) -> None:
        super().__init__(region, cpu, classes)
        assert self.tlb is not None
        #: translate(va): the current tree's leaf entry for va (0: unmapped), TLB first
        self.translate = self.tlb.translate
        self.state = cpu.state
        self.w = cpu.w
        self.c = {k: cpu.cnt + v for k, v in _CNT.items()}
        self.rec = word(region, "asi_cpu", cpu.slot)
        self._cur, self._tgt = self.rec + _C["current"], self.rec + _C["target"]
        self._intr: list[int] = []
        self._infos: dict[int, _Entry] = {}
        self._k: AsiClass | None = None
        cpu.safepoint.register(self._answer)

    def set_hooks(self, cls: int, on_enter: Hook | None = None,
                  on_exit: Hook | None = None) -> None:
        """Install a class's enter/exit hooks on this CPU (the sibling stun plugs in here)."""
        self.classes[cls] = replace(self.classes[cls], on_enter=on_enter, on_exit=on_exit)
        self._infos.clear()
        if self._k is not None and self._k.id == cls:
            self._k = self.classes[cls]

    def _answer(self) -> bool:
        """The safe point's TLB answer: flush for pending shootdowns (never changes mode)."""
        self.tlb.service()
        return False

    # -- this CPU -------------------------------------------------------------------------
    def online(self) -> None:
        """Start driving this CPU: empty TLB, in the unrestricted kernel (it ran before us)."""
        q, r = self.q, self.rec
        for f in ("current", "target", "intr_depth"):
            q[r + _C[f]] = 0
        self._intr.clear()           # the spaces interrupted handlers return to (intr_depth)
        q[r + _C["pid"]] = os.getpid()
        self.tlb.clear()
        self.state.set(HOST, self.state.dom)
        q[r + _C["online"]] = 1

    def offline(self) -> None:
        """Stop driving this CPU (before the worker exits): it goes idle and drops its
        instance; nobody waits for it any more. Straight to IDLE, never through HOST: a CPU on
        its way out holds no stun, and a sibling may still be in GUEST (S1); what its last
        period left is flushed before it shows domain 0 (State.go_idle)."""
        if self.state.mode != IDLE:
            self.state.go_idle()             # IDLE, flushed, then domain 0
        q = self.q
        if q[self._cur]:
            q[self._cur] = 0
            self.tlb.switch_full()
        q[self._tgt] = 0
        q[self.rec + _C["online"]] = 0

    @property
    def current(self) -> int:
        return self.q[self._cur]

    @property
    def target(self) -> int:
        return self.q[self._tgt]

    def _info(self, inst: int) -> _Entry:
        """What asi_enter needs of a live instance, cached per incarnation (its ``state``)."""
        if not 0 < inst < MAX_ASI:
            raise AsiStateError(inst, "is not a restricted instance")
        ib = self.ibase + inst * INST_WORDS
        q = self.q
        life = q[ib + _I["state"]] or self._settled(inst, ib)
        k = self.classes[q[ib + _I["cls"]]]
        info = _Entry(life, ib + _I["state"], q[ib + _I["root"]],
                      q[ib + _I["domain"]], k, int(k.protect), k.on_enter, ib + _I["gen"],
                      self.tlb.seen + inst, VALID | inst << PCID_SHIFT)
        self._infos[inst] = info
        return info

    def _settled(self, inst: int, ib: int) -> int:
        """``inst``'s state word, read as 0: raise if the instance is gone; while an asi_destroy
        on another CPU is deciding (it writes state 0 under the lock, then frees the tree and
        zeroes refcount, or is refused and restores state), wait for its answer."""
        q, sw, rw = self.q, ib + _I["state"], ib + _I["refcount"]
        start = time.monotonic()
        while not q[sw]:
            if not q[rw]:
                raise AsiStateError(inst, "is not live")
            os.sched_yield()
            if time.monotonic() - start > LOCK_TIMEOUT_S:
                raise LockTimeout(f"page-table lock (asi_destroy({inst}) in progress)",
                                  q[self.pt.lock_pid], time.monotonic() - start)
        return q[sw]

    def asi_enter(self, inst: int) -> None:
        """Switch to instance ``inst``'s restricted tree (and make it the target): the mode
        becomes ASI(its domain); the buffer is flushed first when this CPU's taints ask for
        it; then the class's enter hook runs (the KVM class's: unstun the siblings)."""
        q = self.q
        cur = q[self._cur]
        if cur == inst:
            if not inst:
                raise AsiStateError(0, "is the full tree: leave a restricted one with asi_exit")
            return
        if cur:
            self.asi_exit()
        info = self._infos.get(inst) or self._info(inst)
        q[self._cur] = inst
        fence()                          # current before gen and state: see asirt.mm.tlb
        if q[info[1]] != info[0]:        # destroyed, or a new life since we cached it
            q[self._cur] = 0
            del self._infos[inst]
            return self.asi_enter(inst)
        q[self._tgt] = inst
        _, _, root, dom, k, protect, on_enter, genw, seenw, tag = info
        tlb = self.tlb                   # load the TLB's registers (see asirt.mm.tlb.Tlb)
        g = q[genw]
        tlb.pcid, tlb.root, tlb.gen = inst, root, g
        tlb.tag = tag | (g & EPOCH_MASK) << EPOCH_SHIFT
        if q[seenw] != g:                # the tree changed since we last ran in it: flush
            tlb.flush_pcid(inst, g)
        state = self.state
        state.set(ASI, dom)
        self._k = k
        self.w[self.c["enters"]] += 1
        if state.needs_flush(dom, protect):
            state.flush(self.c["flushes"])
        if on_enter is not None:
            on_enter(self, inst)

    def asi_exit(self) -> None:
        """Back to the full tree (the mode becomes HOST, asserting S1); the class's exit hook
        runs first (the KVM class's: stun the siblings). The target stays (asi_intr_exit
        re-enters it)."""
        q = self.q
        cur = q[self._cur]
        if not cur:
            return
        on_exit = self._k.on_exit
        if on_exit is not None:
            on_exit(self, cur)
        self.state.enter_host()
        q[self._cur] = 0
        self.tlb.switch_full()
        self.w[self.c["exits"]] += 1

    def asi_relinquish(self) -> None:
        """asi_exit and drop the target: this CPU no longer uses any instance."""
        self.asi_exit()
        self.q[self._tgt] = 0

    def asi_intr_enter(self) -> None:
        """An interrupt (a signal handler) begins: it keeps the address space it found."""
        self._intr.append(self.q[self._cur])
        self.q[self.rec + _C["intr_depth"]] += 1

    def asi_intr_exit(self) -> None:
        """The handler ends: if it faulted out of the restricted space, re-enter it."""
        if not self._intr:
            raise AsirtError("asi_intr_exit without asi_intr_enter")
        was = self._intr.pop()
        self.q[self.rec + _C["intr_depth"]] -= 1
        if was and self.q[self._cur] != was:
            self.asi_enter(was)

    def access(self, va: int) -> int:
        """Load from ``va``: translate (a restricted miss faults: asi_exit and retry in the
        full tree), deposit the frame's token, taint the CPU. Returns the frame number."""
        pte = self.tlb.translate(va)
        if not pte:
            q = self.q
            cur = q[self._cur]
            if not cur:
                raise PageFault(va, 0)
            self.w[self.c["faults"]] += 1
            self.asi_exit()
            pte = self.tlb.translate(va)
            if not pte:
                raise PageFault(va, cur)
        pfn = (pte >> PFN_SHIFT) & PFN_MASK
        token = self.q[self.fbase + pfn * _FRAME_WORDS + _TOKEN]
        if token:
            self.state.load(token)
        return pfn

    def touch(self, va: int) -> bool:
        """A speculative load (a gadget): deposits the token if ``va`` is mapped in the
        current tree, never faults. Whether it reached memory."""
        w = self.w
        w[self.c["gadgets"]] += 1
        pte = self.tlb.translate(va)
        if not pte:
            return False
        w[self.c["gadget_hits"]] += 1
        token = self.q[self.fbase + ((pte >> PFN_SHIFT) & PFN_MASK) * _FRAME_WORDS + _TOKEN]
        if token:
            self.state.load(token)
        return True

    def flush(self) -> None:
        """Flush the core buffer (real L1D-sized eviction work) and clear the taints."""
        self.state.flush(self.c["flushes"])

    def service(self) -> None:
        """Answer pending TLB flush requests (the CPU's safe point does it too)."""
        self.tlb.service()

