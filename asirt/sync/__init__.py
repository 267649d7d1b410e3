"""Sibling synchronization: the stun handshake, the VM-entry barriers, the core lock and core
scheduling. Each plugs into one pinned CPU (asirt.cpu): it answers at the CPU's safe point,
changes modes through the CPU's state writer and waits with its waiter.

Layering: imports asirt.cpu and the host modules below it; never asirt.mm (address spaces are
a peer), asirt.kvm, the workers, scenarios, the orchestrator or the CLI.
"""
from __future__ import annotations

from shm_layout import Region, Section

__all__ = ["sections", "setup"]


def sections(nslots: int, ncores: int) -> list[Section]:
    """The region sections the handshake and the core records need."""
    return [Section("stun_cpu", nslots), Section("core_sync", max(ncores, 1))]


def setup(region: Region, cores: list[list[int]]) -> None:
    """Parent, before workers start: each core record's lane count."""
    rec = region.array("core_sync")
    for k, slots in enumerate(cores):
        rec[k]["nlanes"] = len(slots)
