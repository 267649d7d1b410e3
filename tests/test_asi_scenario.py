"""`asirt bench asi`: sections and init, the worker program in-process, and a real run."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import workers.asi
from asirt import asi_scenario, histogram
from asirt.asi import Asi, AsiClassId
from asirt.asi_scenario import METRICS, counters, init, pages, sections
from asirt.errors import BadInput
from shm_layout import Region, Section
from workers.context import WorkerContext


def _region(ncpus: int, cores: list[list[int]]) -> Region:
    return Region.create([Section("slots", ncpus), Section("cores", len(cores)),
                          Section("metrics", len(METRICS)), Section("hist", ncpus * len(METRICS)),
                          *sections(ncpus, len(cores), {})])


def test_sections_are_sized_by_params():
    secs = {s.name: s.count for s in sections(3, 2, {"asi_frames": 100, "asi_tables": 40})}
    assert secs["asi_cpu"] == 3 and secs["asi_uarch"] == 2
    assert secs["asi_frames"] == 100 and secs["asi_tables"] == secs["asi_ptmeta"] == 40
    with pytest.raises(BadInput, match="asi_tables"):
        sections(1, 1, {"asi_tables": 1})


def test_init_builds_a_checked_scenario():
    region = _region(2, [[0, 1]])
    try:
        init(region, [[0, 1]], 48 * 1024, {})
        p = pages(region)
        assert (len(p.globals), len(p.sensitive), len(p.local)) == (
            asi_scenario.GLOBAL_PAGES, asi_scenario.SENSITIVE_PAGES, 2)
        assert int(region.array("asi_uarch")["l1d_bytes"][0]) == 48 * 1024
        k = Asi(region)
        try:
            assert k.find(asi_scenario.VM_DOMAIN, AsiClassId.KVM) is not None
            assert k.verify() == []
        finally:
            k.close()
    finally:
        region.close()
        region.unlink()


def test_worker_records_every_metric():
    """workers.asi.run on one CPU, in this process, for 30 rounds."""
    region = _region(1, [[0]])
    try:
        init(region, [[0]], 32 * 1024, {})
        ctx = WorkerContext(region, 0, 0, "asi", {}, list(METRICS))
        rounds = iter(range(30))
        ctx.stop_requested = lambda: next(rounds, None) is None
        workers.asi.run(ctx)
        hist = region.array("hist")
        assert [int(h.sum()) for h in hist] == [30] * len(METRICS)
        assert region.array("slots")["progress"][0] == 30
        c = counters(region)
        assert c["faults"] == 30
        assert c["flushes"] == 1 + 2 * 30   # first entry; then per round: re-entry, timed
        cpu = region.array("asi_cpu")[0]
        assert (int(cpu["online"]), int(cpu["current"])) == (0, 0)
    finally:
        region.close()
        region.unlink()


def _package_registers_asi_sections() -> bool:
    code = ("import shm_layout, shm_layout.sections as s; "
            "print(s.section_dtype('asi_cpu') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() == "True"


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(90)
def test_two_pinned_workers_through_the_orchestrator():
    """The integration the CLI uses: two vCPUs shoot down each other's TLB entries."""
    if not _package_registers_asi_sections():
        pytest.skip("workers attach only after shm_layout/__init__.py imports shm_layout.asi")
    from asirt import orchestrator
    from asirt.orchestrator import RunSpec, WorkerSpec
    cores = [[0, 1]]
    got: dict[str, int] = {}

    def setup(region: Region) -> None:
        init(region, cores, 32 * 1024, {})

    spec = RunSpec(workers=[WorkerSpec(0, "asi"), WorkerSpec(1, "asi")], metrics=METRICS,
                   duration_s=1.0, cores=cores, extra_sections=sections(2, 1, {}), init=setup)
    out = orchestrator.run(spec)
    assert not out.failures, out.failures
    for m, name in enumerate(METRICS):
        s = histogram.summarize(out.merged(m))
        assert s.count > 0, name
        got[name] = s.p50
    assert np.all(out.slots["progress"] > 0)
