"""``asirt bench stun`` and ``asirt stress``: the handshake between real pinned siblings.

Integration API (what the CLI calls):

- :func:`run_stun` yields one :class:`asirt.results.Entry` per protocol x transport. Every
  sibling of every usable core takes part (all of them in one handshake when a core has more
  than two); they take turns as the requester. Metrics: ``stun_roundtrip`` (request -> the
  requester may enter HOST; strict: every sibling parked and acked, naive: the IPIs sent,
  since naive does not wait),
  ``unstun_resume`` (release -> parked sibling back in ASI), ``barrier_wait`` (first barrier
  check -> GUEST) and, naive only, ``exposure_window`` (requester in HOST -> sibling actually
  parked, per request and sibling). Violations found by the checkers are counted.
- :func:`run_stress` runs a seeded random walk over the transitions with injected
  sleeps/yields at every protocol step, checks S1-S3 with all three checkers and liveness,
  optionally injecting a fault (kill, stop or delay of one worker) that the others must
  detect by timeout + liveness check. It returns one Entry; ``entry.extra["ok"]`` says
  whether it passed (a safe protocol: no violation; every protocol: liveness held).
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from asirt import histogram, invariants, orchestrator
from asirt.barrier import BARRIERS, init_core
from asirt.errors import BadInput
from asirt.orchestrator import RunSpec, WorkerSpec
from asirt.results import Entry
from asirt.stun import ALL_PROTOCOLS, PROTOCOLS, SAFE_PROTOCOLS, TRANSPORTS, Phase, liveness
from asirt.topology import Topology
from shm_layout import Region, Section
from shm_layout.sections import MAX_SIBLINGS, WorkerState
from shm_layout.stun import MAX_DOMAINS

__all__ = ["PROTOCOLS", "ALL_PROTOCOLS", "SAFE_PROTOCOLS", "TRANSPORTS", "BARRIERS", "FAULTS",
           "METRICS", "run_stun", "run_stress", "run_coresched", "plan_cores", "count_stun",
           "run_stun_scenario",
           "STRESS_CI"]

METRICS = ("stun_roundtrip", "unstun_resume", "barrier_wait", "exposure_window")
FAULTS = ("kill", "stop", "delay")
MAX_VIOLATIONS_LISTED = 50
#: the CI version of the done-criterion (tests/test_stress.py) and the full one (README)
STRESS_CI = 100_000


@dataclass(frozen=True)
class _Plan:
    workers: list[WorkerSpec]
    cores: list[list[int]]          # slot indices per core (vCPU workers only)
    core_cpus: list[list[int]]      # CPU of each lane
    monitor: int | None             # slot of the monitor, if any
    oversubscribed: bool


def plan_cores(topo: Topology, lanes_per_core: int | None = None) -> list[list[int]]:
    """The CPUs of each core's lanes: the usable cores (pseudo-cores when emulated), or each
    core's CPUs cycled to ``lanes_per_core`` lanes (more workers than CPUs: oversubscribed)."""
    cores = [list(c) for c in topo.usable_cores if len(c) >= 2]
    if not cores:
        raise BadInput("--cpus", f"the selected CPUs {list(topo.cpus)} form no core "
                       "with two siblings", "select at least two CPUs (they are grouped into "
                       "emulated siblings when the machine has no SMT)")
    if lanes_per_core is not None:
        if not 2 <= lanes_per_core <= MAX_SIBLINGS:
            raise BadInput(f"--workers {lanes_per_core}", "siblings per core out of range",
                           f"choose between 2 and {MAX_SIBLINGS}")
        cores = [[c[i % len(c)] for i in range(lanes_per_core)] for c in cores]
    for c in cores:
        if len(c) > MAX_SIBLINGS:
            raise BadInput("--cpus", f"a core with {len(c)} siblings", f"at most {MAX_SIBLINGS} fit")
    return cores


def _plan(core_cpus: list[list[int]], params: dict[str, Any], monitor: bool) -> _Plan:
    cores: list[list[int]] = []
    slot = 0
    for cpus in core_cpus:
        cores.append(list(range(slot, slot + len(cpus))))
        slot += len(cpus)
    workers = []
    for k, cpus in enumerate(core_cpus):
        for cpu in cpus:
            workers.append(WorkerSpec(cpu, "stun", {**params, "lanes": cores[k], "core": k}))
    over = orchestrator.oversubscribed(workers)     # what the orchestrator tells each worker
    mon = None
    if monitor:
        mon = len(workers)
        # not a sibling of anything: it shares the last CPU and yields between samples
        workers.append(WorkerSpec(core_cpus[-1][-1], "monitor",
                                  {"cores": cores}, spins=False))
    return _Plan(workers, cores, core_cpus, mon, over)


