"""``asirt bench asi``: one VM (domain ``VM_DOMAIN``) with a vCPU on every selected CPU, all
sharing its kvm-class ASI instance (workers/asi.py times the operations).

The parent allocates, before workers start: ``GLOBAL_PAGES`` global pages (walked and
translated), ``SENSITIVE_PAGES`` sensitive pages (touched to fault), and one local page of the
VM per CPU (each CPU unmaps and remaps its own, to time a shootdown of the CPUs inside).
"""
from __future__ import annotations

from typing import Iterator

from asirt import collect, histogram, mm, orchestrator
from asirt.cpu.buffer import DEFAULT_L1D
from asirt.mm.spaces import AddressSpaces, AsiClassId, parent_counters
from asirt.mm.memclass import MemClass
from asirt.orchestrator import RunSpec, WorkerSpec
from asirt.params import AsiBenchParams
from asirt.progress import ProgressLine
from asirt.results import Entry
from asirt.scenarios import Options
from asirt.topology import Topology
from shm_layout import Region

__all__ = ["METRICS", "VM_DOMAIN", "init", "count", "run"]

METRICS = ["walk_tlb_hit", "walk_full", "asi_exit_enter", "fault_retry", "flush", "shootdown"]
VM_DOMAIN = 1
GLOBAL_PAGES = 64
SENSITIVE_PAGES = 16
_COUNTERS = ("asi.enters", "asi.exits", "asi.faults", "asi.flushes", "buffer.flushes",
             "cpu.idle_flushes", "asi.tlb_flushes", "asi.tlb_misses", "asi.shootdowns_sent",
             "asi.shootdowns_avoided")


def init(region: Region, ncpus: int, global_pages: int = GLOBAL_PAGES) -> None:
    """Parent, after creating the region and before workers start: trees, instance, pages."""
    mm.setup(region)
    asi = AddressSpaces(region)
    try:
        asi.asi_init(VM_DOMAIN, AsiClassId.KVM)
        for _ in range(global_pages):
            asi.alloc_page(MemClass.GLOBAL)
        for _ in range(SENSITIVE_PAGES):
            asi.alloc_page(MemClass.SENSITIVE)
        for _ in range(ncpus):
            asi.alloc_page(MemClass.LOCAL, VM_DOMAIN)
        asi.check()
    finally:
        asi.close()


def count(topo: Topology, opts: Options) -> int:
    return 1


def run(topo: Topology, opts: Options, progress: ProgressLine | None = None) -> Iterator[Entry]:
    cpus = list(topo.cpus)
    slot = {cpu: i for i, cpu in enumerate(cpus)}
    cores = [[slot[c] for c in core] for core in topo.usable_cores if core]
    if progress:
        progress.start(f"asi cpus {','.join(map(str, cpus))}")
    l1d = topo.l1d_bytes     # None: sysfs does not say; 0 below makes the buffer use its default
    params = AsiBenchParams(domain=VM_DOMAIN)

    def collect_asi(region: Region) -> dict[str, int]:
        t = collect.counters(region)
        out = {k: t[k] for k in _COUNTERS}
        for k, v in parent_counters(region).items():
            out[k] += v
        return out

    out = orchestrator.run(RunSpec(
        workers=[WorkerSpec(cpu, "asi", params) for cpu in cpus],
        metrics=METRICS, duration_s=opts.duration_s, cores=cores,
        emulated=topo.emulated, l1d_bytes=l1d or 0,
        extra_sections=mm.sections(len(cpus)), init=lambda region: init(region, len(cpus)),
        collect=collect_asi), progress.update if progress else None)
    hists = {m: out.merged(i) for i, m in enumerate(METRICS)}
    extra: dict = {"emulated": topo.emulated, "l1d_bytes": l1d, "l1d_assumed": not l1d}
    if not l1d:
        extra["warnings"] = [f"sysfs does not give the L1D size (no cache/index*/ of level 1, "
                             f"type Data): flushes evict an assumed {DEFAULT_L1D // 1024} KiB"]
    e = Entry("asi", "asi", "-", cpus, out.elapsed_s, hists=hists,
              counters=dict(out.collected or {}), failures=[str(f) for f in out.failures],
              extra=extra)
    if progress:
        progress.done("FAILED: " + "; ".join(e.failures) if e.failures else
                      "  ".join(f"{m} p50 {histogram.summarize(h).p50} ns"
                                for m, h in list(hists.items())[:3]))
    yield e
