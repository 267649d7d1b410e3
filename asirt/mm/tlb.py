"""PCIDs, each CPU's emulated TLB, and TLB shootdown with lazy flushing.

Every ASI instance has its own PCID (its index; 0 is the full kernel tree) and a TLB
generation ``gen`` that each unmap from its tree bumps. A CPU's TLB is direct-mapped by page
number; an entry is tagged with (PCID, page) and with the epoch of the CPU's ``seen[pcid]``,
the generation it has flushed that PCID up to. Flushing a PCID is advancing ``seen[pcid]``:
every older entry stops matching, in O(1), like INVPCID.

Switching trees flushes nothing when ``seen[pcid]`` equals the tree's ``gen``. An unmap from
a restricted tree waits only for CPUs *inside* that instance (``current``) to flush: they
answer at their safe points (:meth:`Tlb.service`, the spin transport). A CPU elsewhere
flushes lazily at its next switch into the instance. That needs "store current, then load
gen" on the CPU and "store gen, then load current" on the sender, each with a full fence
between (else both could miss each other: Dekker). Unmaps from the full tree (PCID 0) go to
every online CPU, as flush_tlb_kernel_range() does for global kernel mappings, so switching
back to the full tree needs no fence.
"""
from __future__ import annotations

import os

from asirt.clock import now
from asirt.cpu import Cpu
from asirt.cpu.wait import Outcome
from asirt.errors import AsirtError
from asirt.fence import fence
from asirt.mm.pagetable import PageTables
from asirt.proc import Proc
from shm_layout.asi import CPU_DTYPE, INST_DTYPE, MAX_ASI, TLB_ENTRIES, TLB_WORDS, word
from shm_layout.cpu import Phase
from shm_layout.region import Region

# An entry is two words: tag, then the leaf pte. The tag packs, from the top: a valid bit,
# the PCID, an epoch (the low bits of seen[pcid] when it was filled) and the page number
# va >> 12 (52 bits, unmasked: a mask costs the hit path 10 %). The epoch is short, so a
# PCID's entries are cleared each time its generation crosses a multiple of 32.
VPN_BITS, EPOCH_BITS, PCID_BITS = 52, 5, 6
EPOCH_SHIFT = VPN_BITS
EPOCH_MASK = (1 << EPOCH_BITS) - 1
PCID_SHIFT = EPOCH_SHIFT + EPOCH_BITS
PCID_MASK = (1 << PCID_BITS) - 1
VALID = 1 << (PCID_SHIFT + PCID_BITS)
assert VALID == 1 << 63 and MAX_ASI == 1 << PCID_BITS
TLB_MASK = TLB_ENTRIES - 1
assert TLB_WORDS == 2 and TLB_ENTRIES & TLB_MASK == 0

INST_WORDS = INST_DTYPE.itemsize // 8
GEN = INST_DTYPE.fields["gen"][1] // 8
CPU_WORDS = CPU_DTYPE.itemsize // 8
SEEN_WORDS = CPU_DTYPE["seen"].itemsize // 8     # one per PCID
assert SEEN_WORDS == MAX_ASI


def _cpu_field(name: str) -> int:
    return CPU_DTYPE.fields[name][1] // 8


CURRENT, ONLINE, SEEN, PID = (_cpu_field(f) for f in ("current", "online", "seen", "pid"))
INTR_DEPTH = _cpu_field("intr_depth")

SHOOTDOWN_TIMEOUT_S = 10.0

class ShootdownTimeout(AsirtError):
    """A CPU inside an instance did not flush in time: it is dead, stopped, or never polls."""

    exit_code = 1

    def __init__(self, cpu: int, inst: int, waited_s: float, pid: int, alive: bool) -> None:
        super().__init__(cpu, inst, waited_s, pid, alive)
        self.cpu, self.inst, self.waited_s, self.pid, self.alive = cpu, inst, waited_s, pid, alive

    def message(self) -> str:
        state = "alive but not answering" if self.alive else "dead"
        return (f"TLB shootdown of PCID {self.inst}: CPU slot {self.cpu} (pid {self.pid}, "
                f"{state}) did not flush within {self.waited_s:.1f} s; a worker must answer at "
                f"its safe points (asirt.cpu.safepoint) and go offline before it exits")