def _sections(n: int, ncores: int) -> list[Section]:
    return [Section("stun_cpu", n), Section("stun_buf", n), Section("stun_core", ncores),
            Section("stun_events", n)]


def _init(plan: _Plan, holder: dict[str, Any]):
    def init(region: Region) -> None:
        holder["region"] = region
        arr = region.array("stun_cpu")
        arr["core"] = -1
        for k, slots in enumerate(plan.cores):
            init_core(region, k, len(slots))
            for lane, s in enumerate(slots):
                arr[s]["lane"] = lane
                arr[s]["core"] = k
    return init


def _collect(region: Region) -> dict[str, Any]:
    cpus = [int(c) for c in region.array("slots")["cpu"]]
    return {
        "totals": invariants.counters(region),
        "counters": invariants.per_slot_counters(region),
        "events": invariants.events(region, cpus),
        "fenced": [int(x) for x in region.array("stun_cpu")["fenced"]],
        "rv_rounds": [int(x) for x in region.array("stun_core")["rv_rounds"]],
    }


def _violations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] in invariants.VIOLATION_KINDS][:MAX_VIOLATIONS_LISTED]


def _check_cost(t: dict[str, int]) -> dict[str, Any]:
    return {"checks": t["checks"],
            "mean_ns": round(t["check_ns"] / t["checks"], 1) if t["checks"] else None}


def _summary_text(e: Entry) -> str:
    s = histogram.summarize(e.hists["stun_roundtrip"])
    v = e.counters.get("violations", 0)
    head = "no samples" if not s.count else f"p50 {s.p50} ns  p99 {s.p99} ns  ({s.count:,})"
    return head + (f"  {v} violations" if v else "")


# -- bench stun ------------------------------------------------------------------------------

def run_stun(topo: Topology, protocols: Sequence[str], transports: Sequence[str],
             duration_s: float, progress: Any = None, *, barrier: str = "spin",
             lanes_per_core: int | None = None, slice_ms: float = 20.0,
             monitor: bool = False, check: bool = True, baseline: bool = False,
             ack_timeout_ms: float = 200.0) -> Iterator[Entry]:
    """One entry per protocol x transport over every usable core (see the module docstring).

    ``progress`` is an asirt.bench.ProgressLine (start/update/done) or None. ``baseline``
    adds, per transport, the raw reference on lanes 0,1 of the first core: the C cache-line
    floor for ``spin``, the pingpong of the same transport otherwise; ``extra["baseline"]``
    then holds its p50 and the ratio of the stun round trip's p50 to it.
    """
    for p in protocols:
        if p not in ALL_PROTOCOLS:
            raise BadInput(f"protocol {p!r}", "unknown", f"choose from {', '.join(PROTOCOLS)}")
    for t in transports:
        if t not in TRANSPORTS:
            raise BadInput(f"--transport {t}", "unknown", f"choose from {', '.join(TRANSPORTS)}")
    if barrier not in BARRIERS:
        raise BadInput(f"barrier {barrier!r}", "unknown", f"choose from {', '.join(BARRIERS)}")
    core_cpus = plan_cores(topo, lanes_per_core)
    base_p50 = _baselines(core_cpus[0][:2], transports, duration_s) if baseline else {}
    for protocol in protocols:
        for transport in transports:
            params = {"mode": "bench", "protocol": protocol, "transport": transport,
                      "barrier": barrier, "slice_ms": slice_ms, "check": check,
                      "ack_timeout_ms": ack_timeout_ms}
            plan = _plan(core_cpus, params, monitor)
            holder: dict[str, Any] = {}
            spec = RunSpec(workers=plan.workers, metrics=list(METRICS), duration_s=duration_s,
                           cores=plan.cores, emulated=topo.emulated,
                           l1d_bytes=topo.l1d_bytes or 0,
                           extra_sections=_sections(len(plan.workers), len(plan.cores)),
                           init=_init(plan, holder), collect=_collect)
            cpus = [c for core in core_cpus for c in core]
            if progress is not None:
                progress.start(f"stun {protocol} {transport} cpus {','.join(map(str, cpus))}")
            out = orchestrator.run(spec, progress.update if progress is not None else None)
            vslots = [s for core in plan.cores for s in core]
            hists = {m: out.merged(i, vslots) for i, m in enumerate(METRICS)
                     if m != "exposure_window" or protocol == "naive"}
            col = out.collected
            t = col["totals"]
            viol = invariants.summarize_violations(t)
            counters = {k: t[k] for k in ("requests", "acks", "parks", "ipis", "aborts",
                                          "timeouts", "fenced", "guest_entries",
                                          "barrier_tries", "barrier_busy", "barrier_dom",
                                          "barrier_dirty", "exposed")}
            counters.update(viol)
            counters["violations"] = sum(viol.values())
            extra: dict[str, Any] = {
                "safe_protocol": protocol in SAFE_PROTOCOLS,
                "emulated": topo.emulated, "lanes": core_cpus, "barrier": barrier,
                "oversubscribed": plan.oversubscribed, "check_cost": _check_cost(t),
                "roundtrip_means": ("request -> may enter HOST: every sibling parked and acked"
                                    if protocol != "naive" else
                                    "request -> may enter HOST: IPIs sent (naive does not "
                                    "wait for acks)"),
            }
            if transport in base_p50:
                b = base_p50[transport]
                p50 = histogram.summarize(hists["stun_roundtrip"]).p50
                extra["baseline"] = {**b, "ratio_p50": (round(p50 / b["p50_ns"], 3)
                                                        if p50 and b.get("p50_ns") else None)}
            e = Entry("stun", protocol, transport, cpus, out.elapsed_s, hists=hists,
                      counters=counters, violations=_violations(col["events"]),
                      failures=[str(f) for f in out.failures], extra=extra)
            if progress is not None:
                progress.done(_summary_text(e) if not e.failures else
                              "FAILED: " + "; ".join(e.failures))
            yield e


