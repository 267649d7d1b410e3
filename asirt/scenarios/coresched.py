"""User-level core scheduling alone (workers/coresched.py): tasks of several cookies on every
usable core, with the monitor checking that no two cookies ever run side by side (S2)."""
from __future__ import annotations

from typing import Sequence

from asirt import collect, orchestrator
from asirt.orchestrator import RunSpec
from asirt.params import CoreschedParams, CpuParams, DelayParams
from asirt.results import Entry
from asirt.scenarios.common import (collect_run, plan, plan_cores, sync_init, sync_sections,
                                    violation_events)
from asirt.sync.coresched import backend_report
from asirt.topology import Topology

__all__ = ["run_coresched"]


def run_coresched(topo: Topology, duration_s: float, seed: int = CoreschedParams.seed,
                  enforce: bool = CoreschedParams.enforce,
                  cookies: Sequence[int] = CoreschedParams.cookies, delays: bool = True,
                  lanes_per_core: int | None = None,
                  patience_us: float = CoreschedParams.patience_us) -> Entry:
    """``enforce=False`` admits every task unchecked (the monitor must then find violations).
    Metric ``forced_idle``."""
    core_cpus = plan_cores(topo, lanes_per_core)
    params = CoreschedParams(CpuParams(), seed, DelayParams() if delays else None,
                             tuple(cookies), enforce, patience_us)
    pl = plan(core_cpus, "coresched", lambda k, lane: params, monitor=True)
    spec = RunSpec(workers=pl.workers, metrics=["forced_idle"], duration_s=duration_s,
                   cores=pl.cores, emulated=topo.emulated, extra_sections=sync_sections(pl),
                   init=sync_init(pl), collect=collect_run)
    out = orchestrator.run(spec)
    col = out.collected
    t = col["totals"]
    viol = collect.violations_of(t)
    counters = {k: t[k] for k in ("coresched.tasks", "coresched.forced_idle",
                                  "coresched.forced_idle_ns", "monitor.samples")}
    counters.update(viol)
    counters["violations"] = sum(viol.values())
    return Entry("coresched", "enforced" if enforce else "none", "-", pl.cpus, out.elapsed_s,
                 hists={"forced_idle": out.merged(0, pl.vslots)}, counters=counters,
                 violations=violation_events(col["events"]),
                 failures=[str(f) for f in out.failures], claims_safety=enforce,
                 extra={"seed": seed, "cookies": list(cookies), "emulated": topo.emulated,
                        "core_sched": backend_report()})
