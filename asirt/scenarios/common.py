"""What the multi-CPU scenarios share: which CPUs form each core's lanes, the plan of workers,
the region setup of the synchronization sections, and reading the counters and events back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from asirt import collect, orchestrator, sync
from asirt.errors import BadInput
from asirt.orchestrator import WorkerSpec
from asirt.params import MonitorParams
from asirt.topology import Topology
from shm_layout import Region, Section
from shm_layout.sections import MAX_SIBLINGS

__all__ = ["Plan", "plan_cores", "plan", "sync_sections", "sync_init", "collect_run",
           "MAX_LISTED", "violation_events"]

#: events listed in result.json per entry (the counters have them all)
MAX_LISTED = 50
#: the most vCPU workers a run may ask for (README.md's scale table measures up to 256)
MAX_WORKERS = 1024


@dataclass(frozen=True)
class Plan:
    workers: list[WorkerSpec]
    cores: list[list[int]]          # slot indices per core (vCPU workers only)
    core_cpus: list[list[int]]      # CPU of each lane
    monitor: int | None             # slot of the monitor, if any
    oversubscribed: bool

    @property
    def vslots(self) -> list[int]:
        return [s for core in self.cores for s in core]

    @property
    def cpus(self) -> list[int]:
        return [c for core in self.core_cpus for c in core]


def plan_cores(topo: Topology, lanes_per_core: int | None = None, workers: int | None = None,
               min_cores: int = 1) -> list[list[int]]:
    """The CPUs of each core's lanes.

    By default the usable cores (pseudo-cores when emulated), each cycled to
    ``lanes_per_core`` lanes when given. ``workers``: that many lanes in all, in cores of
    ``lanes_per_core`` lanes (default: as many as the widest usable core has), core c on usable
    core c mod their number. ``min_cores``: at least that many cores, the usable ones taken
    again in turn. A CPU that runs more than one lane is oversubscribed."""
    usable = [list(c) for c in topo.usable_cores if len(c) >= 2]
    if not usable:
        raise BadInput("--cpus", f"the selected CPUs {list(topo.cpus)} form no core "
                       "with two siblings", "select at least two CPUs (they are grouped into "
                       "emulated siblings when the machine has no SMT)")
    k = lanes_per_core if lanes_per_core is not None else max(len(c) for c in usable)
    if not 2 <= k <= MAX_SIBLINGS:
        raise BadInput(f"{k} siblings per core", "out of range",
                       f"choose between 2 and {MAX_SIBLINGS} (--topology emulated:K)")
    if workers is None:
        ncores = max(len(usable), min_cores)
        if lanes_per_core is None and ncores == len(usable):
            return usable
    else:
        if workers > MAX_WORKERS:
            raise BadInput(f"--workers {workers}", f"more than {MAX_WORKERS} worker processes "
                           "(each a Python process of about 30 MB, started one by one)",
                           f"choose at most {MAX_WORKERS}")
        if workers % k or workers < k * min_cores:
            need = k * max(min_cores, -(-workers // k))
            raise BadInput(f"--workers {workers}",
                           f"cores of {k} siblings need a multiple of {k}"
                           + (f", and {min_cores} cores (one per fault) need {k * min_cores} "
                              "at least" if min_cores > 1 else ""),
                           f"choose --workers {need}")
        ncores = workers // k
    return [[usable[c % len(usable)][i % len(usable[c % len(usable)])] for i in range(k)]
            for c in range(ncores)]


def plan(core_cpus: list[list[int]], role: str, params: Callable[[int, int], Any],
         monitor: bool) -> Plan:
    """One ``role`` worker per lane (``params(core, lane)`` its parameters), plus a monitor
    sharing the last CPU when asked (it yields between samples)."""
    cores: list[list[int]] = []
    workers = []
    for k, cpus in enumerate(core_cpus):
        first = len(workers)
        cores.append(list(range(first, first + len(cpus))))
        workers += [WorkerSpec(cpu, role, params(k, lane)) for lane, cpu in enumerate(cpus)]
    over = orchestrator.oversubscribed(workers)
    mon = None
    if monitor:
        mon = len(workers)
        workers.append(WorkerSpec(core_cpus[-1][-1], "monitor",
                                  MonitorParams(tuple(tuple(c) for c in cores)), spins=False))
    return Plan(workers, cores, core_cpus, mon, over)


def sync_sections(p: Plan) -> list[Section]:
    return sync.sections(len(p.workers), len(p.cores))


def sync_init(p: Plan, then: Callable[[Region], None] | None = None) -> Callable[[Region], None]:
    def init(region: Region) -> None:
        sync.setup(region, p.cores)
        if then is not None:
            then(region)
    return init


def collect_run(region: Region) -> dict[str, Any]:
    """Everything a scenario reads back from a run's region before it is unlinked."""
    cpus = [int(c) for c in region.array("slots")["cpu"]]
    out: dict[str, Any] = {
        "totals": collect.counters(region),
        "counters": collect.per_slot_counters(region),
        "events": collect.events(region, cpus),
        "fenced": [int(x) for x in region.array("cpu_state")["fenced"]],
    }
    if region.has_section("core_sync"):
        cs = region.array("core_sync")
        out["rv_rounds"] = [int(x) for x in cs["rv_rounds"]]
        # per core, what core scheduling holds at the end: the lanes running a task, the
        # claim (cookie + 1, 0: none) and its lane (asirt.sync.coresched)
        out["core_sched"] = [(int(r["cs_running"]), int(r["cs_want"]), int(r["cs_want_lane"]))
                             for r in cs]
    return out


def violation_events(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] in collect.VIOLATION_KINDS][:MAX_LISTED]
