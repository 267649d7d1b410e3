"""The sampling monitor: ``python -m workers --role monitor``.

It takes consistent snapshots of every core's modes and checks S1 and S2 on each
(asirt.cpu.checks.Monitor). It is no sibling of anything: the orchestrator pins every worker
to a CPU, so it shares one with a vCPU worker, and it yields (or sleeps ``interval_us``)
between samples so that worker is never starved.
"""
from __future__ import annotations

from asirt.cpu.checks import Monitor
from asirt.params import MonitorParams
from workers.context import WorkerContext

PARAMS = MonitorParams


def run(ctx: WorkerContext, prepared: None) -> None:
    p: MonitorParams = ctx.params
    mon = Monitor(ctx.region, ctx.slot, [list(c) for c in p.cores])
    try:
        mon.run(interval_s=p.interval_us / 1e6)
    finally:
        ctx.words[ctx.slot_word(ctx.slot, "samples")] = ctx.words[mon.c["samples"]]
