"""The one vCPU loop: KVM's run loop on one pinned lane, driven by a strategy's data.

Per cycle (one VM exit and entry):

1. VM entry: leave the kernel (a HOST period ends: the taints), release a stun held since the
   exit (flush first: R6, R7), the VM-entry barrier B1-B3 if the strategy has one (it flushes
   when this CPU's taints ask for it), or the strategy's own flush; then GUEST.
2. Guest slice: the backend runs the guest for the interval the profile drew; the guest
   samples the core buffer (leaks). A sibling's stun may end the slice early (the CPU parks).
3. VM exit, with the drawn reason: to ASI(d) or HOST as the strategy says; ``always`` (and ASI
   with ``stun_at=exit``) stuns the siblings here.
4. Exit handling: the reason's memory -- a global page, the VM's own local page, a host secret
   -- with the reason's probabilities, and a speculative gadget with probability ``gadgets``
   (the loads of global and local memory and the gadget are part of the handler's time);
   in a restricted tree a secret faults out (asi_exit: the KVM class's exit hook stuns the
   siblings), ``kcs`` untags (stuns) around it. Then the reason's handler time: work (answering
   at the safe point), or for HLT the vCPU halts (the lane idles that long). With probability
   ``to_user`` the exit goes to the user-space VMM first, which leaves ASI. Back in the
   restricted tree (asi_enter: flush if tainted, the enter hook releases the siblings).

Around the cycles a tick scheduler (asirt.kvm.lane) multiplexes one vCPU of each VM on
the lane, switching VMs only in HOST; with ``host_share`` a tick runs a host task (kernel work
on secrets, cookie 0) instead; a lane SMT-off keeps idle. Strategies with cookies run each
vCPU as a core-scheduled task (forced idle beside another cookie, yielding to a patient
sibling at the safe point); strategies with a barrier refuse VM entry beside another VM, and
the lane then picks that VM's vCPU next.

``vm_cycle_overhead`` is the runtime's own cost per cycle: the time from one VM exit to the
next, minus the guest's own time (the drawn interval; for real vCPUs the time inside KVM_RUN)
and the handler time the profile drew (a HLT's halt included).
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np

from asirt.clock import now
from asirt.cpu import ASI, GUEST, HOST
from asirt.kvm.backend import GuestBackend
from asirt.kvm.profile import Profile, sample
from asirt.kvm.strategy import Strategy
from asirt.kvm.vms import Memory
from asirt.mm.asi import Asi
from asirt.mm.spaces import AsiClassId
from asirt.params import KvmParams
from asirt.sync.barrier import Result, SpinBarrier
from asirt.sync.coresched import CoreSched
from asirt.sync.stun import Stun
from shm_layout.counters import COUNTER

__all__ = ["VcpuLoop", "StunGivenUp", "is_interrupt", "METRICS"]

#: the histograms the loop records (a real guest adds asirt.kvm.real.REAL_METRICS)
METRICS = ("exit_handling", "stun_roundtrip", "barrier_wait", "vm_cycle_overhead", "forced_idle")


def _nothing() -> None:
    """Kernel work of no length: a wake-up's way back through HOST."""

Recorder = Callable[[int], None]
_K = {k: COUNTER[f"kvm.{k}"] for k in (
    "cycles", "exits", "exits_restricted", "kicked", "to_user", "halts", "switches",
    "host_tasks", "refused", "guest_ns", "handler_ns", "halt_ns", "barrier_ns", "host_ns",
    "idle_ns", "wall_ns")}
#: safe points of the handler's work: every this many clock reads (about a microsecond)
WORK_POLLS = 8
#: exit reasons handled as interrupts (the ``interrupts`` variant), by name
_INTERRUPTS = ("EXTERNAL_INTERRUPT", "INTR", "NMI", "EXCEPTION_NMI", "PREEMPTION_TIMER")


def is_interrupt(name: str) -> bool:
    return name.upper() in _INTERRUPTS


class StunGivenUp(Exception):
    """A stun request was given up (a live sibling never answered) or the run is stopping: the
    CPU must not go on into the unrestricted kernel."""


