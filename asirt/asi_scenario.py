"""`asirt bench asi`: what the ASI cost benchmark needs in the region, and its parent-side setup.

One VM (domain ``VM_DOMAIN``) has a vCPU on every selected CPU, all sharing its kvm-class
instance. The parent allocates, before workers start: ``GLOBAL_PAGES`` global pages (walked
and translated), ``SENSITIVE_PAGES`` sensitive pages (touched to fault), and one local page of
the VM per CPU (each CPU unmaps and remaps its own, to time a shootdown of the CPUs inside).
Workers find the pages with :func:`pages` (frames in pool order); see workers/asi.py.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from asirt import uarch
from asirt.asi import Asi, AsiClassId, counters, frame_va, setup
from asirt.errors import BadInput
from asirt.memclass import MemClass
from shm_layout import asi as layout  # registers the ASI sections
from shm_layout.region import Region
from shm_layout.sections import Section

METRICS = ["walk_tlb_hit", "walk_full", "asi_enter_exit", "fault_retry", "flush", "shootdown"]
VM_DOMAIN = 1
GLOBAL_PAGES = 64
SENSITIVE_PAGES = 16
DEFAULT_FRAMES = 1024
DEFAULT_TABLES = 256

__all__ = ["METRICS", "VM_DOMAIN", "sections", "init", "pages", "counters", "Pages"]


def _param(params: dict[str, Any], name: str, default: int, least: int) -> int:
    v = params.get(name, default)
    if not isinstance(v, int) or v < least:
        raise BadInput(f"params[{name!r}] = {v!r}", f"must be an integer >= {least}")
    return v


def sections(ncpus: int, ncores: int, params: dict[str, Any]) -> list[Section]:
    """The region sections the ASI state needs, besides the base ones ("slots" is required)."""
    frames = _param(params, "asi_frames", DEFAULT_FRAMES, 1)
    tables = _param(params, "asi_tables", DEFAULT_TABLES, 2)
    return [Section("asi_ctl", 1), Section("asi_frames", frames),
            Section("asi_ptmeta", tables), Section("asi_tables", tables),
            Section("asi_inst", layout.MAX_ASI), Section("asi_cpu", ncpus),
            Section("asi_uarch", max(ncores, 1))]


def init(region: Region, topology_cores: list[list[int]], l1d_bytes: int,
         params: dict[str, Any]) -> None:
    """Parent, after creating the region and before workers start: lock, trees, pages."""
    setup(region, topology_cores)
    uarch.setup(region, topology_cores, l1d_bytes)
    ncpus = region.section("asi_cpu").count
    asi = Asi(region)
    try:
        asi.asi_init(VM_DOMAIN, AsiClassId.KVM)
        for _ in range(_param(params, "asi_global_pages", GLOBAL_PAGES, 1)):
            asi.alloc_page(MemClass.GLOBAL)
        for _ in range(SENSITIVE_PAGES):
            asi.alloc_page(MemClass.SENSITIVE)
        for _ in range(ncpus):
            asi.alloc_page(MemClass.LOCAL, VM_DOMAIN)
        asi.check()
    finally:
        asi.close()


class Pages(NamedTuple):
    globals: list[int]
    sensitive: list[int]
    local: list[int]      # the VM's local pages, one per CPU slot


def pages(region: Region) -> Pages:
    """The scenario's pages, by class, in frame order."""
    a = region.array("asi_frames")

    def of(cls: MemClass, owner: int) -> list[int]:
        pfns = np.flatnonzero((a["cls"] == cls) & (a["owner"] == owner))
        return [frame_va(int(p), cls) for p in pfns]

    return Pages(of(MemClass.GLOBAL, 0), of(MemClass.SENSITIVE, 0),
                 of(MemClass.LOCAL, VM_DOMAIN))
