"""The ASI cost benchmark on one pinned CPU: a vCPU of the scenario's VM (asirt.scenarios.asi).

Each round times, one sample each (a timed region includes one clock read, asirt.clock), the
operations whose metric the run measures (``ctx.metric_names``):

- ``walk_tlb_hit``: translate a global page the TLB holds;
- ``walk_full``: a lock-free 4-level walk of the VM's restricted tree (no TLB), a new page
  each round;
- ``asi_exit_enter``: asi_exit to the full tree and asi_enter back: the switch pair, and the
  flush re-entry owes after the unrestricted kernel ran (it is tainted: asirt.cpu.state);
- ``fault_retry``: inside the VM's space, load a sensitive page: fault, asi_exit, walk the
  full tree, load (the re-entry that follows flushes, untimed);
- ``shootdown``: unmap this CPU's local page from the VM's tree, waiting until every other
  CPU inside has flushed (they answer at their safe points between operations); remapping it
  is untimed;
- ``flush``: clear the core buffer with L1D-sized eviction work, as a flush after real work
  pays it: last in the round, after an untimed pass over an L1D's worth of other memory (the
  data an exit handler leaves in L1D), so the eviction buffer is no longer L1D-resident.
"""
from __future__ import annotations

import numpy as np

from asirt.clock import now
from asirt.cpu.buffer import LINE
from asirt.errors import AsirtError
from asirt.mm.asi import Asi
from asirt.mm.spaces import AsiClassId, frames_of
from asirt.mm.memclass import MemClass
from asirt.params import AsiBenchParams
from workers.context import WorkerContext

PARAMS = AsiBenchParams
PROGRESS_EVERY = 16
METRICS = ("walk_tlb_hit", "walk_full", "asi_exit_enter", "fault_retry", "flush", "shootdown")


def run(ctx: WorkerContext, prepared: None) -> None:
    p: AsiBenchParams = ctx.params
    cpu = ctx.make_cpu(p.cpu)
    asi = Asi(ctx.region, cpu)
    cpu.start()
    try:
        asi.online()
        try:
            _measure(ctx, asi, p.domain)
        finally:
            asi.offline()
    finally:
        asi.close()
        cpu.close()


def _measure(ctx: WorkerContext, asi: Asi, domain: int) -> None:
    inst = asi.find(domain, AsiClassId.KVM)
    region = ctx.region
    globals_ = frames_of(region, MemClass.GLOBAL)
    secret = frames_of(region, MemClass.SENSITIVE)
    local = frames_of(region, MemClass.LOCAL, domain)
    if inst is None or not globals_ or not secret or len(local) <= ctx.slot:
        raise AsirtError("the ASI scenario was not initialised (asirt.scenarios.asi.init)")
    unused = lambda v: None  # noqa: E731 - a metric this run does not measure
    rec = {m: ctx.recorder(m) or unused for m in METRICS}
    hit, full, exit_enter = rec["walk_tlb_hit"], rec["walk_full"], rec["asi_exit_enter"]
    fault, flush, shoot = rec["fault_retry"], rec["flush"], rec["shootdown"]
    root = int(asi.insts["root"][inst])
    hot, mine = globals_[0], local[ctx.slot]
    words, progress = ctx.words, ctx.slot_word(ctx.slot, "progress")
    samples = ctx.slot_word(ctx.slot, "samples")
    walk, translate = asi.pt.walk, asi.translate
    safepoint = asi.cpu.safepoint
    other = np.zeros(asi.cpu.buffer.l1d_bytes // 8, np.int64)  # data the "kernel" works on
    line = LINE // 8
    asi.asi_enter(inst)
    n = 0
    while not ctx.stop_requested():
        safepoint()
        translate(hot)
        t0 = now()
        translate(hot)
        hit(now() - t0)

        safepoint()                         # safe points between operations: answer
        va = globals_[n % len(globals_)]
        t0 = now()
        walk(root, va)
        full(now() - t0)

        t0 = now()
        asi.asi_exit()
        asi.asi_enter(inst)
        exit_enter(now() - t0)

        safepoint()
        t0 = now()
        asi.access(secret[n % len(secret)])
        fault(now() - t0)
        asi.asi_enter(inst)                 # tainted by the sensitive load: flushes here

        safepoint()
        asi.access(mine)
        t0 = now()
        asi.unmap_restricted(inst, mine)
        shoot(now() - t0)
        asi.map_restricted(inst, mine)

        other[::line] += 1                  # untimed: fill L1D with other data, so the flush
        t0 = now()                          # starts cold, not right after asi_enter's flush
        asi.flush()
        flush(now() - t0)

        n += 1
        if n % PROGRESS_EVERY == 0:
            words[progress] = n
            words[samples] = n * len(METRICS)
    words[progress] = n
    words[samples] = n * len(METRICS)