class Tlb:
    """CPU ``cpu``'s TLB and its current PCID. Only that CPU's process uses it.

    ``pcid``, ``root``, ``gen`` (= ``seen[pcid]``) and ``tag`` are its registers, what a CR3
    write with a PCID loads; asi_enter sets them inline (a call there costs ~5 % of its
    budget), asi_exit through :meth:`switch_full`.
    """

    def __init__(self, cpu: Cpu, pt: PageTables, full_root: int) -> None:
        region = cpu.region
        self.q, self.pt, self.w = pt.q, pt, cpu.w
        self.rec = word(region, "asi_cpu", cpu.slot)
        self.base = word(region, "asi_cpu", cpu.slot, "tlb")
        self.seen = self.rec + SEEN
        self.ibase = word(region, "asi_inst", 0)
        self.flushes = cpu.c("asi.tlb_flushes")
        self.misses = cpu.c("asi.tlb_misses")
        self.full_root = full_root
        self.pcid, self.root, self.gen, self.tag = 0, full_root, -1, VALID

    def clear(self) -> None:
        """Forget every entry and every PCID's generation (a CPU coming online)."""
        q = self.q
        for i in range(self.base, self.base + TLB_ENTRIES * TLB_WORDS):
            q[i] = 0
        for p in range(self.seen, self.seen + SEEN_WORDS):
            q[p] = 0
        self.switch_full()

    def translate(self, va: int) -> int:
        """The leaf entry for ``va`` in the current tree (0: not mapped): TLB, else a walk."""
        vpn = va >> 12
        e = self.base + ((vpn & TLB_MASK) << 1)
        q = self.q
        if q[e] == vpn | self.tag:
            return q[e + 1]
        return self._fill(va, vpn | self.tag, e)

    def _fill(self, va: int, tag: int, e: int) -> int:
        q = self.q
        pte = self.pt.walk(self.root, va)
        self.w[self.misses] += 1
        if pte and not q[self.rec + INTR_DEPTH]:
            # Tag last, after clearing it first: an interrupted fill is a miss, never a mix.
            # Handlers never fill, so the entry they might read is always whole.
            q[e] = 0
            q[e + 1] = pte
            q[e] = tag
        return pte

    def flush_pcid(self, pcid: int, gen: int) -> None:
        """Flush ``pcid`` up to instance generation ``gen``: entries tagged with an older
        epoch stop matching. When the epoch field wraps, older tags could match again: clear
        that PCID's entries then (once per 2**EPOCH_BITS generations)."""
        q = self.q
        w = self.seen + pcid
        old = q[w]
        q[w] = gen
        self.w[self.flushes] += 1
        if (old ^ gen) >> EPOCH_BITS:
            for e in range(self.base, self.base + TLB_ENTRIES * TLB_WORDS, TLB_WORDS):
                if (q[e] >> PCID_SHIFT) & PCID_MASK == pcid:
                    q[e] = 0

    def switch_full(self) -> None:
        """Run on the full tree (PCID 0). No generation check: full-tree shootdowns reach
        every online CPU, which answers them wherever it runs (service())."""
        g = self.q[self.seen]
        self.pcid, self.root, self.gen = 0, self.full_root, g
        self.tag = VALID | (g & EPOCH_MASK) << EPOCH_SHIFT

    def service(self) -> None:
        """A safe point: answer flush requests for the current PCID and for the full tree."""
        q, p = self.q, self.pcid
        g = q[self.ibase + p * INST_WORDS + GEN]
        if g != self.gen:
            # New registers first, then the ack (seen): nothing on this CPU, not even a
            # signal handler, can use an old entry once a sender sees the ack.
            self.gen = g
            self.tag = VALID | p << PCID_SHIFT | (g & EPOCH_MASK) << EPOCH_SHIFT
            self.flush_pcid(p, g)
        if p:
            g = q[self.ibase + GEN]
            if g != q[self.seen]:
                self.flush_pcid(0, g)


