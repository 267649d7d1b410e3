"""The real guest backend: guest slices and VM exits are KVM_RUN of asirt's guest program
(asirt.kvm.guest) through /dev/kvm, and a sibling's stun kicks the vCPU out of guest mode.

One single-vCPU KVM VM per workload VM, in each lane's process (a KVM VM cannot span
processes); its vCPU runs in the worker's main thread, which blocks the kick signal outside
KVM_RUN (asirt.kvm.vm.Vcpu.enable_kick) and publishes its thread id in ``stun_cpu.vcpu_tid``.
Each slice:

1. the loop has stored GUEST (after the barrier); the backend posts the guest's request --
   copy this core's buffer lanes from the read-only window (the region's pages that hold
   them, mapped at guest-physical WINDOW_GPA), work for the drawn interval (iterations
   calibrated at start), copy them again, then exit the way the drawn reason's ``kind`` says
   (an ``out`` to a port that encodes the reason, a write to unmapped MMIO, or ``hlt``);
2. fence, then look for a pending stun request (a requester that loaded our mode before our
   GUEST store was visible did not kick us: asirt.sync.stun.Stun.kick); if one is pending,
   park without entering;
3. KVM_RUN. Its return is the exit. An INTR return is a kick: ``kick_to_exit`` is recorded
   (the kicking sibling's ``kick_ns`` to now), the stun is answered (the CPU parks: STUNNED,
   ack, wait for the release, back in ASI), the copy made before the work, if finished, is
   looked at, and the slice ends (True); a kick that finds no request (one already
   answered, or a stale signal) re-enters the guest. KVM_RUN is never restarted behind the
   loop's back (asirt.kvm.vm: an EINTR is an Exit);
4. otherwise the exit must be the one requested (GuestFailed if not); the two copies are the
   guest's view of the core buffer at the start and the end of its slice: every foreign
   token in them is a leak (asirt.cpu.checks).

After a kick the vCPU is reset to the program's entry, so the next slice starts afresh.

At start it measures, on this CPU, ``kvm_exit_roundtrip`` (an IO exit and the re-entry, with
no work and no sample: what the C floor asirt.kvmfloor measures too), ``kvm_exit_mmio`` and
``kvm_exit_hlt``, and calibrates the guest's work loop and the cost of its sample.

Where KVM emulates real mode (the development machine's nested kvm_pvm), guest instructions
cost ~0.5 us each: a slice is then at least the two copies (~170 us each for two lanes).
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable

from asirt.clock import now
from asirt.cpu.checks import count_leaks
from asirt.cpu.transport import IPI_SIGNAL
from asirt.errors import AsirtError
from asirt.fence import fence
from asirt.kvm import guest as program
from asirt.kvm.profile import Profile
from asirt.kvm.vm import DEFAULT_PATH, KICK_SIGNAL, PAGE_SIZE, ExitKind, GuestFailed, Vm
from asirt.sync.stun import Stun
from shm_layout import Region
from shm_layout.cpu import LANE_DTYPE

__all__ = ["KvmGuest", "EXIT_KINDS", "unfit"]

assert KICK_SIGNAL == IPI_SIGNAL      # the stun's kick is the IPI the vCPU thread blocks
#: the profile's ``kind`` of a reason -> the exit the guest makes for it
EXIT_KINDS = {"io": ExitKind.IO, "mmio": ExitKind.MMIO, "hlt": ExitKind.HLT}
#: exit round trips of each kind measured at start
ROUNDTRIPS = 200
#: the work-loop calibration runs until one KVM_RUN takes at least this long
CALIBRATE_NS = 2_000_000
Recorder = Callable[[int], None]
_BOTH = program.SAMPLE_BEFORE | program.SAMPLE_AFTER


def _ignore_kick(signum: int, frame: object) -> None:
    """A kick delivered outside KVM_RUN, late: there is nothing to stop."""


class _Vcpu:
    """One VM's vCPU on this lane, with its program and mailbox."""

    def __init__(self, path: str, region: Region, window: tuple[int, int]) -> None:
        self.vm = Vm(program.RAM_SIZE, path=path)
        try:
            self.prog = program.GuestProgram(self.vm)
            self.prog.map_window(region.words, *window)
            self.vcpu = self.prog.vcpu(kick=True)
        except BaseException:
            self.vm.close()
            raise
        self.fresh = False              # reset before the next slice (a kick cut the last)

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()


