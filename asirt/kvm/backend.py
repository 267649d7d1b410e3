"""The guest backend: the seam between the vCPU loop and whatever runs the guest.

The loop (asirt.kvm.loop) enters GUEST through the CPU's state writer, then asks its backend to
run the guest for a slice and to leave it with the exit reason the profile drew. A backend
returns False when the slice ran to its exit, True when a sibling's stun request ended it first
(the CPU parked -- its exit path is the stun's -- and is back in ASI). While the guest runs it
samples the core buffer as a side-channel attacker would (asirt.cpu.checks.sample_leaks):
every token it sees that its VM may not see is a leak.

- :class:`EmulatedGuest`: the guest is the worker itself, in GUEST, polling its siblings'
  generations at every safe point (spin and sem transports) or busy until the SIGUSR1 handler
  parks it (signal transport), for the drawn interval of wall time.
- the real KVM guest (asirt.kvm.real) runs a real guest through /dev/kvm: real VM entries and
  exits, kicked out of guest mode by a real signal.
"""
from __future__ import annotations

from typing import Protocol

from asirt.clock import now
from asirt.cpu.checks import sample_leaks
from asirt.sync.guest import guest_busy, guest_poll
from asirt.sync.stun import Stun

__all__ = ["GuestBackend", "EmulatedGuest", "SLICE_CHECK_EVERY"]

#: guest polls between clock reads: a slice ends within about a microsecond of its interval
SLICE_CHECK_EVERY = 8


class GuestBackend(Protocol):
    name: str

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

    def run(self, interval_ns: int, reason: int) -> bool:
        deadline = now() + interval_ns
        if self._guest(self.stun, lambda: now() >= deadline, SLICE_CHECK_EVERY):
            return True
        t = now()
        sample_leaks(self.cpu)           # what the attacker saw in its slice
        self.cpu.w[self.c_sample_ns] += now() - t
        return False

    def close(self) -> None:
        pass
