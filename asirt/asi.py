"""Address Space Isolation: instances, classes with enter/exit hooks, per-CPU enter/exit with
taints, interrupt nesting, page-fault-and-retry, and where each class of memory is mapped.

Virtual layout (every frame is mapped once in the full tree, at an address fixed by its
frame number and class, so a restricted mapping is always a copy of the full tree's):

- ``DMAP_BASE + pfn * 4 KiB`` (PML4 slot 273, like Linux's direct map): sensitive and global
  frames. Every restricted root points its slot 273 at one *shared* PDPT, owned by the
  template tree, that maps only global frames: a global mapping made once appears in all.
- ``LOCAL_BASE + pfn * 4 KiB`` (slot 274): local frames, in the full tree and in the trees of
  their owner's instances (each its own tables).

An instance is (domain, class), refcounted; its index is its PCID; index 0 is the full tree.
Classes: ``kvm`` (exit hook: request sibling stun; enter: flush the core buffer when the
CPU's taints say so, then the enter hook releases the siblings), ``kpti`` (no hooks, never
flushes) and ``idle`` (maps only global memory). The stun itself belongs to the sibling-sync
code, which plugs into :meth:`Asi.set_hooks`.

Taints (per CPU, as in the 2025 ASI proposals): KERNEL (a sensitive frame was loaded), GUEST
(a local frame of ``taint_dom`` was loaded), OTHER (a second domain's local frame was
loaded). asi_enter flushes when the CPU holds a taint the class protects against; GUEST only
counts when it is another domain's. That is KVM's conditional l1tf_flush_l1d.

An access to an address the current restricted tree does not map is a page fault: asi_exit,
retry in the full tree, and count it. A signal handler between asi_intr_enter/asi_intr_exit
stays in the restricted space unless it faults; asi_intr_exit then re-enters. Never map,
unmap or change instances from a signal handler (they take the region lock).
"""
from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np

from asirt.errors import AsirtError, BadInput, CheckFailed
from asirt.memclass import (CLASS_SHIFT, FRAME_BITS, OWNER_MASK, DoubleFree, Frames,
                            MappingRefused, MemClass, PoolExhausted, describe)
from asirt.pagetable import (LOCK_TIMEOUT_S, NX, PFN_MASK, PFN_SHIFT, PRESENT, WRITABLE,
                             CorruptEntry, LockTimeout, PageTables, index, make_pte, pte_frame)
from asirt.fence import fence
from asirt.tlb import EPOCH_MASK, EPOCH_SHIFT, INST_WORDS, PCID_SHIFT, VALID, Shootdowns, Tlb
from asirt.uarch import CoreBuffer
from shm_layout.asi import (CPU_DTYPE, FRAME_DTYPE, GLOBAL_OWNER, INST_DTYPE, MAX_ASI,
                            PAGE_SIZE, word)
from shm_layout.region import Region
from shm_layout.sections import Mode

DMAP_BASE = 0xFFFF_8880_0000_0000
LOCAL_BASE = 0xFFFF_8900_0000_0000
GLOBAL_SLOT = index(DMAP_BASE, 4)
LOCAL_SLOT = index(LOCAL_BASE, 4)
assert (GLOBAL_SLOT, LOCAL_SLOT) == (273, 274)
PAGE_FLAGS = PRESENT | WRITABLE | NX


class AsiClassId(enum.IntEnum):
    FULL = 0      # instance 0: the unrestricted kernel tree
    KVM = 1
    KPTI = 2
    IDLE = 3


class Taint(enum.IntFlag):
    KERNEL = 1
    GUEST = 2
    OTHER = 4


Hook = Callable[["Asi", int], None]     # (the CPU's Asi, instance)


@dataclass(frozen=True)
class AsiClass:
    id: AsiClassId
    protect: int          # taints that make asi_enter flush
    maps_local: bool      # whether the domain's local memory is mapped
    on_enter: Hook | None = None
    on_exit: Hook | None = None


def default_classes() -> dict[int, AsiClass]:
    k = AsiClassId
    return {k.KVM: AsiClass(k.KVM, Taint.KERNEL | Taint.GUEST | Taint.OTHER, True),
            k.KPTI: AsiClass(k.KPTI, 0, True),
            k.IDLE: AsiClass(k.IDLE, 0, False)}


