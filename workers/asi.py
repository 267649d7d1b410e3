"""The ASI cost benchmark on one pinned CPU: a vCPU of the scenario's VM (asirt.asi_scenario).

Each round times, one sample each (a timed region includes one clock read, asirt.clock):

- ``walk_tlb_hit``: translate a global page the TLB holds;
- ``walk_full``: a lock-free 4-level walk of the VM's restricted tree (no TLB), a new page
  each round;
- ``asi_enter_exit``: asi_enter + asi_exit from the full tree, with nothing to flush;
- ``fault_retry``: inside the VM's space, load a sensitive page: fault, asi_exit, walk the
  full tree, load (the re-entry that follows flushes, untimed);
- ``shootdown``: unmap this CPU's local page from the VM's tree, waiting until every other
  CPU inside has flushed (they answer at the ``service()`` between their operations);
  remapping it is untimed;
- ``flush``: clear the core buffer with L1D-sized eviction work, as a flush after real work
  pays it: last in the round, after an untimed pass over an L1D's worth of other memory (the
  data an exit handler leaves in L1D), so the eviction buffer is no longer L1D-resident. A
  flush timed right after another one (asi_enter's) would be the best case: a hot buffer.
"""
from __future__ import annotations

import numpy as np

from asirt.asi import Asi, AsiClassId
from asirt.asi_scenario import METRICS, VM_DOMAIN, pages
from asirt.clock import now
from asirt.errors import AsirtError
from asirt.histogram import recorder
from asirt.uarch import LINE
from workers.context import WorkerContext

PROGRESS_EVERY = 16


def run(ctx: WorkerContext) -> None:
    asi = Asi(ctx.region, ctx.slot)
    try:
        asi.online()
        try:
            _measure(ctx, asi)
        finally:
            asi.offline()
    finally:
        asi.close()


def _measure(ctx: WorkerContext, asi: Asi) -> None:
    inst = asi.find(VM_DOMAIN, AsiClassId.KVM)
    p = pages(ctx.region)
    if inst is None or not p.globals or not p.sensitive or len(p.local) <= ctx.slot:
        raise AsirtError("the ASI scenario was not initialised (asirt.asi_scenario.init)")
    rec = {m: recorder(ctx.words, ctx.hist_base(m)) for m in METRICS}
    hit, full, enter_exit = rec["walk_tlb_hit"], rec["walk_full"], rec["asi_enter_exit"]
    fault, flush, shoot = rec["fault_retry"], rec["flush"], rec["shootdown"]
    root = int(asi.insts["root"][inst])
    hot, walked, secret, mine = p.globals[0], p.globals, p.sensitive, p.local[ctx.slot]
    words, progress = ctx.words, ctx.slot_word(ctx.slot, "progress")
    samples = ctx.slot_word(ctx.slot, "samples")
    walk, translate = asi.pt.walk, asi.translate
    other = np.zeros(asi.buf.l1d_bytes // 8, np.int64)   # data the round's "kernel" works on
    line = LINE // 8
    asi.asi_enter(inst)
    n = 0
    while not ctx.stop_requested():
        asi.service()
        translate(hot)
        t0 = now()
        translate(hot)
        hit(now() - t0)

        asi.service()                       # safe points between operations: answer
        va = walked[n % len(walked)]
        t0 = now()
        walk(root, va)
        full(now() - t0)

        asi.asi_exit()
        t0 = now()
        asi.asi_enter(inst)
        asi.asi_exit()
        enter_exit(now() - t0)
        asi.asi_enter(inst)

        asi.service()
        t0 = now()
        asi.access(secret[n % len(secret)])
        fault(now() - t0)
        asi.asi_enter(inst)                 # tainted by the sensitive load: flushes here

        asi.service()
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
