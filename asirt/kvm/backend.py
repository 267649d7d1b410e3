"""The guest backend: the seam between the vCPU loop and whatever runs the guest.

The loop (asirt.kvm.loop) enters GUEST through the CPU's state writer, then asks its backend to
run the guest for a slice and to leave it with the exit reason the profile drew. A backend
returns False when the slice ran to its exit, True when a sibling's stun request ended it first
(the CPU parked -- its exit path is the stun's -- and is back in ASI). While the guest runs it
samples the core buffer as a side-channel attacker would (asirt.cpu.checks.sample_leaks):
every token it sees that its VM may not see is a leak.

- :class:`EmulatedGuest`: the guest is the worker itself, in GUEST, polling its siblings'
  generations at every safe point (spin and sem transports) or busy until the SIGUSR1 handler
  parks it (signal transport), for the drawn interval of wall time; it looks at the core
  buffer every ``SAMPLE_EVERY`` clock reads and at the end of the slice.
- the real KVM guest (asirt.kvm.real) runs a real guest through /dev/kvm: real VM entries and
  exits, kicked out of guest mode by a real signal.
"""
from __future__ import annotations

from typing import Protocol

from asirt.clock import now
from asirt.cpu.checks import sample_leaks
from asirt.sync.guest import guest_busy, guest_poll
from asirt.sync.stun import Stun

__all__ = ["GuestBackend", "EmulatedGuest", "SLICE_CHECK_EVERY", "SAMPLE_EVERY", "REAL_METRICS"]

#: what a real guest (asirt.kvm.real) adds to the loop's metrics (asirt.kvm.loop.METRICS)
REAL_METRICS = ("kvm_exit_roundtrip", "kvm_exit_mmio", "kvm_exit_hlt", "kick_to_exit")

#: guest polls between clock reads: a slice ends within about a microsecond of its interval
SLICE_CHECK_EVERY = 8
#: clock reads between the guest's looks at the core buffer (about every 10 us), besides the
#: one at the end of every slice
SAMPLE_EVERY = 16


class GuestBackend(Protocol):
    name: str
    #: how long the last slice ran the guest itself (the emulated guest: its drawn interval;
    #: a real one: the time inside KVM_RUN), which vm_cycle_overhead leaves out
    ran_ns: int

    def run(self, interval_ns: int, reason: int) -> bool:
        """Run the guest (the CPU is in GUEST) for ``interval_ns``, then exit with ``reason``.
        True when a sibling's stun ended the slice first (the CPU is parked, back in ASI)."""

    def close(self) -> None: ...


class EmulatedGuest:
    """The worker is the guest: it polls at safe points (or is interrupted) for the interval."""

    name = "emulated"

    def __init__(self, stun: Stun) -> None:
        self.stun = stun
        self.cpu = stun.cpu
        self._guest = guest_busy if self.cpu.transport.kind == "signal" else guest_poll
        self.c_sample_ns = self.cpu.c("check.sample_ns")

    ran_ns = 0

    def run(self, interval_ns: int, reason: int) -> bool:
        cpu, w, c_ns = self.cpu, self.cpu.w, self.c_sample_ns
        start = now()
        deadline = start + interval_ns
        k = 0

        def until() -> bool:
            # the attacker probes all through its slice, not only at its end: a slice a
            # sibling's stun ends early saw what was in the buffer until then
            nonlocal k
            t = now()
            if t >= deadline:
                return True
            k += 1
            if k >= SAMPLE_EVERY:
                k = 0
                sample_leaks(cpu)
                w[c_ns] += now() - t
            return False

        if self._guest(self.stun, until, SLICE_CHECK_EVERY):
            return True
        t = now()
        # the guest's time as measured, at most the drawn interval (the overshoot is the
        # runtime's): a slice core scheduling's yield ended early ran less than it drew
        self.ran_ns = min(interval_ns, t - start)
        sample_leaks(cpu)                # what the attacker saw at the end of its slice
        w[c_ns] += now() - t
        return False

    def close(self) -> None:
        pass