def _baselines(pair: list[int], transports: Sequence[str], duration_s: float) -> dict[str, dict]:
    """p50 of the raw reference of each transport on one pair (see run_stun)."""
    from asirt.cfloor import CFloor
    from asirt.errors import FeatureMissing
    out: dict[str, dict] = {}
    a, b = pair
    if "spin" in transports:
        try:
            with CFloor() as cf:
                f = cf.measure(a, b, duration_s)
            out["spin"] = {"kind": "c-floor", "cpus": [a, b],
                           "p50_ns": histogram.summarize(f.counts).p50}
        except FeatureMissing as err:
            out["spin"] = {"kind": "c-floor", "skipped": str(err)}
    for t in transports:
        if t == "spin":
            continue
        common = {"transport": t}
        spec = RunSpec(workers=[WorkerSpec(a, "pingpong", {**common, "side": "ping", "peer": 1}),
                                WorkerSpec(b, "pingpong", {**common, "side": "pong", "peer": 0})],
                       metrics=["roundtrip"], duration_s=duration_s, cores=[[0, 1]])
        res = orchestrator.run(spec)
        out[t] = {"kind": f"pingpong-{t}", "cpus": [a, b],
                  "p50_ns": histogram.summarize(res.merged(0)).p50}
        if res.failures:        # no reference then; say why instead of a bare null
            out[t]["skipped"] = "; ".join(str(f) for f in res.failures)
    return out


# -- stress ----------------------------------------------------------------------------------