def frame_va(pfn: int, cls: int) -> int:
    return (LOCAL_BASE if cls == MemClass.LOCAL else DMAP_BASE) + pfn * PAGE_SIZE


class PageFault(AsirtError):
    """An access to an address no tree maps (not even the full one)."""

    exit_code = 1

    def __init__(self, address: int, inst: int) -> None:
        super().__init__(address, inst)
        self.address, self.inst = address, inst

    def message(self) -> str:
        return f"page fault at {self.address:#x}: not mapped in the full kernel tree"


class NotMapped(AsirtError):
    def __init__(self, address: int) -> None:
        super().__init__(address)
        self.address = address

    def message(self) -> str:
        return (f"{self.address:#x} is not mapped in the full kernel tree; allocate it with "
                f"alloc_page() first")


class AsiStateError(AsirtError):
    """An instance is not live, or still in use, for the requested operation."""

    def __init__(self, inst: int, problem: str) -> None:
        super().__init__(inst, problem)
        self.inst, self.problem = inst, problem

    def message(self) -> str:
        return f"ASI instance {self.inst}: {self.problem}"


class InvariantViolation(CheckFailed):
    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems = problems

    def message(self) -> str:
        more = f" (and {len(self.problems) - 10} more)" if len(self.problems) > 10 else ""
        return "page-table invariant violated: " + "; ".join(self.problems[:10]) + more


