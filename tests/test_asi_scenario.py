"""`asirt bench asi` (asirt.scenarios.asi): sections and init, the worker program in-process,
and a real run through the scenario, as the CLI runs it."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

import workers.asi
from asirt import collect, histogram, mm
from asirt import cpu as cpu_layer
from asirt.cpu.buffer import CoreBuffer
from asirt.errors import AsirtError
from asirt.mm.spaces import AddressSpaces, AsiClassId, frames_of
from asirt.mm.memclass import MemClass
from asirt.params import AsiBenchParams, CpuParams
from asirt.scenarios import SCENARIOS, Options
from asirt.scenarios import asi as scenario
from asirt.topology import select_topology
from shm_layout import Region, Section
from tests.fixtures import test_topology
from workers.context import WorkerContext

METRICS = scenario.METRICS


def test_worker_and_scenario_agree_on_the_metrics():
    assert list(workers.asi.METRICS) == METRICS
    assert "asi_exit_enter" in METRICS and "asi_enter_exit" not in METRICS
    assert SCENARIOS["asi"].run is scenario.run


@contextlib.contextmanager
def _region(ncpus: int, l1d: int = 32 * 1024) -> Iterator[Region]:
    """What the orchestrator makes for the scenario: one core of ``ncpus`` lanes, the CPU
    sections set up, the ASI sections (not yet initialised)."""
    region = Region.create([Section("slots", ncpus), Section("cores", 1),
                            Section("metrics", len(METRICS)),
                            Section("hist", ncpus * len(METRICS)),
                            *cpu_layer.sections(ncpus, 1), *mm.sections(ncpus)])
    try:
        rec = region.array("cores")[0]
        rec["core"], rec["nsiblings"], rec["l1d_bytes"] = 0, ncpus, l1d
        rec["cpus"][:ncpus] = list(range(ncpus))
        cpu_layer.setup(region)
        yield region
    finally:
        region.close()
        region.unlink()


@pytest.fixture
def region1() -> Iterator[Region]:
    with _region(1) as r:
        yield r


def test_sections_are_sized_by_params():
    secs = {s.name: s.count for s in mm.sections(3, frames=100, tables=40)}
    assert secs["asi_cpu"] == 3
    assert secs["asi_frames"] == 100 and secs["asi_tables"] == secs["asi_ptmeta"] == 40
    with pytest.raises(ValueError, match="tables 1"):
        mm.sections(1, tables=1)


def test_init_builds_a_checked_scenario():
    with _region(2, l1d=48 * 1024) as region:
        scenario.init(region, 2)
        assert len(frames_of(region, MemClass.GLOBAL)) == scenario.GLOBAL_PAGES
        assert len(frames_of(region, MemClass.SENSITIVE)) == scenario.SENSITIVE_PAGES
        assert len(frames_of(region, MemClass.LOCAL, scenario.VM_DOMAIN)) == 2
        # the core buffer's flush evicts the L1D the cores section gives
        assert CoreBuffer(region, 0, 1).l1d_bytes == 48 * 1024
        k = AddressSpaces(region)
        try:
            assert k.find(scenario.VM_DOMAIN, AsiClassId.KVM) is not None
            assert k.verify() == []
        finally:
            k.close()


def test_worker_records_every_metric(region1):
    """workers.asi.run on one CPU, in this process, for 30 rounds."""
    rounds = 30
    scenario.init(region1, 1)
    ctx = WorkerContext(region1, 0, 0, "asi",
                        AsiBenchParams(cpu=CpuParams(oversubscribed=True)), list(METRICS))
    it = iter(range(rounds))
    ctx.stop_requested = lambda: next(it, None) is None
    workers.asi.run(ctx, None)
    hist = region1.array("hist")
    assert [int(h.sum()) for h in hist] == [rounds] * len(METRICS)
    assert region1.array("slots")["progress"][0] == rounds
    c = collect.counters(region1)
    assert c["asi.faults"] == rounds
    # Changed by design: asi_exit_enter (was asi_enter_exit) flushes too, since the HOST period
    # between taints KERNEL. The first entry flushes; then per round: asi_exit_enter, the
    # re-entry after the fault, and the timed flush.
    assert c["asi.flushes"] == 1 + 3 * rounds
    # and offline() flushes what the last period left before it shows domain 0
    assert c["buffer.flushes"] == c["asi.flushes"] + c["cpu.idle_flushes"]
    assert c["cpu.idle_flushes"] == 1
    # per round: asi_exit_enter and the fault's exit + re-entry; offline() goes straight to
    # IDLE at the end, not through an asi_exit (HOST, with no stun held)
    assert c["asi.enters"] == 1 + 2 * rounds and c["asi.exits"] == 2 * rounds
    # each round's shootdown had no other CPU to wait for
    assert c["asi.shootdowns_sent"] == 0
    cpu = region1.array("asi_cpu")[0]
    assert (int(cpu["online"]), int(cpu["current"]), int(cpu["target"])) == (0, 0, 0)


def test_worker_refuses_an_uninitialised_region(region1):
    mm.setup(region1)                      # trees, but no instance and no pages
    ctx = WorkerContext(region1, 0, 0, "asi", AsiBenchParams(), list(METRICS))
    with pytest.raises(AsirtError, match="not initialised"):
        workers.asi.run(ctx, None)
    assert int(region1.array("asi_cpu")["online"][0]) == 0


@pytest.mark.multiprocess
@pytest.mark.requires_cpus(2)
@pytest.mark.timeout(90)
def test_two_pinned_workers_through_the_scenario():
    """The integration the CLI uses: two vCPUs of one VM on two CPUs shoot down each other's
    TLB entries. The counters and the histograms come from the same rounds, so they agree."""
    topo = select_topology(test_topology(), "auto", list(test_topology().cpus[:2]))
    (e,) = scenario.run(topo, Options(duration_s=1.0))
    assert e.failures == [], e.failures
    counts = {m: histogram.summarize(e.hists[m]).count for m in METRICS}
    assert all(n > 0 for n in counts.values()), counts
    rounds = counts["fault_retry"]
    assert set(counts.values()) == {rounds}          # every round records every metric
    c = e.counters
    assert c["asi.faults"] == rounds
    assert c["asi.flushes"] == 2 + 3 * rounds   # 2 first entries
    assert c["buffer.flushes"] == c["asi.flushes"] + c["cpu.idle_flushes"]   # + offline()
    # each unmap finds the other vCPU inside (sent) or having used the PCID (avoided), unless
    # it is not online yet or any more
    assert 0 < c["asi.shootdowns_sent"] + c["asi.shootdowns_avoided"] <= rounds
    assert e.extra["l1d_assumed"] == (not topo.l1d_bytes)