def run_stress(topo: Topology, protocol: str, transitions: int | None = None,
               duration_s: float | None = None, seed: int = 0, delays: bool = True,
               faults: Sequence[str] = (), progress: Any = None, *, transport: str = "spin",
               barrier: str = "spin", lanes_per_core: int | None = None, ndomains: int = 2,
               monitor: bool = True, check: bool = True, check_fence: bool = False,
               ack_timeout_ms: float = 50.0, give_up_ms: float = 5000.0,
               max_s: float | None = None, stall_s: float = 10.0,
               delay_params: dict[str, float] | None = None) -> Entry:
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
    params: dict[str, Any] = {
        "mode": "stress", "protocol": protocol, "transport": transport, "barrier": barrier,
        "seed": seed, "delays": delays, "transitions": per_worker, "ndomains": ndomains,
        "classes": ndomains + 1, "check": check, "check_fence": check_fence,
        "ack_timeout_ms": ack_timeout_ms, "give_up_ms": give_up_ms, **(delay_params or {}),
    }
    plan = _plan(core_cpus, params, monitor)
    victim = plan.cores[0][-1] if faults else None
    if "delay" in faults:
        plan.workers[victim] = WorkerSpec(plan.workers[victim].cpu, "stun",
                                          {**plan.workers[victim].params,
                                           "fault_delay": {"at": 20, "seconds": 0.5}})
    if duration_s is not None:
        run_s = duration_s
    else:
        run_s = max_s if max_s is not None else 120.0 + per_worker / 500.0
    holder: dict[str, Any] = {}
    spec = RunSpec(workers=plan.workers, metrics=["barrier_wait"], duration_s=run_s,
                   cores=plan.cores, emulated=topo.emulated, l1d_bytes=topo.l1d_bytes or 0,
                   extra_sections=_sections(len(plan.workers), len(plan.cores)),
                   init=_init(plan, holder), collect=_collect,
                   finish_when_done=("stun",) if transitions is not None else (),
                   keep_going=bool(faults))
    watch = _Watch(plan, victim, faults, transitions, run_s, stall_s, progress, holder)
    cpus = [c for core in core_cpus for c in core]
    if progress is not None:
        progress.start(f"stress {protocol} {transport} cpus {','.join(map(str, cpus))}"
                       f" seed {seed}")
    out = orchestrator.run(spec, watch.update)
    col = out.collected
    vslots = [s for core in plan.cores for s in core]
    t = col["totals"]
    viol = invariants.summarize_violations(t)
    events = col["events"]
    liveness_problems = watch.finish(out, col)
    fault_info = watch.fault_report(col, out)
    counters = {k: t[k] for k in ("transitions", "requests", "acks", "parks", "ipis", "aborts",
                                  "timeouts", "slow", "fenced", "host_entries",
                                  "guest_entries", "barrier_tries", "barrier_busy",
                                  "barrier_dom", "barrier_dirty", "entry_flushes", "flushes",
                                  "exposed", "rv_rounds", "m_samples", "m_retries")}
    counters.update(viol)
    counters["violations"] = sum(viol.values())
    counters["liveness_violations"] = len(liveness_problems)
    expected = {f["cpu"] for f in fault_info if f["fault"] in ("kill", "stop")}
    failures, injected = [], []
    for f in out.failures:
        (injected if f.cpu in expected and "SIGKILL" in f.status else failures).append(str(f))
    safe = protocol in SAFE_PROTOCOLS
    ok = (not failures and not liveness_problems and (counters["violations"] == 0 or not safe)
          and all(f["detected"] for f in fault_info))
    extra = {
        "seed": seed, "delays": delays, "delay_params": delay_params or {},
        "barrier": barrier, "ndomains": ndomains, "emulated": topo.emulated,
        "lanes": core_cpus, "oversubscribed": plan.oversubscribed,
        # out.elapsed_s: start barrier -> stop request, without spawning and teardown
        "transitions_target": transitions,
        "transitions_per_s": (round(t["transitions"] / out.elapsed_s) if out.elapsed_s > 0
                              else None),
        "check_cost": _check_cost(t),
        "monitor": {"samples": t["m_samples"], "retries": t["m_retries"],
                    "mean_ns": round(t["m_ns"] / t["m_samples"], 1) if t["m_samples"] else None},
        "faults": fault_info, "injected_failures": injected,
        "liveness": liveness_problems, "safe_protocol": safe, "ok": ok,
        "events": [e for e in events if e["kind"] in invariants.LIVENESS_KINDS][:MAX_VIOLATIONS_LISTED],
    }
    hists = {"barrier_wait": out.merged(0, vslots)}
    e = Entry("stress", protocol, transport, cpus, out.elapsed_s, hists=hists, counters=counters,
              violations=_violations(events), failures=failures, extra=extra)
    if progress is not None:
        progress.done(f"{t['transitions']:,} transitions, {counters['violations']} violations"
                      f"{'' if ok else '  CHECK FAILED'}")
    return e


