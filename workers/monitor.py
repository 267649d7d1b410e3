"""The sampling monitor: ``python -m workers --role monitor``.

It takes consistent snapshots of every core's modes and checks S1 and S2 on each
(asirt.invariants.Monitor). It is no sibling of anything: the orchestrator pins every worker
to a CPU, so it shares one with a vCPU worker, and it yields (or sleeps ``interval_us``)
between samples so that worker is never starved.

Params: ``cores`` (list of slot lists), ``interval_us`` (default 0: yield after every sample).
"""
from __future__ import annotations

from asirt.invariants import Monitor
from workers.context import WorkerContext


def run(ctx: WorkerContext) -> None:
    p = ctx.params
    mon = Monitor(ctx.region, ctx.slot, [list(c) for c in p["cores"]])
    try:
        mon.run(interval_s=float(p.get("interval_us", 0)) / 1e6)
    finally:
        ctx.words[ctx.slot_word(ctx.slot, "samples")] = \
            ctx.words[mon.c["m_samples"]]
