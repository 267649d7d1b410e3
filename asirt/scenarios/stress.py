"""``asirt stress``: a seeded random walk over the handshake's transitions with injected
sleeps and yields at every protocol step (workers/stress.py) on every usable core; S1-S3 checked
by all three checkers, liveness by the parent; optionally a fault injected into one worker
(kill, stop or delay) that the others must detect by timeout and liveness check.

The verdict (``Entry.problems``) fails a run that did not earn its success: a violation under
a protocol that claims safety, a stall, a survivor without progress after a fault, a fault not
detected, and a known-unsafe protocol whose checkers found nothing under delays.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from asirt import collect, orchestrator
from asirt.cpu.transport import TRANSPORTS
from asirt.errors import BadInput
from asirt.orchestrator import RunSpec
from asirt.params import CpuParams, DelayParams, StressParams
from asirt.proc import Life, Proc
from asirt.progress import ProgressLine
from asirt.results import Entry
from asirt.scenarios.common import (MAX_LISTED, Plan, collect_run, plan, plan_cores, sync_init,
                                    sync_sections, violation_events)
from asirt.scenarios.stun import check_cost
from asirt.sync.barrier import BARRIERS
from asirt.sync.stun import ALL_PROTOCOLS, PROTOCOL
from asirt.topology import Topology
from shm_layout.cpu import MAX_DOMAINS, Phase
from shm_layout.sections import WorkerState

__all__ = ["FAULTS", "STRESS_CI", "run_stress"]

FAULTS = ("kill", "stop", "delay")
#: the CI version of the done-criterion (tests/test_stress.py) and the full one (README)
STRESS_CI = 100_000
_COUNTERS = ("cpu.transitions", "stun.requests", "stun.acks", "stun.parks", "cpu.ipis",
             "stun.aborts", "cpu.timeouts", "cpu.slow", "cpu.fenced", "cpu.host_entries",
             "cpu.guest_entries", "barrier.tries", "barrier.busy", "barrier.dom",
             "barrier.flushes", "stun.flushes", "buffer.flushes", "stun.exposed",
             "barrier.rv_rounds", "check.checks", "check.samples", "monitor.samples",
             "monitor.retries")


def run_stress(topo: Topology, protocol: str, transitions: int | None = None,
               duration_s: float | None = None, seed: int = StressParams.seed,
               delays: bool = True, faults: Sequence[str] = (),
               progress: ProgressLine | None = None, *, transport: str = CpuParams.transport,
               barrier: str = StressParams.barrier, lanes_per_core: int | None = None,
               ndomains: int = StressParams.ndomains, monitor: bool = True,
               check: bool = CpuParams.check, check_fence: bool = CpuParams.check_fence,
               max_s: float | None = None, stall_s: float = 10.0,
               delay_params: DelayParams | None = None) -> Entry:
    """Randomized transitions on every usable core; S1-S3 and liveness checked.

    Give ``transitions`` (the total over all vCPU workers; the run ends when each has done its
    share, or after ``max_s``) or ``duration_s``. ``faults``: any of kill, stop, delay, applied
    to the last lane of the first core at about a third of the run (kill: SIGKILL; stop:
    SIGSTOP, which the survivors must find stopped and kill; delay: the worker sleeps 0.5 s
    inside HOST). ``delay_params``: p_yield, p_sleep, max_sleep_us of the injected delays.
    """
    if protocol not in ALL_PROTOCOLS:
        raise BadInput(f"protocol {protocol!r}", "unknown", f"choose from {', '.join(ALL_PROTOCOLS)}")
    if transport not in TRANSPORTS:
        raise BadInput(f"--transport {transport}", "unknown", f"choose from {', '.join(TRANSPORTS)}")
    if barrier not in BARRIERS:
        raise BadInput(f"barrier {barrier!r}", "unknown", f"choose from {', '.join(BARRIERS)}")
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        raise BadInput(f"--faults {','.join(faults)}", f"unknown fault {bad[0]!r}",
                       f"choose from {', '.join(FAULTS)} (comma-separated)")
    if (transitions is None) == (duration_s is None):
        raise BadInput("stress", "give exactly one of transitions and duration",
                       "for example --duration 10")
    if not 1 <= ndomains <= MAX_DOMAINS:
        raise BadInput(f"domains {ndomains}", "out of range", f"choose 1..{MAX_DOMAINS}")
    core_cpus = plan_cores(topo, lanes_per_core)
    nv = sum(len(c) for c in core_cpus)
    per_worker = math.ceil(transitions / nv) if transitions is not None else 0
    params = StressParams(
        CpuParams(transport=transport, check=check, check_fence=check_fence,
                  domains=ndomains),
        protocol, barrier, seed, (delay_params or DelayParams()) if delays else None,
        per_worker, ndomains)
    last = len(core_cpus[0]) - 1                 # the victim: the first core's last lane
    delayed = replace(params, fault_delay_at=20, fault_delay_s=0.5)

    def params_of(k: int, lane: int) -> StressParams:
        return delayed if "delay" in faults and k == 0 and lane == last else params

    pl = plan(core_cpus, "stress", params_of, monitor)
    victim = pl.cores[0][-1] if faults else None
    if duration_s is not None:
        run_s = duration_s
    else:
        run_s = max_s if max_s is not None else 120.0 + per_worker / 500.0
    holder: dict[str, Any] = {}

    def keep(region: Any) -> None:
        holder["region"] = region

    spec = RunSpec(workers=pl.workers, metrics=["barrier_wait"], duration_s=run_s,
                   cores=pl.cores, emulated=topo.emulated, l1d_bytes=topo.l1d_bytes or 0,
                   extra_sections=sync_sections(pl), init=sync_init(pl, keep),
                   collect=collect_run,
                   finish_when_done=("stress",) if transitions is not None else (),
                   keep_going=bool(faults))
    watch = Watch(pl, victim, faults, transitions, run_s, stall_s, progress, holder)
    cpus = pl.cpus
    if progress is not None:
        progress.start(f"stress {protocol} {transport} cpus {','.join(map(str, cpus))}"
                       f" seed {seed}")
    out = orchestrator.run(spec, watch.update)
    col = out.collected
    vslots = pl.vslots
    t = col["totals"]
    viol = collect.violations_of(t)
    events = col["events"]
    liveness_problems = watch.finish(out, col)
    fault_info = watch.fault_report(col, out)
    counters = {k: t[k] for k in _COUNTERS}
    counters.update(viol)
    counters["violations"] = sum(viol.values())
    counters["liveness_violations"] = len(liveness_problems)
    expected = {f["cpu"] for f in fault_info if f["fault"] in ("kill", "stop")}
    failures, injected = [], []
    for f in out.failures:
        (injected if f.cpu in expected and "SIGKILL" in f.status else failures).append(str(f))
    safe = PROTOCOL[protocol].claims_safety
    problems = [f"liveness: {p['kind']} {p}" for p in liveness_problems]
    problems += [f"fault {f['fault']} on cpu {f['cpu']} was not detected" for f in fault_info
                 if f["injected"] and not f["detected"]]
    if not safe and delays and not counters["violations"]:
        problems.append("the unsafe protocol showed no violation and no leak under randomized "
                        "delays, so this run shows nothing about the checkers; run longer "
                        "(--transitions), and if it persists a checker is broken")
    extra = {
        "seed": seed, "delays": delays,
        "delay_params": (delay_params or DelayParams()).__dict__ if delays else None,
        "barrier": barrier, "ndomains": ndomains, "emulated": topo.emulated,
        "lanes": core_cpus, "oversubscribed": pl.oversubscribed,
        # out.elapsed_s: start barrier -> stop request, without spawning and teardown
        "transitions_target": transitions,
        "transitions_per_s": (round(t["cpu.transitions"] / out.elapsed_s) if out.elapsed_s > 0
                              else None),
        "check_cost": check_cost(t),
        "monitor": {"samples": t["monitor.samples"], "retries": t["monitor.retries"],
                    "mean_ns": (round(t["monitor.ns"] / t["monitor.samples"], 1)
                                if t["monitor.samples"] else None)},
        "faults": fault_info, "injected_failures": injected,
        "liveness": liveness_problems,
        "events": [e for e in events if e["kind"] in collect.LIVENESS_KINDS][:MAX_LISTED],
    }
    hists = {"barrier_wait": out.merged(0, vslots)}
    e = Entry("stress", protocol, transport, cpus, out.elapsed_s, hists=hists, counters=counters,
              violations=violation_events(events), failures=failures, claims_safety=safe,
              problems=problems, extra=extra)
    if progress is not None:
        ok = not (e.failures or e.problems or e.unsafe)
        progress.done(f"{t['cpu.transitions']:,} transitions, {counters['violations']} "
                      f"violations{'' if ok else '  CHECK FAILED'}")
    return e


class Watch:
    """The parent's side of a stress run: progress, fault injection, stall detection."""

    def __init__(self, plan: Plan, victim: int | None, faults: Sequence[str],
                 transitions: int | None, run_s: float, stall_s: float,
                 progress: ProgressLine | None, holder: dict[str, Any]) -> None:
        self.holder = holder            # {"region": the run's region}, set by its init hook
        self.plan, self.victim, self.faults = plan, victim, tuple(faults)
        self.transitions, self.run_s, self.stall_s = transitions, run_s, stall_s
        self.progress = progress
        self.vslots = [s for core in plan.cores for s in core]
        self.injected: dict[str, float] = {}   # fault -> time.perf_counter() (CLOCK_MONOTONIC)
        self.at_injection: dict[int, int] = {}
        self.last: dict[int, tuple[int, float]] = {}
        self.stalls: dict[int, float] = {}
        self.victim_pid = 0
        self.started = time.monotonic()

    def _fraction(self, fraction: float, slots: np.ndarray) -> float:
        if self.transitions:
            done = int(slots["progress"][self.vslots].sum())
            return min(1.0, done / self.transitions)
        return fraction

    def update(self, fraction: float, slots: np.ndarray) -> None:
        now = time.monotonic()
        frac = self._fraction(fraction, slots)
        if self.progress is not None:
            self.progress.update(frac, slots)
        for s in self.vslots:
            p = int(slots["progress"][s])
            prev = self.last.get(s)
            if prev is None or prev[0] != p:
                self.last[s] = (p, now)
            elif now - prev[1] > self.stall_s and s not in self.stalls:
                pid = int(slots["pid"][s])
                if (s != self.victim and Proc(pid).life() is Life.ALIVE
                        and int(slots["state"][s]) == WorkerState.RUNNING
                        and not self._finished(s)):
                    self.stalls[s] = now - prev[1]
        if self.victim is not None and not self.injected and (
                frac >= 0.3 or now - self.started > 0.3 * self.run_s):
            pid = int(slots["pid"][self.victim])
            self.victim_pid = pid
            self.at_injection = {s: int(slots["progress"][s]) for s in self.vslots}
            for f in self.faults:
                if f == "kill":
                    _signal(pid, signal.SIGKILL)
                elif f == "stop" and "kill" not in self.faults:
                    _signal(pid, signal.SIGSTOP)
                self.injected[f] = time.perf_counter()

    def _finished(self, s: int) -> bool:
        """Done with its own transitions, idle until its siblings are (Stun.finish): waiting,
        not stalled."""
        region = self.holder.get("region")
        if region is None or region.closed:
            return False
        return int(region.array("cpu_state")["phase"][s]) == Phase.FINISHED

    def finish(self, out: orchestrator.RunOutcome, col: dict[str, Any]) -> list[dict[str, Any]]:
        """Liveness problems: stalled workers, survivors that made no progress after a fault."""
        problems = [{"kind": "STALL", "slot": s, "cpu": self.plan.workers[s].cpu,
                     "stalled_s": round(v, 2)} for s, v in sorted(self.stalls.items())]
        if self.injected and self.victim is not None:
            for s in self.vslots:
                if s == self.victim:
                    continue
                before = self.at_injection.get(s, 0)
                after = col["counters"][s]["cpu.transitions"]
                if after <= before:
                    problems.append({"kind": "NO_PROGRESS_AFTER_FAULT", "slot": s,
                                     "cpu": self.plan.workers[s].cpu, "transitions": after})
        if self.transitions:
            short = [s for s in self.vslots if s != self.victim and
                     col["counters"][s]["cpu.transitions"] < math.ceil(self.transitions / len(self.vslots))
                     and not out.failures]
            if short and out.elapsed_s >= self.run_s * 0.99:
                problems.append({"kind": "UNFINISHED", "slots": short,
                                 "detail": f"the transitions were not done in {self.run_s:.0f}s"})
        return problems

    def fault_report(self, col: dict[str, Any], out: orchestrator.RunOutcome) -> list[dict[str, Any]]:
        report = []
        if self.victim is None:
            return report
        vcpu = self.plan.workers[self.victim].cpu
        core = next(c for c in self.plan.cores if self.victim in c)   # the victim's siblings
        for f in self.faults:
            if f not in self.injected and f != "delay":
                report.append({"fault": f, "slot": self.victim, "cpu": vcpu, "injected": False,
                               "detected": False, "detail": "the run ended before injection"})
                continue
            if f == "delay":
                evs = [e for e in col["events"] if e["kind"] == "TIMEOUT"
                       and e["other_slot"] == self.victim]
                # slow waits are counted per CPU, not per lane waited for: the victim's
                # siblings are the only ones that wait for it
                waited = sum(col["counters"][s]["cpu.slow"] for s in core if s != self.victim)
                report.append({"fault": "delay", "slot": self.victim, "cpu": vcpu,
                               "injected": True, "detected": waited > 0 or bool(evs),
                               "detail": f"{waited} liveness checks found it alive and waited"})
                continue
            want = "FENCE_DEAD" if f == "kill" else "FENCE_STOPPED"
            evs = [e for e in col["events"] if e["kind"] in ("FENCE_DEAD", "FENCE_STOPPED")
                   and e["other_slot"] == self.victim]
            bit = 1 << core.index(self.victim)      # fence masks are by lane within the core
            fenced_by = [s for s in core if s != self.victim and col["fenced"][s] & bit]
            report.append({
                "fault": f, "slot": self.victim, "cpu": vcpu, "injected": True,
                "detected": bool(evs) or bool(fenced_by),
                "detected_as": sorted({e["kind"] for e in evs}) or None,
                "expected": want, "fenced_by_slots": fenced_by,
                "detect_after_ms": (round((evs[0]["ns"] / 1e9 - self.injected[f]) * 1e3, 1)
                                    if evs else None),
            })
        return report


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