_I = {f: INST_DTYPE.fields[f][1] // 8 for f in INST_DTYPE.names}
_C = {f: CPU_DTYPE.fields[f][1] // 8 for f in CPU_DTYPE.names}
_FRAME_WORDS = FRAME_DTYPE.itemsize // 8
_TOKEN = FRAME_DTYPE.fields["token"][1] // 8
_SENSITIVE = int(MemClass.SENSITIVE)
_ASI, _HOST = int(Mode.ASI), int(Mode.HOST)
_KERNEL, _GUEST, _OTHER = int(Taint.KERNEL), int(Taint.GUEST), int(Taint.OTHER)


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


def setup(region: Region, cores: list[list[int]]) -> None:
    """Parent, before any worker attaches: the lock, the full tree (instance 0), the template
    tree with the shared global PDPT, and each CPU's core and lane."""
    pt = PageTables(region)
    try:
        with pt:
            full = pt.alloc_table(4, 0)
            region.array("asi_inst")[0] = (1, 1, AsiClassId.FULL, 0, full, 1, 0)
            region.array("asi_ctl")["lives"][0] = 1
            template = pt.alloc_table(4, GLOBAL_OWNER)
            pdpt = pt.alloc_table(3, GLOBAL_OWNER)
            pt.link_new(template, GLOBAL_SLOT, make_pte(pdpt, PRESENT | WRITABLE))
            region.array("asi_ctl")["template"][0] = template
    finally:
        pt.close()
    cpus = region.array("asi_cpu")
    for k, sibs in enumerate(cores):
        for lane, slot in enumerate(sibs):
            cpus["core"][slot], cpus["lane"][slot] = k, lane


class Asi:
    """One process's handle on the ASI state; ``cpu`` is its CPU slot, None for the parent.

    The CPU operations (``asi_enter`` ... ``access``) need a ``cpu``; mapping and instance
    operations work from any process and take the region's page-table lock.
    """

    def __init__(self, region: Region, cpu: int | None = None,
                 classes: dict[int, AsiClass] | None = None) -> None:
        self.region, self.cpu = region, cpu
        self.classes = dict(default_classes() if classes is None else classes)
        self.pt = PageTables(region)
        self.q = self.pt.q
        self.words = region.words
        self.frames = Frames(region)
        self.insts = region.array("asi_inst")
        self.ibase = word(region, "asi_inst", 0)
        self.fbase = word(region, "asi_frames", 0)
        self.template = int(region.array("asi_ctl")["template"][0])
        self.full_root = int(self.insts["root"][0])
        self.tlb: Tlb | None = None
        self.buf: CoreBuffer | None = None
        self._intr: list[int] = []
        self._infos: dict[int, _Entry] = {}
        self._k: AsiClass | None = None
        if cpu is not None:
            self.tlb = Tlb(region, cpu, self.pt, self.full_root)
            #: translate(va): the current tree's leaf entry for va (0: unmapped), TLB first
            self.translate = self.tlb.translate
            self.pt.service = self.tlb.service
            rec = region.array("asi_cpu")[cpu]
            self.buf = CoreBuffer(region, int(rec["core"]), int(rec["lane"]))
            self.rec = word(region, "asi_cpu", cpu)
            self._cur, self._tgt = self.rec + _C["current"], self.rec + _C["target"]
            self._taint, self._tdom = self.rec + _C["taint"], self.rec + _C["taint_dom"]
            self._mode = region.word_index("slots", cpu, "mode")
            self._dom = region.word_index("slots", cpu, "domain")
        self.shootdowns = Shootdowns(region, cpu, self.tlb, self.pt)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.close()
        self.frames.close()
        del self.insts
        self.pt.close()

    def set_hooks(self, cls: int, on_enter: Hook | None = None,
                  on_exit: Hook | None = None) -> None:
        """Install a class's enter/exit hooks in this process (the sibling stun plugs in here)."""
        self.classes[cls] = replace(self.classes[cls], on_enter=on_enter, on_exit=on_exit)
        self._infos.clear()
        if self._k is not None and self._k.id == cls:
            self._k = self.classes[cls]

    # -- memory: allocation and placement (any process; takes the lock) ------------------
    def _restricted(self) -> list[int]:
        live = np.flatnonzero(self.insts["state"][1:]) + 1
        return [int(i) for i in live]

    def _local_trees(self, owner: int) -> list[int]:
        return [i for i in self._restricted() if int(self.insts["domain"][i]) == owner
                and self.classes[int(self.insts["cls"][i])].maps_local]

    def _place(self, pfn: int, cls: int, owner: int) -> int:
        """Map a new frame in the full tree and every restricted tree its class belongs in."""
        va, pte = frame_va(pfn, cls), make_pte(pfn, PAGE_FLAGS)
        trees = [(self.full_root, 0)]
        if cls == MemClass.GLOBAL:
            trees.append((self.template, GLOBAL_OWNER))
        elif cls == MemClass.LOCAL:
            trees += [(int(self.insts["root"][i]), i) for i in self._local_trees(owner)]
        done: list[tuple[int, int]] = []
        try:
            for root, own in trees:
                self.pt.set_pte(root, va, pte, own)
                done.append((root, own))
        except BaseException:
            for root, own in done:      # nothing walked these yet: no shootdown needed
                self.pt.clear_pte(root, va, own)
            raise
        return va

    def alloc_page(self, cls: int, owner: int = 0) -> int:
        """A fresh frame of ``cls`` (``owner``: its domain), mapped where its class belongs;
        its virtual address."""
        with self.pt:
            pfn = self.frames.alloc(cls, owner)
            try:
                return self._place(pfn, cls, owner)
            except BaseException:
                self.frames.free(pfn, frame_va(pfn, cls))
                raise

    def alloc(self, size: int, cls: int, owner: int = 0) -> int:
        """``size`` bytes on a frame holding only this class and owner; their address."""
        with self.pt:
            pfn, offset, fresh = self.frames.alloc_object(size, cls, owner)
            if fresh:
                try:
                    self._place(pfn, cls, owner)
                except BaseException:
                    self.frames.free(pfn, frame_va(pfn, cls))
                    raise
            return frame_va(pfn, cls) + offset

    def free_page(self, va: int) -> None:
        """Unmap a frame everywhere, shoot down stale TLB entries, then free it.

        The lock is dropped for the shootdown wait; the frame is sealed before that, so no
        object allocated meanwhile lands on it (it is unmapped, and about to be freed under the
        object). A wait that times out leaves the frame sealed and allocated: lost, never reused
        while a TLB may still hold it."""
        with self.pt:
            pte = self.pt.lookup(self.full_root, va)
            if not pte & PRESENT:
                raise DoubleFree("page", -1, va)
            pfn = pte_frame(pte)
            cls = self.frames.cls_of(pfn)
            changed = [0]
            if cls == MemClass.GLOBAL:
                self.pt.clear_pte(self.template, va, GLOBAL_OWNER)
                changed += self._restricted()
            elif cls == MemClass.LOCAL:
                for i in self._local_trees(self.frames.owner_of(pfn)):
                    if self.pt.clear_pte(int(self.insts["root"][i]), va, i):
                        changed.append(i)
            self.pt.clear_pte(self.full_root, va, 0)
            self.frames.seal(pfn)        # unmapped everywhere: alloc() must not pick it now
            targets = self.shootdowns.prepare(changed)
        self.shootdowns.wait(targets)
        with self.pt:                    # only now may the frame be reused
            self.frames.free(pfn, va)

    def map_restricted(self, inst: int, va: int) -> None:
        """Map ``va`` in instance ``inst``'s tree as the full tree maps it, if its class allows.
        A global page goes into the shared tables, so every restricted tree gets it."""
        with self.pt:
            self._live(inst)
            pte = self.pt.lookup(self.full_root, va)
            if not pte & PRESENT:
                raise NotMapped(va)
            pfn = pte_frame(pte)
            cls, owner = self.frames.cls_of(pfn), self.frames.owner_of(pfn)
            domain = int(self.insts["domain"][inst])
            maps_local = self.classes[int(self.insts["cls"][inst])].maps_local
            if cls == MemClass.GLOBAL:
                self.pt.set_pte(self.template, va, pte, GLOBAL_OWNER)
            elif cls == MemClass.LOCAL and owner == domain and maps_local:
                self.pt.set_pte(int(self.insts["root"][inst]), va, pte, inst)
            else:
                raise MappingRefused(va, pfn, cls, owner, domain)

    def unmap_restricted(self, inst: int, va: int) -> None:
        """Remove ``va`` from ``inst``'s tree (for a global page: from every restricted tree);
        the full tree keeps it. Waits for CPUs inside to flush; the others flush lazily."""
        with self.pt:
            self._live(inst)
            pte = self.pt.lookup(self.full_root, va)
            if pte & PRESENT and self.frames.cls_of(pte_frame(pte)) == MemClass.GLOBAL:
                changed = self._restricted() if self.pt.clear_pte(
                    self.template, va, GLOBAL_OWNER) else []
            else:
                changed = [inst] if self.pt.clear_pte(
                    int(self.insts["root"][inst]), va, inst) else []
            targets = self.shootdowns.prepare(changed) if changed else []
        self.shootdowns.wait(targets)

    # -- instances ------------------------------------------------------------------------
    def _live(self, inst: int) -> None:
        if not 0 < inst < MAX_ASI or not self.insts["state"][inst]:
            raise AsiStateError(inst, "is not a live ASI instance (asi_init returns one)")

    def find(self, domain: int, cls: int) -> int | None:
        hits = np.flatnonzero((self.insts["state"] != 0) & (self.insts["domain"] == domain)
                              & (self.insts["cls"] == cls))
        hits = hits[hits > 0]
        return int(hits[0]) if hits.size else None

    def asi_init(self, domain: int, cls: int) -> int:
        """The instance of (domain, class), created with its restricted tree on first use."""
        if cls not in self.classes:
            raise BadInput(f"ASI class {cls!r}", "is not registered",
                           f"choose from {sorted(AsiClassId(c).name for c in self.classes)}")
        if cls == AsiClassId.IDLE and domain:
            raise BadInput(f"domain {domain} for the idle class", "idle maps no domain's memory",
                           "use domain 0")
        with self.pt:
            inst = self.find(domain, cls)
            if inst is not None:
                self.insts["refcount"][inst] += 1
                return inst
            free = np.flatnonzero(self.insts["state"][1:] == 0) + 1
            if not free.size:
                raise PoolExhausted("ASI instance", MAX_ASI - 1,
                                    f"an instance for domain {domain}", "")
            inst = int(free[0])
            pt = self.pt
            root = pt.alloc_table(4, inst)
            try:
                pt.link_new(root, GLOBAL_SLOT, int(pt.tables[self.template][GLOBAL_SLOT]))
                if self.classes[cls].maps_local:
                    a = self.frames.arr
                    for pfn in np.flatnonzero((a["cls"] == MemClass.LOCAL) & (a["owner"] == domain)):
                        va = frame_va(int(pfn), MemClass.LOCAL)
                        pte = pt.lookup(self.full_root, va)
                        if pte & PRESENT:
                            pt.set_pte(root, va, pte, inst)
            except BaseException:
                pt.free_tree(root, inst)
                raise
            rec = self.insts[inst]
            rec["refcount"], rec["cls"], rec["domain"], rec["root"] = 1, cls, domain, root
            rec["gen"] += 1           # a new life of this PCID: every CPU flushes it lazily
            ctl = self.region.array("asi_ctl")
            ctl["lives"][0] += 1
            rec["state"] = ctl["lives"][0]
            return inst

    def asi_destroy(self, inst: int) -> None:
        """Drop a reference; the last one frees the tree (no online CPU may be using it)."""
        with self.pt:
            self._live(inst)
            rec = self.insts[inst]
            if rec["refcount"] > 1:
                rec["refcount"] -= 1
                return
            life = int(rec["state"])
            rec["state"] = 0          # asi_enter checks state after storing current: Dekker
                                      # (refcount stays 1 until the tree is gone: an entry
                                      # seeing state 0 waits for the verdict, see _settled)
            fence()
            cpus = self.region.array("asi_cpu")
            busy = np.flatnonzero((cpus["online"] == 1) & ((cpus["current"] == inst)
                                                           | (cpus["target"] == inst)))
            if busy.size:
                rec["state"] = life
                raise AsiStateError(inst, f"CPU slots {busy.tolist()} are in it or target it; "
                                          f"asi_relinquish() on them first")
            self.pt.free_tree(int(rec["root"]), inst)
            rec["refcount"], rec["root"], rec["domain"], rec["cls"] = 0, 0, 0, 0
            rec["gen"] += 1

    # -- this CPU -------------------------------------------------------------------------
    def online(self) -> None:
        """Start driving this CPU: empty TLB, unrestricted, tainted (kernel ran before us)."""
        q, r = self.q, self.rec
        for f in ("current", "target", "intr_depth"):
            q[r + _C[f]] = 0
        self._intr.clear()           # the spaces interrupted handlers return to (intr_depth)
        q[r + _C["pid"]] = os.getpid()
        q[self._taint], q[self._tdom] = _KERNEL, 0
        self.tlb.clear()
        self.words[self._mode], self.words[self._dom] = Mode.HOST, 0
        q[r + _C["online"]] = 1

    def offline(self) -> None:
        """Stop driving this CPU (before the worker exits): nobody waits for it any more."""
        self.asi_relinquish()
        self.q[self.rec + _C["online"]] = 0

    @property
    def current(self) -> int:
        return self.q[self._cur]

    @property
    def target(self) -> int:
        return self.q[self._tgt]

    @property
    def taint(self) -> Taint:
        return Taint(self.q[self._taint])

    def stat(self, field: str) -> int:
        """One of this CPU's asi_cpu words: ``faults``, ``flushes``, ``tlb_misses``, ..."""
        return self.q[self.rec + _C[field]]

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
        """Switch to instance ``inst``'s restricted tree (and make it the target)."""
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
        fence()                          # current before gen and state: see asirt.tlb
        if q[info[1]] != info[0]:        # destroyed, or a new life since we cached it
            q[self._cur] = 0
            del self._infos[inst]
            return self.asi_enter(inst)
        q[self._tgt] = inst
        _, _, root, dom, k, protect, on_enter, genw, seenw, tag = info
        tlb = self.tlb                   # load the TLB's registers (see asirt.tlb.Tlb)
        g = q[genw]
        tlb.pcid, tlb.root, tlb.gen = inst, root, g
        tlb.tag = tag | (g & EPOCH_MASK) << EPOCH_SHIFT
        if q[seenw] != g:                # the tree changed since we last ran in it: flush
            tlb.flush_pcid(inst, g)
        w = self.words
        w[self._mode] = _ASI
        w[self._dom] = dom
        self._k = k
        t = q[self._taint] & protect
        if t and (t != _GUEST or q[self._tdom] != dom):
            self.flush()
        if on_enter is not None:
            on_enter(self, inst)

    def asi_exit(self) -> None:
        """Back to the full tree; the target stays (asi_intr_exit re-enters it)."""
        q = self.q
        cur = q[self._cur]
        if not cur:
            return
        on_exit = self._k.on_exit
        if on_exit is not None:
            on_exit(self, cur)
        w = self.words
        w[self._mode] = _HOST
        w[self._dom] = 0
        q[self._cur] = 0
        self.tlb.switch_full()

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
            q[self.rec + _C["faults"]] += 1
            self.asi_exit()
            pte = self.tlb.translate(va)
            if not pte:
                raise PageFault(va, cur)
        pfn = (pte >> PFN_SHIFT) & PFN_MASK
        token = self.q[self.fbase + pfn * _FRAME_WORDS + _TOKEN]
        if token:
            self._load(token)
        return pfn

    def touch(self, va: int) -> bool:
        """A speculative load: deposits the token if ``va`` is mapped in the current tree,
        never faults. Whether it reached memory."""
        pte = self.tlb.translate(va)
        if not pte:
            return False
        token = self.q[self.fbase + ((pte >> PFN_SHIFT) & PFN_MASK) * _FRAME_WORDS + _TOKEN]
        if token:
            self._load(token)
        return True

    def _load(self, token: int) -> None:
        self.buf.deposit(token)
        q = self.q
        t = q[self._taint]
        if token >> CLASS_SHIFT == _SENSITIVE:
            q[self._taint] = t | _KERNEL
            return
        owner = (token >> FRAME_BITS) & OWNER_MASK
        if not t & _GUEST:
            q[self._tdom] = owner
            q[self._taint] = t | _GUEST
        elif q[self._tdom] != owner:
            q[self._taint] = t | _OTHER

    def flush(self) -> None:
        """Flush the core's buffer (real L1D-sized eviction work) and clear the taints."""
        self.buf.flush()
        q = self.q
        q[self._taint] = 0
        q[self.rec + _C["flushes"]] += 1

    def service(self) -> None:
        """A safe point: answer pending TLB flush requests."""
        self.tlb.service()

    # -- checks ---------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Every way the trees break the rules: each restricted mapping must equal the full
        tree's and map only global memory or its own domain's local memory; every mapping must
        name an allocated frame. An empty list when all hold."""
        problems: list[str] = []
        with self.pt:
            frames = self.frames.arr.copy()
            try:
                full = self.pt.mappings(self.full_root)
            except CorruptEntry as err:
                return [f"full tree: {err}"]
            for va, pte in full.items():
                pfn = pte_frame(pte)
                if pfn >= len(frames) or frames["cls"][pfn] == MemClass.FREE:
                    problems.append(f"full tree maps {va:#x} to frame {pfn}, which is not "
                                    f"allocated")
            for inst in self._restricted():
                problems += self._verify_tree(inst, full, frames)
        return problems

    def _verify_tree(self, inst: int, full: dict[int, int], frames: np.ndarray) -> list[str]:
        rec = self.insts[inst]
        domain = int(rec["domain"])
        maps_local = self.classes[int(rec["cls"])].maps_local
        name = f"instance {inst} (domain {domain}, {AsiClassId(int(rec['cls'])).name.lower()})"
        try:
            mine = self.pt.mappings(int(rec["root"]))
        except CorruptEntry as err:
            return [f"{name}: {err}"]
        out = []
        for va, pte in mine.items():
            if full.get(va) != pte:
                out.append(f"{name} maps {va:#x} as {pte:#x}, the full tree as "
                           f"{full.get(va, 0):#x}")
                continue
            pfn = pte_frame(pte)
            cls, owner = int(frames["cls"][pfn]), int(frames["owner"][pfn])
            if not (cls == MemClass.GLOBAL or (cls == MemClass.LOCAL and owner == domain
                                               and maps_local)):
                out.append(f"{name} maps {va:#x} to frame {pfn} of class "
                           f"{describe(cls, owner)}")
        return out

    def check(self) -> None:
        problems = self.verify()
        if problems:
            raise InvariantViolation(problems)


def counters(region: Region) -> dict[str, int]:
    """Totals over every CPU (and the parent) for a run's ``counters``."""
    cpus = region.array("asi_cpu")
    ctl = region.array("asi_ctl")[0]
    out = {f: int(cpus[f].sum()) for f in ("faults", "flushes", "tlb_flushes", "tlb_misses")}
    for f in ("shootdowns_sent", "shootdowns_avoided"):
        out[f] = int(cpus[f].sum() + ctl[f])
    return out


__all__ = ["Asi", "AsiClass", "AsiClassId", "Taint", "setup", "counters", "frame_va",
           "DMAP_BASE", "LOCAL_BASE", "PageFault", "NotMapped", "AsiStateError",
           "InvariantViolation"]