class Shootdowns:
    """The sending side: bump generations under the lock, then wait for the CPUs inside.

    A CPU that sends from its worker (``cpu`` given) waits with its waiter and answers at its
    safe point meanwhile (another sender may be waiting for *it*, and a sibling's stun request
    must not stall behind the shootdown); the parent (``cpu`` None) yields between polls. A
    target found dead at a liveness check is skipped: a dead CPU holds no TLB."""

    def __init__(self, region: Region, cpu: Cpu | None, tlb: Tlb | None, pt: PageTables) -> None:
        self.q, self.cpu, self.tlb = pt.q, cpu, tlb
        self.ibase = word(region, "asi_inst", 0)
        self.cbase = word(region, "asi_cpu", 0)
        self.ncpus = region.section("asi_cpu").count
        self.me = None if cpu is None else cpu.slot
        if cpu is None:
            self.words = self.q
            self.sent, self.avoided = (word(region, "asi_ctl", 0, f) for f in
                                       ("shootdowns_sent", "shootdowns_avoided"))
        else:
            self.words = cpu.w
            self.sent, self.avoided = (cpu.c("asi.shootdowns_sent"),
                                       cpu.c("asi.shootdowns_avoided"))

    def prepare(self, insts: list[int]) -> list[tuple[int, int, int]]:
        """With the lock held, after the unmap: bump each instance's generation and pick who
        must flush now. Returns (cpu, pcid, generation) to pass to :meth:`wait` after unlocking."""
        q, ibase, cbase = self.q, self.ibase, self.cbase
        gens = {}
        for i in insts:
            q[ibase + i * INST_WORDS + GEN] += 1
            gens[i] = q[ibase + i * INST_WORDS + GEN]
        fence()
        targets, avoided = [], 0
        for c in range(self.ncpus):
            rec = cbase + c * CPU_WORDS
            if c == self.me or not q[rec + ONLINE]:
                continue
            if 0 in gens:
                targets.append((c, 0, gens[0]))
            cur = q[rec + CURRENT]
            if cur and cur in gens:
                targets.append((c, cur, gens[cur]))
            elif any(i and q[rec + SEEN + i] for i in gens):
                avoided += 1      # it used a PCID whose tree changed: it flushes at its next entry
        self.words[self.sent] += len(targets)
        self.words[self.avoided] += avoided
        if self.tlb is not None:
            self.tlb.service()
        return targets

    def _pending(self, c: int, pcid: int, g: int) -> bool:
        q, rec = self.q, self.cbase + c * CPU_WORDS
        return q[rec + SEEN + pcid] < g and (not pcid or q[rec + CURRENT] == pcid) \
            and bool(q[rec + ONLINE])

    def wait(self, targets: list[tuple[int, int, int]]) -> None:
        """Until every target flushed to its generation, left the instance, went offline or
        died. Unlocked. ShootdownTimeout past SHOOTDOWN_TIMEOUT_S."""
        for c, pcid, g in targets:
            if self._pending(c, pcid, g):
                self._wait_one(c, pcid, g)

    def _wait_one(self, c: int, pcid: int, g: int) -> None:
        q = self.q
        pid = q[self.cbase + c * CPU_WORDS + PID]
        proc = Proc(pid)
        deadline = now() + int(SHOOTDOWN_TIMEOUT_S * 1e9)
        try:
            if self.cpu is None:
                while self._pending(c, pcid, g):
                    if proc.dead():
                        return
                    if now() > deadline:
                        raise ShootdownTimeout(c, pcid, SHOOTDOWN_TIMEOUT_S, pid, True)
                    os.sched_yield()
                return
            cpu = self.cpu
            # a sibling is waited for as the handshake waits for it: past the ack timeout its
            # liveness is checked, and a dead or stopped one is fenced off (a fenced lane holds
            # no TLB anyone must wait for); a CPU of another core is skipped once dead. A dead
            # CPU stays online in its record (only it writes it): at the first slow tick, not
            # only at the ack timeout, it is found dead, or every later shootdown into its
            # tree would wait out an ack timeout for it
            lane = cpu.slot_of.index(c) if c in cpu.slot_of else -1
            if lane >= 0 and cpu.fenced_mask >> lane & 1:
                return
            wait = cpu.waiter.begin(lane, Phase.SHOOTDOWN, deadline)
            timeouts = cpu.c("cpu.timeouts")
            seen = cpu.w[timeouts]
            n, limit, sp = 0, cpu.waiter.limit, cpu.safepoint
            try:
                while self._pending(c, pcid, g):
                    sp()                         # the TLB's own answer and every other one
                    n += 1
                    if n < limit:
                        continue
                    if n == limit and proc.dead():
                        return
                    r = wait.slow()
                    if r in (Outcome.STOP, Outcome.FENCED):
                        return
                    if r == Outcome.DEADLINE:
                        raise ShootdownTimeout(c, pcid, SHOOTDOWN_TIMEOUT_S, pid, not proc.dead())
                    if cpu.w[timeouts] != seen:  # a liveness check is due: is the target gone?
                        seen = cpu.w[timeouts]
                        if proc.dead():
                            return
            finally:
                wait.done()
        finally:
            proc.close()
