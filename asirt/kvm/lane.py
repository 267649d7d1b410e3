"""The tick scheduler of one lane: what its vCPU loop (asirt.kvm.loop) runs, tick by tick.

Each tick of ``tick_ms`` runs one VM's vCPU (cycles of :meth:`VcpuLoop.cycle` until the tick
ends), or with probability ``host_share`` a host task (kernel work on host secrets, cookie 0),
or nothing at all on a lane SMT-off keeps idle. The lanes of a core take the VMs in turn, and
switch VMs only in HOST (:meth:`VcpuLoop.switch`). Where VM placement matters -- a barrier's
B3 refuses VM entry beside another VM, core scheduling runs one cookie per core -- a lane runs
the VM its lowest sibling runs, as the kernel's core scheduler picks one cookie for the core.
Strategies with cookies run each vCPU and host task as a core-scheduled task: forced idle
beside another cookie, yielding to a patient sibling at the safe point.
"""
from __future__ import annotations

import os
from typing import Callable

from asirt.clock import now
from asirt.kvm.loop import WORK_POLLS, StunGivenUp, VcpuLoop
from asirt.sync.barrier import Result
from asirt.sync.coresched import HOST_COOKIE

__all__ = ["Lane"]


class Lane:
    """One lane's ticks over its vCPU loop ``loop`` (module docstring)."""

    def __init__(self, loop: VcpuLoop) -> None:
        self.loop = loop
        self.prefer = 0                 # a VM whose vCPU to run next (a sibling runs it)

    def run(self, until: Callable[[], bool]) -> None:
        """The lane's life: ticks of one vCPU, a host task, or idle, until ``until()``."""
        loop = self.loop
        p, st, cpu, w, c = loop.p, loop.strat, loop.cpu, loop.w, loop.c
        tick = int(p.tick_ms * 1e6)
        vms = list(range(1, p.vms + 1))
        k = cpu.lane % len(vms)                # lanes start on different VMs
        t_start = now()
        idle_lane = st.one_lane and cpu.lane > 0
        follow = st.barrier or st.cookies      # core-wide VM selection (module docstring)
        try:
            while not until():
                end = now() + tick
                try:
                    if idle_lane:
                        self._idle(end)
                    elif loop.rng.random() < p.host_share:
                        self._host_task(end)
                    else:
                        d = self.prefer or (follow and self._leader_vm()) or vms[k % len(vms)]
                        self.prefer = 0
                        k += 1
                        self._run_vcpu(d, end, until)
                except StunGivenUp:
                    # released unused (asirt.sync.stun): nothing sensitive ran; the run is
                    # stopping, or a live sibling never answered (stun.aborts counts it)
                    loop.stun_held = False
                cpu.publish_progress()
        finally:
            w[c["wall_ns"]] += now() - t_start

    def _admit(self, cookie: int, end: int) -> bool:
        """Core scheduling: may a task of ``cookie`` run here now? When not at once, the lane
        is forced idle -- the idle task runs, nothing of ours is held -- until it may or the
        tick ends (False)."""
        cs = self.loop.cs
        if cs is None or cs.run_task(cookie, 0):
            return True
        self.loop.go_idle()
        return cs.run_task(cookie, max(end - now(), 0))

    def _run_vcpu(self, d: int, end: int, until: Callable[[], bool]) -> None:
        loop = self.loop
        cs = loop.cs
        if not self._admit(d, end):
            return
        try:
            loop.switch(d)
            while now() < end and not until():
                r = loop.cycle(end)
                if r == Result.DOMAIN:
                    lead = self._leader_vm()
                    if lead:                   # a lower lane runs another VM: follow it
                        self.prefer = lead
                        break
                    loop.cpu.safepoint()       # we lead: the others follow; wait for them
                    os.sched_yield()
                elif r in (Result.STOP, Result.TIMEOUT):
                    break
                if cs is not None and cs.yield_now:
                    break
        finally:
            if cs is not None:
                cs.stop_task()

    def _leader_vm(self) -> int:
        """The VM of the lowest lane that runs one other than ours, if that lane is below ours
        (0: we lead, or nobody runs another). One lane decides, so two lanes never chase each
        other's VM."""
        loop = self.loop
        cpu, mine = loop.cpu, loop.state.dom
        for j in sorted(cpu.live):
            if j > cpu.lane:
                break
            e = cpu.w[cpu.s_dom[j]]
            if 0 < e <= loop.p.vms and e != mine:
                return e
        return 0

    def _host_task(self, end: int) -> None:
        """A tick of kernel work on host secrets (cookie 0), the strategy's way into HOST."""
        loop = self.loop
        cs, state, w = loop.cs, loop.state, loop.w
        if not self._admit(HOST_COOKIE, end):
            return
        d = state.dom or 1
        w[loop.c["host_tasks"]] += 1
        t0 = now()
        try:
            def work() -> None:
                state.set_domain(0)
                sp, secrets, rng, access = loop.cpu.safepoint, loop.mem.secrets, loop.rng, \
                    loop.asi.access
                while now() < end:
                    access(rng.choice(secrets))
                    for _ in range(WORK_POLLS):
                        sp()
                state.set_domain(d)
            loop.kernel(work, d)
        finally:
            w[loop.c["host_ns"]] += now() - t0
            if cs is not None:
                cs.stop_task()

    def _idle(self, end: int) -> None:
        """Nothing to run on this lane (SMT off): idle in the kernel, woken by IPIs."""
        loop = self.loop
        loop.go_idle()
        t0 = now()
        left = end - t0
        if left > 0:
            loop.cpu.idle_wait(left)
        loop.w[loop.c["idle_ns"]] += now() - t0