class VcpuLoop:
    """One lane's vCPUs under one strategy (module docstring)."""

    def __init__(self, stun: Stun, asi: Asi, strategy: Strategy, params: KvmParams,
                 profile: Profile, mem: Memory, backend: GuestBackend,
                 barrier: SpinBarrier, cs: CoreSched | None,
                 rec: dict[str, Recorder | None]) -> None:
        self.stun, self.asi, self.strat, self.p = stun, asi, strategy, params
        self.cpu = cpu = stun.cpu
        self.state, self.w = cpu.state, cpu.w
        self.mem, self.backend, self.barrier, self.cs = mem, backend, barrier, cs
        self.c = {k: cpu.cnt + v for k, v in _K.items()}
        self.c_wait = cpu.c("stun.wait_ns")
        # time other parts count, taken out of what they happen inside (the time breakdown)
        self.c_parked, self.c_sample = cpu.c("stun.parked_ns"), cpu.c("check.sample_ns")
        self.c_flush_ns, self.c_check_ns = cpu.c("buffer.flush_ns"), cpu.c("check.ns")
        self.c_entry_flush = cpu.c("barrier.flushes")
        barrier.flush_always = strategy.flush_every_entry
        none = lambda v: None  # noqa: E731 - a metric this run does not record
        self.rec_exit = rec.get("exit_handling") or none
        self.rec_stun = rec.get("stun_roundtrip") or none
        self.rec_overhead = rec.get("vm_cycle_overhead") or none
        seed = params.seed * 1000003 + cpu.slot
        d = sample(profile, np.random.default_rng(seed), params.draws)
        self.interval = d.interval_ns.tolist()
        self.reason = d.reason.tolist()
        self.handler = d.handler_ns.tolist()
        self.touch = list(zip(d.touch_global.tolist(), d.touch_local.tolist(),
                              d.touch_sensitive.tolist(), d.to_user.tolist(),
                              (np.random.default_rng(seed + 1).random(params.draws)
                               < params.gadgets).tolist()))
        self.halts = [r.kind == "hlt" for r in profile.reasons]
        self.intr = [is_interrupt(r.name) and params.interrupts == "exit"
                     for r in profile.reasons]
        self.rng = random.Random(seed + 2)
        # asirt stress --strategy: shootdowns among the exits, the own-word audit every cycle,
        # and ``in_host`` (the delay fault) called inside HOST at every known sensitive access
        self.shoot = params.shootdowns if strategy.restricted else 0.0
        self.audit = cpu.guard.audit if params.audit else None
        self.in_host: Callable[[], None] | None = None
        self.i = 0
        self.stun_held = False          # a stun request of this CPU is active
        self.left = False               # this exit left the restricted space
        self.t_exit = 0                 # the last VM exit's time (0: the cycle chain broke)
        self.owed = 0                   # drawn work since then: guest interval, handler time
        if strategy.restricted:
            asi.set_hooks(AsiClassId.KVM, on_enter=self._unstun_hook, on_exit=self._stun_hook)

    # -- stun primitives ----------------------------------------------------------------------
    def _request(self) -> None:
        """R1-R2, timed; the request stays held until :meth:`_release`."""
        t0 = now()
        ok = self.stun.request()
        t = now() - t0
        self.w[self.c_wait] += t
        if not ok:
            raise StunGivenUp()
        self.rec_stun(t)
        self.stun_held = True

    def _release(self) -> None:
        """R6 then R7 (in the protocol's order)."""
        self.stun.unstun()
        self.stun_held = False

    def _stun_hook(self, asi: Asi, inst: int) -> None:
        """The KVM class's exit hook: leaving the restricted space stuns the siblings."""
        self.left = True
        if not self.stun_held:
            self._request()

    def _unstun_hook(self, asi: Asi, inst: int) -> None:
        """The KVM class's enter hook: back in the restricted space (flushed if tainted)."""
        if self.stun_held and self.p.stun_at == "hooks":
            self.stun.release()
            self.stun_held = False

    # -- the cycle ----------------------------------------------------------------------------
    def cycle(self, deadline: int) -> Result | None:
        """One VM entry, guest slice, exit and its handling. None: go on; OK never; DOMAIN:
        a sibling runs another VM (run its vCPU next); STOP; TIMEOUT: the tick is over."""
        w, c = self.w, self.c
        if self.audit is not None:
            self.audit()                       # its own words hold what it wrote (cpu.guard)
        r = self._enter(deadline)
        if r != Result.OK:
            if r == Result.DOMAIN:
                w[c["refused"]] += 1
            self.t_exit = 0
            return r
        i = self.i
        self.i = i + 1 if i + 1 < len(self.interval) else 0
        interval, reason = self.interval[i], self.reason[i]
        before = w[self.c_parked] + w[self.c_sample]
        t0 = now()
        parked = self.backend.run(interval, reason)
        t_exit = now()
        w[c["guest_ns"]] += t_exit - t0 - (w[self.c_parked] + w[self.c_sample] - before)
        w[c["cycles"]] += 1
        if parked:                             # a sibling's stun ended the slice: back in ASI,
            w[c["kicked"]] += 1                # and the next entry goes through the barrier
            self.t_exit = 0
            return None
        if self.t_exit:
            self.rec_overhead(t_exit - self.t_exit - self.backend.ran_ns - self.owed)
        self.t_exit = t_exit
        self._exit()
        self.owed = self._handle(i, reason)
        self.rec_exit(now() - t_exit)
        return None

    def _enter(self, deadline: int) -> Result:
        """Everything between the exit handling and GUEST (module docstring, step 1)."""
        st, state = self.strat, self.state
        if self.stun_held:
            if state.mode == HOST:
                self.stun.leave_host()
            self._release()
        elif state.mode == HOST and (st.barrier or st.flush_tainted):
            state.set(ASI, state.dom)          # the kernel's period ends before a flush
        if st.barrier:
            w = self.w
            before = w[self.c_flush_ns] + w[self.c_check_ns] + w[self.c_parked]
            t0 = now()
            r = self.barrier.enter(deadline - t0 if deadline > t0 else 1)
            w[self.c["barrier_ns"]] += (now() - t0 - (w[self.c_flush_ns] + w[self.c_check_ns]
                                                      + w[self.c_parked] - before))
            return r
        if st.flush_tainted and state.needs_flush(state.dom):
            state.flush(self.c_entry_flush)
        state.enter_guest()
        return Result.OK

    def _exit(self) -> None:
        """The VM exit: to the mode the strategy handles exits in (checking S1/S2 first)."""
        st = self.strat
        self.w[self.c["exits"]] += 1
        self.left = False
        if st.exit_in_asi:
            self.state.exit_guest(ASI)
            if st.restricted and self.p.stun_at == "exit":
                self._request()
        elif st.stun_every_exit:
            self.state.exit_guest(ASI)
            self._request()
            self.stun.enter_host()
        else:
            self.state.exit_guest(HOST)

    def _handle(self, i: int, reason: int) -> int:
        """The exit's handling (module docstring, step 4). Returns the time it was owed by
        the profile (handler work or halt), for the overhead."""
        st, asi, mem = self.strat, self.asi, self.mem
        g, l, s, to_user, gadget = self.touch[i]
        handler = self.handler[i]
        rng = self.rng
        if self.intr[reason] and st.restricted:
            asi.asi_exit()                     # leave ASI explicitly at interrupt entry
        if g or l or gadget:
            t0 = now()                         # the handler's own loads are its work
            if g:
                asi.access(rng.choice(mem.globals))
            if l:
                asi.access(rng.choice(mem.local[self.state.dom]))
            if gadget:
                asi.touch(rng.choice(mem.secrets))  # speculative: loads only what is mapped
            plain = now() - t0
            self.w[self.c["handler_ns"]] += plain
            handler -= plain
        if s:
            self._sensitive(rng.choice(mem.secrets))
        if self.shoot and rng.random() < self.shoot:
            self._shootdown(rng.choice(mem.local[self.state.dom]))
        if to_user:
            self.w[self.c["to_user"]] += 1
            self._leave_for_host()             # the VMM in user space: out of ASI
        if self.halts[reason]:
            self._halt(max(handler, 0))
        elif handler > 0:
            self._work(handler)
        if st.restricted:
            if asi.current == 0:
                asi.asi_enter(self.mem.instance[self.state.dom])   # flush, unstun (hooks)
            if not self.left:
                self.w[self.c["exits_restricted"]] += 1
        return self.handler[i]

    def _sensitive(self, va: int) -> None:
        """A known sensitive access: a fault out of ASI, an untag (kcs), or just the load."""
        st = self.strat
        if st.restricted or not st.stun_sensitive:
            self.asi.access(va)                # restricted: faults, the hook stuns
            if self.in_host is not None:
                self.in_host()
            return
        self._request()                        # kcs: untag = stun
        self.stun.enter_host()
        self.asi.access(va)
        if self.in_host is not None:
            self.in_host()
        self.stun.leave_host()
        self._release()                        # retag

    def _shootdown(self, va: int) -> None:
        """Unmap a page of this VM's own memory from its restricted tree while the siblings in
        it may walk it (each flushes its TLB at its safe point before this returns), then map
        it again: the TLB shootdowns of ``asirt stress --strategy``."""
        inst = self.mem.instance[self.state.dom]
        self.asi.unmap_restricted(inst, va)
        self.asi.map_restricted(inst, va)

    def _leave_for_host(self) -> None:
        st = self.strat
        if st.restricted:
            if self.asi.current:
                self.asi.asi_exit()
        elif st.stun_sensitive and not self.stun_held:
            self._request()
            self.stun.enter_host()
            self.stun.leave_host()
            self._release()

    def _work(self, ns: int) -> None:
        """The handler's work: ``ns`` of it, answering at the safe point (parked time does not
        count as work)."""
        sp = self.cpu.safepoint
        left, t, n = ns, now(), 0
        while left > 0:
            n += 1
            if not n % WORK_POLLS and sp():
                t = now()                      # parked: that was not work
                continue
            t2 = now()
            left -= t2 - t
            t = t2
        self.w[self.c["handler_ns"]] += ns

    def _halt(self, ns: int) -> None:
        """HLT: the vCPU blocks and the lane idles ``ns`` (siblings released first, what the
        kernel left flushed), then wakes through the kernel: the domain changes only in HOST."""
        d = self.state.dom
        w = self.w
        w[self.c["halts"]] += 1
        self.go_idle()
        t0 = now()
        self.cpu.idle_wait(ns)
        w[self.c["halt_ns"]] += now() - t0
        self.kernel(_nothing, d)

    def go_idle(self) -> None:
        """To the idle task (State.go_idle: IDLE keeping the domain, the flush, domain 0),
        then the release of a stun this lane holds (R7; its flush is done)."""
        st = self.strat
        self.state.go_idle(st.flush_tainted or st.flush_every_entry)
        if self.stun_held:
            self._release()

    # -- into the kernel and out ----------------------------------------------------------------
    def switch(self, d: int) -> None:
        """Run VM ``d``'s vCPU next: a domain change, only in HOST (module docstring). The
        cycle chain starts again: the time since the last exit is not this vCPU's overhead."""
        self.t_exit = 0
        state = self.state
        if state.dom == d:
            if self.strat.restricted and self.asi.current == 0:
                self.asi.asi_enter(self.mem.instance[d])
            return
        self.w[self.c["switches"]] += 1
        self.kernel(lambda: state.set_domain(d), d)

    def kernel(self, work: Callable[[], None], d: int) -> None:
        """Sensitive kernel work (a VM switch, a host task): into HOST the strategy's way, the
        work, back out towards VM ``d``'s entry."""
        st, state = self.strat, self.state
        if st.restricted and self.asi.current:
            self.asi.asi_exit()                # the hook stuns
        elif state.mode != HOST:
            if (st.restricted or st.stun_sensitive or st.stun_every_exit) and not self.stun_held:
                self._request()
            if self.stun_held:
                self.stun.enter_host()
            else:
                state.enter_host()
        work()
        if state.dom != d:
            state.set_domain(d)
        if st.restricted:
            self.asi.asi_enter(self.mem.instance[d])     # flush, unstun (hook)

    def start(self) -> bool:
        """Bring the lane up from IDLE: online (the kernel ran before us: HOST), under a stun
        where the strategy stuns (a sibling may be in GUEST already), then into the first VM's
        exit mode. A lane SMT-off keeps idle never runs the kernel at all. False: the run
        stopped (or a sibling never answered) before the stun was had; the lane stays idle."""
        st, state = self.strat, self.state
        if st.one_lane and self.cpu.lane > 0:
            return True
        if st.restricted or st.stun_sensitive or st.stun_every_exit:
            try:
                self._request()
            except StunGivenUp:
                self.stun_held = False
                return False
        self.asi.online()                      # HOST(0), tainted
        d = 1 + self.cpu.lane % self.p.vms
        state.set_domain(d)
        if st.restricted:
            self.asi.asi_enter(self.mem.instance[d])     # flush, unstun (hook)
        elif st.exit_in_asi:
            if self.stun_held:
                self.stun.leave_host()
                self._release()
            else:
                state.set(ASI, d)
        return True

    def stop(self) -> None:
        """Leave the core cleanly: out of GUEST, idle, flushed and released (:meth:`go_idle`).
        Never into HOST on the way out: the run is stopping, so no stun can be waited for, and
        a sibling may still be in GUEST (the hooks come off first, so nothing asks for one)."""
        state = self.state
        if self.strat.restricted:
            self.asi.set_hooks(AsiClassId.KVM)
        if state.mode == GUEST:
            state.exit_guest(ASI)
        self.go_idle()                        # IDLE, flushed, released
        self.asi.offline()
