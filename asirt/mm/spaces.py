"""Address spaces in the region, from any process: where each class of memory is mapped, ASI
instances and their classes, page allocation and the TLB shootdowns that unmapping needs, and
the checks of the trees' invariants. The per-CPU side (asi_enter, asi_exit, loads) is
:class:`asirt.mm.asi.Asi`, which builds on this.

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
code, which plugs into :meth:`AddressSpaces.set_hooks`. Never map, unmap or change instances
from a signal handler (they take the region lock).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from asirt.cpu import Cpu
from asirt.errors import AsirtError, BadInput, CheckFailed
from asirt.fence import fence
from asirt.mm.memclass import DoubleFree, Frames, MappingRefused, MemClass, PoolExhausted, describe
from asirt.mm.pagetable import (NX, PRESENT, WRITABLE,
                                CorruptEntry, PageTables, index, make_pte, pte_frame)
from asirt.mm.tlb import Shootdowns, Tlb
from asirt.cpu.state import ALL_TAINTS
from shm_layout.asi import GLOBAL_OWNER, MAX_ASI, PAGE_SIZE, word
from shm_layout.cpu import MAX_DOMAINS
from shm_layout.region import Region

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


Hook = Callable[["Asi", int], None]     # (the CPU's asirt.mm.asi.Asi, instance)


@dataclass(frozen=True)
class AsiClass:
    id: AsiClassId
    protect: int          # taints that make asi_enter flush
    maps_local: bool      # whether the domain's local memory is mapped
    on_enter: Hook | None = None
    on_exit: Hook | None = None


def default_classes() -> dict[int, AsiClass]:
    k = AsiClassId
    return {k.KVM: AsiClass(k.KVM, ALL_TAINTS, True),
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



def setup(region: Region) -> None:
    """Parent, before any worker attaches: the lock, the full tree (instance 0) and the
    template tree with the shared global PDPT."""
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


class AddressSpaces:
    """One process's handle on the region's address spaces (module docstring); every
    operation takes the region's page-table lock. ``cpu``: the pinned CPU the process drives,
    whose waits (a shootdown) answer at its safe point; None for the parent."""

    def __init__(self, region: Region, cpu: Cpu | None = None,
                 classes: dict[int, AsiClass] | None = None) -> None:
        self.region, self.cpu = region, cpu
        self.classes = dict(default_classes() if classes is None else classes)
        self.pt = PageTables(region) if cpu is None else PageTables(region, params=cpu.params)
        self.q = self.pt.q
        self.frames = Frames(region)
        self.insts = region.array("asi_inst")
        self.ibase = word(region, "asi_inst", 0)
        self.fbase = word(region, "asi_frames", 0)
        self.template = int(region.array("asi_ctl")["template"][0])
        self.full_root = int(self.insts["root"][0])
        self.tlb: Tlb | None = None
        if cpu is not None:
            self.tlb = Tlb(cpu, self.pt, self.full_root)
            self.pt.service = self.tlb.service
        self.shootdowns = Shootdowns(region, cpu, self.tlb, self.pt)

    def close(self) -> None:
        self.frames.close()
        del self.insts
        self.pt.close()

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
        if not 0 <= domain <= MAX_DOMAINS:
            raise BadInput(f"domain {domain}", f"is outside the domains 0..{MAX_DOMAINS}",
                           f"use a domain between 1 and {MAX_DOMAINS} (0: the host)")
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


def frames_of(region: Region, cls: int, owner: int = 0) -> list[int]:
    """The virtual addresses of every frame of ``cls`` and ``owner``, in frame order."""
    a = region.array("asi_frames")
    pfns = np.flatnonzero((a["cls"] == cls) & (a["owner"] == owner))
    return [frame_va(int(p), cls) for p in pfns]


def parent_counters(region: Region) -> dict[str, int]:
    """The shootdowns the parent (no CPU) sent and avoided, for a run's ``counters``: the
    CPUs' own are in their counters (asi.shootdowns_*)."""
    ctl = region.array("asi_ctl")[0]
    return {f"asi.{f}": int(ctl[f]) for f in ("shootdowns_sent", "shootdowns_avoided")}


if TYPE_CHECKING:
    from asirt.mm.asi import Asi

__all__ = ["AddressSpaces", "AsiClass", "AsiClassId", "setup", "parent_counters", "frame_va",
           "frames_of",
           "DMAP_BASE", "LOCAL_BASE", "PageFault", "NotMapped", "AsiStateError",
           "InvariantViolation"]