class _Watch:
    """The parent's side of a stress run: progress, fault injection, stall detection."""

    def __init__(self, plan: _Plan, victim: int | None, faults: Sequence[str],
                 transitions: int | None, run_s: float, stall_s: float, progress: Any,
                 holder: dict[str, Any]) -> None:
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
                if (s != self.victim and liveness(pid) == "alive"
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
        """Done with its own transitions, idle until its siblings are (StunCpu.finish): waiting,
        not stalled."""
        region = self.holder.get("region")
        if region is None or region.closed:
            return False
        return int(region.array("stun_cpu")["phase"][s]) == Phase.FINISHED

    def finish(self, out: orchestrator.RunOutcome, col: dict[str, Any]) -> list[dict[str, Any]]:
        """Liveness problems: stalled workers, survivors that made no progress after a fault."""
        problems = [{"kind": "STALL", "slot": s, "cpu": self.plan.workers[s].cpu,
                     "stalled_s": round(v, 2)} for s, v in sorted(self.stalls.items())]
        if self.injected and self.victim is not None:
            for s in self.vslots:
                if s == self.victim:
                    continue
                before = self.at_injection.get(s, 0)
                after = col["counters"][s]["transitions"]
                if after <= before:
                    problems.append({"kind": "NO_PROGRESS_AFTER_FAULT", "slot": s,
                                     "cpu": self.plan.workers[s].cpu, "transitions": after})
        if self.transitions:
            short = [s for s in self.vslots if s != self.victim and
                     col["counters"][s]["transitions"] < math.ceil(self.transitions / len(self.vslots))
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
                waited = sum(col["counters"][s]["slow"] for s in core if s != self.victim)
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


# -- core scheduling alone ---------------------------------------------------------------------

def run_coresched(topo: Topology, duration_s: float, seed: int = 0, enforce: bool = True,
                  cookies: Sequence[int] = (1, 2), delays: bool = True,
                  lanes_per_core: int | None = None, patience_us: float = 2000.0) -> Entry:
    """User-level core scheduling of tasks of ``cookies`` on every usable core, with the
    monitor checking that no two cookies ever run side by side (S2); ``enforce=False`` admits
    every task unchecked (the monitor must then find violations). Metric ``forced_idle``."""
    core_cpus = plan_cores(topo, lanes_per_core)
    params = {"mode": "coresched", "seed": seed, "delays": delays, "cookies": list(cookies),
              "enforce": enforce, "patience_us": patience_us,
              "classes": max(cookies) + 1 if cookies else 2}
    plan = _plan(core_cpus, params, monitor=True)
    holder: dict[str, Any] = {}
    spec = RunSpec(workers=plan.workers, metrics=["forced_idle"], duration_s=duration_s,
                   cores=plan.cores, emulated=topo.emulated,
                   extra_sections=_sections(len(plan.workers), len(plan.cores)),
                   init=_init(plan, holder), collect=_collect)
    out = orchestrator.run(spec)
    col = out.collected
    t = col["totals"]
    viol = invariants.summarize_violations(t)
    counters = {"tasks": int(sum(out.slots["samples"][s] for c in plan.cores for s in c)),
                "forced_idle": t["forced_idle"], "forced_idle_ns": t["forced_idle_ns"],
                "m_samples": t["m_samples"], **viol, "violations": sum(viol.values())}
    vslots = [s for core in plan.cores for s in core]
    cpus = [c for core in core_cpus for c in core]
    from asirt.coresched import backend_report
    return Entry("coresched", "enforced" if enforce else "none", "-", cpus, out.elapsed_s,
                 hists={"forced_idle": out.merged(0, vslots)}, counters=counters,
                 violations=_violations(col["events"]), failures=[str(f) for f in out.failures],
                 extra={"seed": seed, "cookies": list(cookies), "emulated": topo.emulated,
                        "core_sched": backend_report()})


def count_stun(topo: Topology, opts: Any) -> int:
    """Entries :func:`run_stun_scenario` yields (asirt.bench's Scenario.count)."""
    plan_cores(topo)
    return len(opts.protocols) * len(opts.transports)


def run_stun_scenario(topo: Topology, opts: Any, progress: Any = None) -> Iterator[Entry]:
    """asirt.bench's Scenario.run for ``stun``: both protocols over ``opts.transports``, each
    entry ``opts.duration_s`` long, with the baselines (C floor, raw pingpong) unless
    ``opts.floor`` is false."""
    return run_stun(topo, opts.protocols, opts.transports, opts.duration_s, progress,
                    baseline=opts.floor)