def unfit(lanes_per_core: int, nreasons: int) -> str | None:
    """Why a real guest cannot run a core of ``lanes_per_core`` lanes under a profile of
    ``nreasons`` exit reasons (None: it can): its exits encode at most IO_CODES reasons, and
    it copies its core's buffer into one SAMPLE_MAX page half."""
    if nreasons > program.IO_CODES:
        return (f"the profile has {nreasons} exit reasons; a real guest encodes at most "
                f"{program.IO_CODES} in its exits")
    need = lanes_per_core * LANE_DTYPE.itemsize
    if need > program.SAMPLE_MAX:
        return (f"a core of {lanes_per_core} lanes has a {need}-byte core buffer; the real "
                f"guest copies at most {program.SAMPLE_MAX} bytes (cores of up to "
                f"{program.SAMPLE_MAX // LANE_DTYPE.itemsize} lanes)")
    return None


class KvmGuest:
    """The guest backend of a lane that runs real vCPUs (module docstring)."""

    name = "kvm"
    ran_ns = 0

    def __init__(self, stun: Stun, region: Region, vms: int, profile: Profile,
                 rec: dict[str, Recorder | None], path: str = DEFAULT_PATH) -> None:
        why = unfit(stun.cpu.nlanes, len(profile.reasons))    # refused before the run, too
        if why is not None:
            raise AsirtError(why)
        self.stun, self.cpu = stun, stun.cpu
        cpu = self.cpu
        first, nwords = cpu.buffer.lanes_span
        start = 8 * first
        page = start - start % PAGE_SIZE
        size = -(-(start + 8 * nwords - page) // PAGE_SIZE) * PAGE_SIZE
        self.sample_off, self.sample_len = start - page, 8 * nwords
        if size > program.WINDOW_MAX:
            raise AsirtError(f"this core's buffer ({self.sample_len} bytes) does not fit the "
                             f"guest's window ({program.WINDOW_MAX} bytes) and sample "
                             f"({program.SAMPLE_MAX})")
        self.reads = cpu.buffer.rebased(first)
        self.kinds = [EXIT_KINDS[r.kind] for r in profile.reasons]
        self.rec_kick = rec.get("kick_to_exit")
        self.vcpus: dict[int, _Vcpu] = {}
        self.w = cpu.w
        self.i_tid = region.word_index("stun_cpu", cpu.slot, "vcpu_tid")
        try:
            for d in range(1, vms + 1):
                self.vcpus[d] = _Vcpu(path, region, (page, size))
            self.seq = 0
            first_vcpu = self.vcpus[1]
            self._roundtrips(first_vcpu, rec)
            self.ns_per_iter, self.sample_ns = self._calibrate(first_vcpu)
        except BaseException:
            self.close()
            raise
        # A kick that comes after close() restored the thread's mask (a sibling that loaded
        # our tid just before) must not kill the worker (SIG_DFL); SIG_IGN would not do: an
        # ignored signal is discarded, a kick during KVM_RUN would be lost.
        signal.signal(KICK_SIGNAL, _ignore_kick)
        self.w[self.i_tid] = threading.get_native_id()   # kickable from now on

    # -- start-up measurements ----------------------------------------------------------------
    def _post(self, v: _Vcpu, kind: ExitKind, code: int, iters: int, sample: bool) -> int:
        """The next pass's request, between two KVM_RUNs (the guest starts it from the top),
        after clearing the answer header: the guest echoes the new seq a few instructions
        before it clears its copy count, and a kick between the two must not pass the last
        pass's copies off as this one's (its leaks would be counted twice)."""
        self.seq = seq = (self.seq + 1) & 0xFFFFFFFF
        v.prog.clear_answer()
        v.prog.post(program.Request(seq, kind, code, self.sample_len if sample else 0,
                                    self.sample_off, _BOTH, iters))
        return seq

    def _run_expecting(self, v: _Vcpu, kind: ExitKind) -> int:
        """KVM_RUN until the requested exit (kicks meanwhile are ignored); its duration."""
        while True:
            t0 = time.perf_counter_ns()
            e = v.vcpu.run()
            t = time.perf_counter_ns() - t0
            if e.kind == kind:
                return t
            if e.kind != ExitKind.INTR:
                raise GuestFailed(f"a {e.kind.name} exit", f"{e} where {kind.name} was asked "
                                  "for", v.vcpu.describe_registers())

    def _roundtrips(self, v: _Vcpu, rec: dict[str, Recorder | None]) -> None:
        for kind, metric in ((ExitKind.IO, "kvm_exit_roundtrip"), (ExitKind.MMIO, "kvm_exit_mmio"),
                             (ExitKind.HLT, "kvm_exit_hlt")):
            record = rec.get(metric)
            self._post(v, kind, 1, 0, False)
            for i in range(ROUNDTRIPS + 10):
                t = self._run_expecting(v, kind)
                if record is not None and i >= 10:    # the first few warm up
                    record(t)

    def _calibrate(self, v: _Vcpu) -> tuple[float, int]:
        """(ns per work iteration, ns the end-of-slice sample adds), on this CPU."""
        self._post(v, ExitKind.HLT, 0, 0, False)
        base = min(self._run_expecting(v, ExitKind.HLT) for _ in range(20))
        self._post(v, ExitKind.HLT, 0, 0, True)
        sample = min(self._run_expecting(v, ExitKind.HLT) for _ in range(5)) - base
        iters = 256
        while True:
            self._post(v, ExitKind.HLT, 0, iters, False)
            t = min(self._run_expecting(v, ExitKind.HLT) for _ in range(3)) - base
            if t >= CALIBRATE_NS or iters >= 1 << 30:
                return max(t, 1) / iters, max(sample, 0)
            iters *= 4

    # -- the slice ------------------------------------------------------------------------------
    def run(self, interval_ns: int, reason: int) -> bool:
        cpu, stun = self.cpu, self.stun
        v = self.vcpus[cpu.state.dom]
        if v.fresh:
            v.vcpu.reset(program.CODE_GPA, program.STACK_TOP)
            v.fresh = False
        kind = self.kinds[reason]
        iters = int((interval_ns - self.sample_ns) / self.ns_per_iter)
        seq = self._post(v, kind, reason, iters if iters > 0 else 0, True)
        self.ran_ns = 0
        fence()                         # our GUEST store before the look for a request
        if stun.answer():
            return True                 # parked before entering: the request was first
        run = v.vcpu.run
        while True:
            t0 = now()
            e = run()
            self.ran_ns += now() - t0
            if e.kind == ExitKind.INTR:
                t = now()
                sent = max((self.w[stun.s_kick_ns[j]] for j in cpu.live), default=0)
                if stun.answer():       # the stun: parked, back in ASI
                    if self.rec_kick is not None and 0 < sent < t:
                        self.rec_kick(t - sent)          # (a stale kick finds no request)
                    v.fresh = True
                    out = v.prog.output()                # what the guest saw before the work
                    if out.seq == seq and out.copies:
                        self._count(out.before)
                    return True
                if len(cpu.safepoint) > 1 and cpu.safepoint.others(stun.index):
                    v.fresh = True      # another mechanism wants the guest stopped
                    return False
                continue                # a kick already answered: back into the guest
            if e.kind != kind or (kind != ExitKind.HLT and e.code != reason):
                raise GuestFailed(f"a {e.kind.name} exit", f"{e} where {kind.name} with code "
                                  f"{reason} was asked for", v.vcpu.describe_registers())
            out = v.prog.output()
            if out.seq != seq or out.copies != 2:
                raise GuestFailed("a stale answer", f"the guest echoed request {out.seq} with "
                                  f"{out.copies} copies, not {seq} with 2",
                                  v.vcpu.describe_registers())
            self._count(out.before)
            self._count(out.after)
            return False

    def _count(self, copy: bytes) -> None:
        """The leaks in one copy of the core buffer the guest made (asirt.cpu.checks)."""
        cpu = self.cpu
        count_leaks(cpu, cpu.buffer.new_leaks(cpu.state.dom, memoryview(copy).cast("q"),
                                              self.reads))

    def close(self) -> None:
        """Not kickable any more, then every vCPU and VM closed (idempotent)."""
        if not self.cpu.region.closed:
            self.w[self.i_tid] = 0
        for v in self.vcpus.values():
            v.close()
        self.vcpus.clear()
