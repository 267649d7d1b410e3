"""One lane of the KVM workload: ``python -m workers --role vcpu``.

The vCPU loop (asirt.kvm.loop) under one strategy, on this pinned CPU: its stun handshake, its
ASI side, its VM-entry barrier, core scheduling where the strategy has cookies, the guest
backend, and the histograms the run measures (``exit_handling``, ``stun_roundtrip``,
``barrier_wait``, ``vm_cycle_overhead``, ``forced_idle``).
"""
from __future__ import annotations

from dataclasses import replace

from asirt.kvm import strategy
from asirt.kvm.backend import EmulatedGuest
from asirt.kvm.loop import VcpuLoop
from asirt.kvm.profile import parse_toml
from asirt.kvm.vms import Memory
from asirt.mm.asi import Asi
from asirt.params import KvmParams
from asirt.sync.barrier import SpinBarrier
from asirt.sync.corelock import CoreLock
from asirt.sync.coresched import CoreSched
from asirt.sync.stun import Stun
from workers.context import WorkerContext

PARAMS = KvmParams
METRICS = ("exit_handling", "stun_roundtrip", "barrier_wait", "vm_cycle_overhead", "forced_idle")


def prepare(ctx: WorkerContext) -> Stun:
    p: KvmParams = ctx.params
    return ctx.make_stun(replace(p.cpu, domains=p.vms), strategy.get(p.strategy).protocol)


def run(ctx: WorkerContext, stun: Stun) -> None:
    p: KvmParams = ctx.params
    strat = strategy.get(p.strategy)
    cpu = stun.cpu
    asi = Asi(ctx.region, cpu)
    lock = CoreLock(cpu) if strat.cookies else None
    try:
        cs = (CoreSched(cpu, lock, rec_forced=ctx.recorder("forced_idle"))
              if lock is not None else None)
        loop = VcpuLoop(stun, asi, strat, p, parse_toml(p.profile_toml, "the run's profile"),
                        Memory.find(asi, p.vms), EmulatedGuest(stun),
                        SpinBarrier(stun, ctx.recorder("barrier_wait")), cs,
                        {m: ctx.recorder(m) for m in METRICS})
        cpu.start()
        loop.start()
        try:
            loop.run(ctx.stop_requested)
        finally:
            loop.stop()
            ctx.words[ctx.slot_word(ctx.slot, "samples")] = ctx.words[cpu.c("kvm.cycles")]
            cpu.publish_progress()
    finally:
        asi.close()
        if lock is not None:
            lock.close()
        cpu.close()
