"""Memory: classes of physical frames, x86-64-style page tables in the region, PCIDs and TLB
shootdown, and Address Space Isolation per CPU.

Layering: imports asirt.cpu (ASI switches the CPU's mode and loads into its core buffer
through it) and the host modules below it; never asirt.sync (the stun plugs into ASI through
the class hooks), asirt.kvm, the workers, scenarios, the orchestrator or the CLI.
"""
from __future__ import annotations

from shm_layout import Region, Section
from shm_layout.asi import MAX_ASI

__all__ = ["sections", "setup", "DEFAULT_FRAMES", "DEFAULT_TABLES"]

DEFAULT_FRAMES = 1024
DEFAULT_TABLES = 256


def sections(nslots: int, frames: int = DEFAULT_FRAMES, tables: int = DEFAULT_TABLES) -> list[Section]:
    """The region sections address spaces need: the frame and table pools, the instances and
    each CPU's TLB."""
    if frames < 1 or tables < 2:
        raise ValueError(f"frames {frames} (at least 1), tables {tables} (at least 2)")
    return [Section("asi_ctl", 1), Section("asi_frames", frames),
            Section("asi_ptmeta", tables), Section("asi_tables", tables),
            Section("asi_inst", MAX_ASI), Section("asi_cpu", nslots)]


def setup(region: Region) -> None:
    """Parent, before workers start: the page-table lock, the full tree and the template."""
    from asirt.mm.spaces import setup as _setup
    _setup(region)
