"""One lane of the KVM workload: ``python -m workers --role vcpu``.

The vCPU loop (asirt.kvm.loop) under one strategy, on this pinned CPU: its stun handshake, its
ASI side, its VM-entry barrier, core scheduling where the strategy has cookies, the guest
backend, and the histograms the run measures (``exit_handling``, ``stun_roundtrip``,
``barrier_wait``, ``vm_cycle_overhead``, ``forced_idle``).

Under ``asirt stress --strategy`` the same loop runs with injected delays at every protocol
step, TLB shootdowns among the exits, the audit of its own words every cycle, and the delay
fault inside HOST (workers/stress.py's :func:`delay_trigger`).
"""
from __future__ import annotations

from dataclasses import replace

from asirt.kvm import strategy
from asirt.kvm.backend import REAL_METRICS, EmulatedGuest, GuestBackend
from asirt.kvm.lane import Lane
from asirt.kvm.loop import METRICS as LOOP_METRICS
from asirt.kvm.loop import VcpuLoop
from asirt.kvm.profile import Profile, parse_toml
from asirt.kvm.vms import Memory
from asirt.mm.asi import Asi
from asirt.params import KvmParams
from asirt.sync.barrier import SpinBarrier
from asirt.sync.corelock import CoreLock
from asirt.sync.coresched import CoreSched
from asirt.sync.stun import Stun
from workers.context import WorkerContext, make_delay
from workers.stress import delay_trigger

PARAMS = KvmParams
METRICS = LOOP_METRICS + REAL_METRICS


def _backend(ctx: WorkerContext, stun: Stun, p: KvmParams, profile) -> GuestBackend:
    """The emulated guest, or real vCPUs through /dev/kvm (asirt.kvm.real)."""
    if p.guest == "kvm":
        from asirt.kvm.real import KvmGuest
        return KvmGuest(stun, ctx.region, p.vms, profile,
                        {m: ctx.recorder(m) for m in METRICS})
    return EmulatedGuest(stun)


def prepare(ctx: WorkerContext) -> tuple[Stun, GuestBackend, Profile]:
    """Before the start barrier: the stun, the guest backend (a real one measures and
    calibrates here, and becomes kickable before any sibling runs), the profile."""
    p: KvmParams = ctx.params
    delay = make_delay(ctx.rng(p.seed), p.delays) if p.delays is not None else None
    # a real vCPU's siblings are kicked out of guest mode (asirt.sync.stun)
    cpu_params = replace(p.cpu, domains=p.vms, kick=p.guest == "kvm")
    stun = ctx.make_stun(cpu_params, strategy.get(p.strategy).protocol, delay)
    try:
        profile = parse_toml(p.profile_toml, "the run's profile")
        return stun, _backend(ctx, stun, p, profile), profile
    except BaseException:
        stun.cpu.close()
        raise


def run(ctx: WorkerContext, prepared: tuple[Stun, GuestBackend, Profile]) -> None:
    p: KvmParams = ctx.params
    stun, backend, profile = prepared
    strat = strategy.get(p.strategy)
    cpu = stun.cpu
    try:
        asi = Asi(ctx.region, cpu)
        lock = CoreLock(cpu) if strat.cookies else None
        try:
            cs = (CoreSched(cpu, lock, rec_forced=ctx.recorder("forced_idle"))
                  if lock is not None else None)
            loop = VcpuLoop(stun, asi, strat, p, profile,
                            Memory.find(asi, p.vms), backend,
                            SpinBarrier(stun, ctx.recorder("barrier_wait")), cs,
                            {m: ctx.recorder(m) for m in METRICS})
            if p.fault_delay_s:
                loop.in_host = delay_trigger(cpu, p.fault_delay_at, p.fault_delay_s)
            cpu.start()
            started = loop.start()
            try:
                if started:
                    Lane(loop).run(ctx.stop_requested)
            finally:
                loop.stop()
                ctx.words[ctx.slot_word(ctx.slot, "samples")] = ctx.words[cpu.c("kvm.cycles")]
                cpu.publish_progress()
        finally:
            asi.close()
            if lock is not None:
                lock.close()
    finally:
        backend.close()
        cpu.close()

