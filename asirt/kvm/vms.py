"""The KVM workload's memory: each VM's ASI instance and local pages, the host's secrets and the
globally non-sensitive pages every exit handler may use.

The parent builds it before workers start (:func:`setup`); each worker finds it again
(:class:`Memory`), by class and owner, in frame order, so both sides agree without passing
addresses around. VM d is security domain d (1..vms); its instance is the kvm-class ASI
instance of domain d (asirt.mm.spaces).
"""
from __future__ import annotations

from dataclasses import dataclass

from asirt import mm
from asirt.mm.memclass import MemClass
from asirt.mm.spaces import AddressSpaces, AsiClassId, frames_of
from asirt.errors import AsirtError
from shm_layout import Region

__all__ = ["GLOBAL_PAGES", "SECRET_PAGES", "LOCAL_PAGES", "setup", "Memory", "sections"]

GLOBAL_PAGES = 16       # globally non-sensitive kernel data (every restricted tree maps it)
SECRET_PAGES = 16       # sensitive host data (no restricted tree maps it)
LOCAL_PAGES = 8         # per VM: its own local non-sensitive data (its trees map it)


def sections(nslots: int, vms: int) -> list:
    """The address-space sections, sized for ``vms`` VMs."""
    frames = GLOBAL_PAGES + SECRET_PAGES + LOCAL_PAGES * vms + 8
    tables = 16 + 8 * (vms + 1)
    return mm.sections(nslots, frames, tables)


def setup(region: Region, vms: int) -> None:
    """Parent, before workers start: the trees, one kvm-class instance per VM, the pages."""
    mm.setup(region)
    spaces = AddressSpaces(region)
    try:
        for d in range(1, vms + 1):
            spaces.asi_init(d, AsiClassId.KVM)
        for _ in range(GLOBAL_PAGES):
            spaces.alloc_page(MemClass.GLOBAL)
        for _ in range(SECRET_PAGES):
            spaces.alloc_page(MemClass.SENSITIVE)
        for d in range(1, vms + 1):
            for _ in range(LOCAL_PAGES):
                spaces.alloc_page(MemClass.LOCAL, d)
        spaces.check()
    finally:
        spaces.close()


@dataclass(frozen=True)
class Memory:
    """What a worker needs of the workload's memory: addresses by class, instances by VM."""
    globals: tuple[int, ...]
    secrets: tuple[int, ...]
    local: dict[int, tuple[int, ...]]     # VM -> its local pages
    instance: dict[int, int]              # VM -> its kvm-class ASI instance

    @classmethod
    def find(cls, spaces: AddressSpaces, vms: int) -> "Memory":
        region = spaces.region
        inst = {d: spaces.find(d, AsiClassId.KVM) for d in range(1, vms + 1)}
        mem = cls(tuple(frames_of(region, MemClass.GLOBAL)),
                  tuple(frames_of(region, MemClass.SENSITIVE)),
                  {d: tuple(frames_of(region, MemClass.LOCAL, d)) for d in range(1, vms + 1)},
                  {d: i for d, i in inst.items() if i is not None})
        if (len(mem.instance) != vms or not mem.globals or not mem.secrets
                or any(not pages for pages in mem.local.values())):
            raise AsirtError("the KVM workload's memory was not set up (asirt.kvm.vms.setup)")
        return mem
