"""One pinned CPU: the layer every mechanism plugs into.

Layering: this package imports shm_layout and asirt's host modules below it (clock, fence,
proc, params, errors) only -- never asirt.mm, asirt.sync, asirt.kvm, the workers, scenarios,
the orchestrator or the CLI (tests/test_layering.py enforces it).

- :mod:`asirt.cpu.cpu`        the CPU's handle (:class:`Cpu`), its view of its siblings, fencing
- :mod:`asirt.cpu.state`      the only writer of its mode word; deposit periods; taints; flush
- :mod:`asirt.cpu.buffer`     the one core buffer (tokens, L1D-sized eviction), dirty_for(domain)
- :mod:`asirt.cpu.wait`       the one waiting discipline (spin-then-yield, liveness, deadline)
- :mod:`asirt.cpu.safepoint`  the one safe point every mechanism answers at
- :mod:`asirt.cpu.transport`  spin / signal / sem delivery and the idle wait
- :mod:`asirt.cpu.checks`     the S1-S3 checkers and the event ring
"""
from __future__ import annotations

from asirt.cpu.buffer import setup as _buffer_setup
from asirt.cpu.cpu import Cpu
from asirt.cpu.state import ASI, GUEST, HOST, IDLE, STUNNED, Taint
from shm_layout import Region, Section

__all__ = ["Cpu", "sections", "setup", "cores_of", "IDLE", "HOST", "ASI", "GUEST", "STUNNED", "Taint"]


def sections(nslots: int, ncores: int) -> list[Section]:
    """The region sections a run's CPUs need, besides the base ones."""
    return [Section("cpu_state", nslots), Section("core_buf", max(ncores, 1)),
            Section("cpu_events", nslots)]


def cores_of(region: Region) -> list[list[int]]:
    """The slots of each core's lanes, as the base ``cores`` section records them."""
    rec = region.array("cores")
    return [[int(s) for s in r["cpus"][:int(r["nsiblings"])]] for r in rec if r["nsiblings"]]


def setup(region: Region) -> None:
    """Parent, before workers start, from the ``cores`` section: each slot's core and lane,
    each core's buffer. Slots in no core (a monitor) keep core -1."""
    state = region.array("cpu_state")
    state["core"] = -1
    cores = cores_of(region)
    for k, slots in enumerate(cores):
        for lane, s in enumerate(slots):
            state[s]["core"], state[s]["lane"] = k, lane
    l1d = int(region.array("cores")["l1d_bytes"][0]) if cores else 0
    _buffer_setup(region, cores, l1d)
