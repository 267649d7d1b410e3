"""``asirt stress``: a seeded random walk over the handshake's transitions with injected
sleeps and yields at every protocol step (workers/stress.py) on every core of the plan; S1-S3
checked by all three checkers, liveness by the parent (:class:`Watch`); faults injected into
victims the others must detect (asirt.scenarios.faults).

The verdict (``Entry.problems``, beside the failures and ``Entry.unsafe``) fails a run that
did not earn its success:

- liveness: a worker without a transition for ``stall_s`` (STALL); after a fault, a survivor
  with no progress, or one that limps on at a fraction of its earlier rate; transitions not
  done in the time allowed;
- a fault not injected, not detected or misjudged; a worker failure no fault explains (matched
  by worker, never by CPU: the monitor shares a CPU with a vCPU);
- corrupt words or histograms no fault explains;
- nothing checked (:func:`unearned`): no monitor sample, no transition assertion, no buffer
  sample, no stun request completed -- e.g. every one given up;
- a known-unsafe protocol whose checkers found nothing: with delays a checker may be broken;
  without them (``delays=False``) the run proves nothing about the checkers, and says so.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np

from asirt import collect, orchestrator
from asirt.cpu.transport import TRANSPORTS
from asirt.errors import BadInput
from asirt.orchestrator import RunSpec
from asirt.params import CpuParams, DelayParams, KvmParams, StressParams
from asirt.proc import Life, Proc
from asirt.progress import ProgressLine
from asirt.results import Entry
from asirt.scenarios.common import (MAX_LISTED, Plan, collect_run, plan, plan_cores, sync_init,
                                    sync_sections, violation_events)
from asirt.scenarios.faults import (CORRUPT_WORDS, DELAY_AT, DELAY_S, FAULTS, Faults,
                                    bad_histograms)
from asirt.scenarios.stun import check_cost
from asirt.sync.barrier import BARRIERS
from asirt.sync.stun import ALL_PROTOCOLS, PROTOCOL
from asirt.topology import Topology
from shm_layout import Region
from shm_layout.cpu import MAX_DOMAINS, Phase
from shm_layout.sections import WorkerState

__all__ = ["FAULTS", "STRESS_CI", "STALL_S", "LIMP_RATIO", "SHOOTDOWNS", "run_stress",
           "run_kvm_stress", "Watch", "unearned"]

#: the CI version of the done-criterion (tests/test_stress.py) and the full one (README)
STRESS_CI = 100_000
#: a worker without a transition for this long is stalled. Every wait the protocol bounds
#: ends well within it: the delay fault's DELAY_S (0.5 s) in HOST, the fencing of a stopped
#: sibling (two ack timeouts, then up to DEATH_WAIT_S for the kill: about 1.1 s) or of a
#: corrupt one (the kill: up to 1 s). The give-up of a request (give_up_ms, 5 s) is not among
#: them: a live sibling that leaves a request unanswered that long is the stall. And it is a
#: fifth of the default 10 s run, so a deadlock is caught in any run of the default length.
STALL_S = 2.0
#: the parent looks every 50 ms (asirt.orchestrator.POLL_S); after a gap this long it was not
#: running itself (stopped with the whole run by Ctrl-Z, starved), and a worker it did not see
#: move meanwhile is not judged stalled over that time
PARENT_GAP_S = 1.0
#: after a fault, a survivor whose transition rate fell below 1/LIMP_RATIO of its rate before
#: limps on: it moves, but something holds it back (a wait for the dead victim at every step)
LIMP_RATIO = 10
#: ``--strategy``: the probability that an exit (under an ASI strategy) unmaps a page of its
#: VM's own memory from the VM's restricted tree and maps it again: a TLB shootdown of the
#: siblings inside the tree while they walk it
SHOOTDOWNS = 0.02
_COUNTERS = ("cpu.transitions", "stun.requests", "stun.acks", "stun.parks", "cpu.ipis",
             "stun.aborts", "cpu.timeouts", "cpu.slow", "cpu.fenced", "cpu.host_entries",
             "cpu.guest_entries", "barrier.tries", "barrier.busy", "barrier.dom",
             "barrier.flushes", "stun.flushes", "buffer.flushes", "stun.exposed",
             "barrier.rv_rounds", "check.checks", "check.samples", "check.corrupt",
             "monitor.samples", "monitor.retries")
_KVM_COUNTERS = ("kvm.cycles", "kvm.exits", "kvm.kicked", "kvm.switches", "kvm.host_tasks",
                 "kvm.halts", "check.leaks", "check.leak_host", "check.leak_domain",
                 "asi.faults", "asi.shootdowns_sent", "asi.gadgets", "asi.gadget_hits",
                 "coresched.forced_idle", "cpu.idle_flushes")


def run_stress(topo: Topology, protocol: str, transitions: int | None = None,
               duration_s: float | None = None, seed: int = StressParams.seed,
               delays: bool = True, faults: Sequence[str] = (),
               progress: ProgressLine | None = None, *, transport: str = CpuParams.transport,
               barrier: str = StressParams.barrier, lanes_per_core: int | None = None,
               workers: int | None = None, ndomains: int = StressParams.ndomains,
               monitor: bool = True, check: bool = CpuParams.check,
               check_fence: bool = CpuParams.check_fence, stonith: bool = CpuParams.stonith,
               corrupt: str | None = None, max_s: float | None = None,
               stall_s: float = STALL_S, delay_params: DelayParams | None = None) -> Entry:
    """Randomized transitions on every core of the plan; S1-S3 and liveness checked.

    Give ``transitions`` (the total over all vCPU workers; the run ends when each has done its
    share, or after ``max_s``) or ``duration_s``. ``workers``: that many vCPU workers in all,
    in cores of ``lanes_per_core`` siblings (asirt.scenarios.common.plan_cores). ``faults``:
    any of asirt.scenarios.faults.FAULTS, each on its own victim (the last lane of its own
    core); ``corrupt``: the word the corrupt fault writes (default: chosen by the seed).
    ``delay_params``: p_yield, p_sleep, max_sleep_us of the injected delays.
    """
    if protocol not in ALL_PROTOCOLS:
        raise BadInput(f"protocol {protocol!r}", "unknown", f"choose from {', '.join(ALL_PROTOCOLS)}")
    if transport not in TRANSPORTS:
        raise BadInput(f"--transport {transport}", "unknown", f"choose from {', '.join(TRANSPORTS)}")
    if barrier not in BARRIERS:
        raise BadInput(f"barrier {barrier!r}", "unknown", f"choose from {', '.join(BARRIERS)}")
    faults, corrupt = _checked_faults(faults, corrupt, seed)
    if (transitions is None) == (duration_s is None):
        raise BadInput("stress", "give exactly one of transitions and duration",
                       "for example --duration 10")
    if not 1 <= ndomains <= MAX_DOMAINS:
        raise BadInput(f"domains {ndomains}", "out of range", f"choose 1..{MAX_DOMAINS}")
    core_cpus = plan_cores(topo, lanes_per_core, workers, min_cores=max(1, len(faults)))
    nv = sum(len(c) for c in core_cpus)
    per_worker = math.ceil(transitions / nv) if transitions is not None else 0
    params = StressParams(
        CpuParams(transport=transport, check=check, check_fence=check_fence, stonith=stonith,
                  domains=ndomains),
        protocol, barrier, seed, (delay_params or DelayParams()) if delays else None,
        per_worker, ndomains)
    delayed = replace(params, fault_delay_at=DELAY_AT, fault_delay_s=DELAY_S)

    def params_of(k: int, lane: int) -> StressParams:   # fault k's victim: core k's last lane
        victim = k < len(faults) and lane == len(core_cpus[k]) - 1
        return delayed if victim and faults[k] == "delay" else params

    pl = plan(core_cpus, "stress", params_of, monitor)
    proto = PROTOCOL[protocol]
    unsafe_quiet = (
        "the unsafe protocol showed no violation and no leak under randomized delays, so "
        "this run shows nothing about the checkers; run longer (--transitions), and if it "
        "persists a checker is broken" if delays else
        "the unsafe protocol showed no violation without injected delays: this run proves "
        "nothing about the checkers (nothing widened the races that expose it); drop "
        "--no-delays")
    return _execute(topo, pl, Faults(pl, faults, corrupt), RunSpec(
        workers=pl.workers, metrics=["barrier_wait"], duration_s=0.0, cores=pl.cores),
        protocol, transport, transitions, duration_s, max_s, per_worker, stall_s, progress,
        seed=seed, monitor=monitor, check=check, strict=proto.waits_for_acks,
        claims_safety=proto.claims_safety, unsafe_quiet=unsafe_quiet, delays=delays,
        delay_params=delay_params, extra={"barrier": barrier, "ndomains": ndomains},
        label=f"stress {protocol} {transport}")


def _execute(topo: Topology, pl: Plan, injected: Faults, spec: RunSpec, name: str,
             transport: str, transitions: int | None, duration_s: float | None,
             max_s: float | None, per_worker: int, stall_s: float,
             progress: ProgressLine | None, *, seed: int, monitor: bool, check: bool,
             strict: bool, claims_safety: bool,
             unsafe_quiet: str | Callable[[dict[str, int]], str], delays: bool,
             delay_params: DelayParams | None, extra: dict[str, Any], label: str,
             hist_check: tuple[str, str | None] = ("cpu.guest_entries", None),
             setup: Callable[[Region], None] | None = None, idle_slots: Sequence[int] = (),
             more_counters: Sequence[str] = ()) -> Entry:
    """Run a stress plan (``spec``: its workers, metrics, cores; the rest filled in here),
    watch it, inject its faults and judge it: the verdict of the module docstring.
    ``hist_check``: the counter that counts the samples of metric 0, and one whose every
    count may leave a sample out. ``idle_slots``: lanes idle by design (no progress
    expected)."""
    if duration_s is not None:
        run_s = duration_s
    else:
        run_s = max_s if max_s is not None else 120.0 + per_worker / 500.0
    holder: dict[str, Any] = {}
    watch = Watch(pl, injected, transitions, run_s, stall_s, progress, holder, idle_slots)

    def keep(region: Region) -> None:
        holder["region"] = region
        if setup is not None:
            setup(region)

    spec = replace(spec, duration_s=run_s, emulated=topo.emulated,
                   l1d_bytes=topo.l1d_bytes or 0,
                   extra_sections=[*sync_sections(pl), *spec.extra_sections],
                   init=sync_init(pl, keep), collect=watch.collect,
                   finish_when_done=("stress",) if transitions is not None else (),
                   keep_going=bool(injected.faults))
    cpus = sorted(set(pl.cpus))          # each CPU once: its lanes are in extra["lanes"]
    if progress is not None:
        progress.start(f"{label} cpus {','.join(map(str, cpus))} "
                       f"{len(pl.vslots)} workers seed {seed}")
    out = orchestrator.run(spec, watch.update)
    col = out.collected
    vslots = pl.vslots
    t = col["totals"]
    viol = collect.violations_of(t)
    events = sorted(watch.log.events, key=lambda e: e["ns"])
    liveness_problems = watch.finish(out, col)
    failed = {f.slot for f in out.failures}
    corrupt_hists = bad_histograms(out.hists, col["counters"], vslots, failed, *hist_check)
    fault_info = injected.judge(events, col["counters"], col["fenced"], out.failures,
                                corrupt_hists, col.get("core_sched", ()))
    counters = {k: t[k] for k in (*_COUNTERS, *more_counters)}
    counters.update(viol)
    counters["violations"] = sum(viol.values())
    counters["liveness_violations"] = len(liveness_problems)
    failures = [str(f) for f in out.failures if not injected.expected(f)]
    expected_failures = [str(f) for f in out.failures if injected.expected(f)]
    problems = [f"liveness: {p['kind']} {p}" for p in liveness_problems]
    problems += [_fault_problem(f) for f in fault_info
                 if not f["injected"] or f["detected"] is False]
    problems += _unexplained_corruption(injected, events, t, corrupt_hists, spec.metrics[0])
    problems += unearned(t, monitor=monitor, check=check, strict=strict)
    if not claims_safety and not counters["violations"]:
        problems.append(unsafe_quiet if isinstance(unsafe_quiet, str) else unsafe_quiet(t))
    good = [s for s in vslots if s not in corrupt_hists]
    extra = {
        "seed": seed, "delays": delays,
        "delay_params": (delay_params or DelayParams()).__dict__ if delays else None,
        **extra, "emulated": topo.emulated,
        "lanes": pl.core_cpus, "workers": len(vslots), "oversubscribed": pl.oversubscribed,
        # out.elapsed_s: start barrier -> stop request, without spawning and teardown
        "startup_s": round(out.startup_s, 3), "stop_s": round(out.stop_s, 3),
        "region_bytes": out.region_bytes,
        "transitions_target": transitions,
        "transitions_per_s": (round(t["cpu.transitions"] / out.elapsed_s) if out.elapsed_s > 0
                              else None),
        "check_cost": check_cost(t),
        "monitor": {"samples": t["monitor.samples"], "retries": t["monitor.retries"],
                    "mean_ns": (round(t["monitor.ns"] / t["monitor.samples"], 1)
                                if t["monitor.samples"] else None)},
        "faults": fault_info, "injected_failures": expected_failures,
        "corrupt_histograms": {str(s): why for s, why in corrupt_hists.items()},
        "liveness": liveness_problems,
        "events": [e for e in events if e["kind"] in collect.LIVENESS_KINDS][:MAX_LISTED],
        "events_lost": watch.log.lost,
    }
    hists = {m: out.merged(i, good) for i, m in enumerate(spec.metrics)}
    e = Entry("stress", name, transport, cpus, out.elapsed_s, hists=hists, counters=counters,
              leaks=[e for e in events if e["kind"] == "LEAK"][:MAX_LISTED],
              violations=violation_events([e for e in events if e["kind"] != "LEAK"]),
              failures=failures,
              claims_safety=claims_safety, problems=problems, extra=extra)
    if progress is not None:
        ok = not (e.failures or e.problems or e.unsafe)
        progress.done(f"{t['cpu.transitions']:,} transitions, {counters['violations']} "
                      f"violations{'' if ok else '  CHECK FAILED'}")
    return e


def run_kvm_stress(topo: Topology, strategy: str, duration_s: float,
                   seed: int = StressParams.seed, delays: bool = True,
                   faults: Sequence[str] = (), progress: ProgressLine | None = None, *,
                   transport: str = CpuParams.transport, guest: str = "emulated",
                   profile: str = "default", gadgets: float = 0.0, vms: int = 2,
                   lanes_per_core: int | None = None, workers: int | None = None,
                   corrupt: str | None = None, stall_s: float = STALL_S,
                   shootdowns: float = SHOOTDOWNS,
                   delay_params: DelayParams | None = None) -> Entry:
    """``asirt stress --strategy``: the KVM vCPU loop (asirt.kvm.loop) under one strategy, with
    injected delays at every protocol step, TLB shootdowns among the exits (ASI strategies),
    stuns, VM switches and host tasks (cookie changes), and ``faults``; judged by the same
    verdict as the handshake's walk. ``guest``: emulated or kvm (resolved already). A
    strategy that claims safety must show no leak and no violation; one that does not
    (``none``, ``coresched``; ``kcs`` with gadgets) must show some."""
    from asirt.kvm import profile as profiles
    from asirt.kvm import strategy as strategies
    from asirt.kvm import vms as vm_memory
    from asirt.scenarios.kvm import metrics as kvm_metrics

    strat = strategies.get(strategy)
    faults, corrupt = _checked_faults(faults, corrupt, seed)
    core_cpus = plan_cores(topo, lanes_per_core, workers, min_cores=max(1, len(faults)))
    real = guest == "kvm"
    params = KvmParams(
        CpuParams(transport=transport), strat.name,
        profiles.to_toml(profiles.load(profile)), seed, gadgets, vms, guest=guest,
        delays=(delay_params or DelayParams()) if delays else None, shootdowns=shootdowns,
        audit=True)
    delayed = replace(params, fault_delay_at=DELAY_AT, fault_delay_s=DELAY_S)

    # fault k's victim: core k's last lane; under SMT off its first (the one that runs)
    victim_lane = 0 if strat.one_lane else -1

    def params_of(k: int, lane: int) -> KvmParams:
        victim = k < len(faults) and lane == range(len(core_cpus[k]))[victim_lane]
        return delayed if victim and faults[k] == "delay" else params

    pl = plan(core_cpus, "vcpu", params_of, monitor=True)
    idle = [s for core in pl.cores for s in core[1:]] if strat.one_lane else []
    metrics = kvm_metrics(real)
    claims = strat.claims_safety(gadgets)
    # a lane that must find a sibling's fault: one that stuns or passes a barrier; under core
    # scheduling alone a sibling waits only behind a task the victim holds (it may hold none)
    waits = bool(strat.barrier or strat.stun_every_exit or strat.stun_sensitive)
    spec = RunSpec(workers=pl.workers, metrics=metrics, duration_s=0.0, cores=pl.cores,
                   extra_sections=vm_memory.sections(len(pl.workers), vms))
    return _execute(
        topo, pl, Faults(pl, faults, corrupt, victim_lane, waits), spec, strat.name,
        transport, None, duration_s, None, 0, stall_s, progress, seed=seed, monitor=True,
        check=True,
        strict=((strat.stun_every_exit or strat.stun_sensitive)
                and PROTOCOL[strat.protocol].waits_for_acks),
        claims_safety=claims,
        unsafe_quiet=lambda t: (
            f"no speculative gadget fired (--gadgets {gadgets:g}), and {strat.name} claims "
            "safety except with gadgets: this run shows nothing; raise --gadgets or run longer"
            if strat.claims == "without gadgets" and not t["asi.gadgets"] else
            f"{strat.name} claims no safety{' with gadgets' if gadgets else ''}, yet the "
            "guests saw no foreign token and the checkers found no violation: this run shows "
            "nothing about the checkers; run longer, and if it persists a checker is broken"),
        delays=delays, delay_params=delay_params,
        extra={"strategy_claims": strat.claims, "guest": guest, "profile": profile,
               "gadgets": gadgets, "vms": vms, "shootdowns": shootdowns if strat.restricted
               else 0.0},
        label=f"stress {strat.name} guest {guest}",
        hist_check=("kvm.exits", "stun.aborts"),
        setup=lambda region: vm_memory.setup(region, vms),
        idle_slots=idle, more_counters=_KVM_COUNTERS)


def _checked_faults(faults: Sequence[str], corrupt: str | None,
                    seed: int) -> tuple[tuple[str, ...], str]:
    """The faults, each once, and the word the corrupt fault writes (default: by the seed);
    BadInput for one that asirt does not know."""
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        raise BadInput(f"--faults {','.join(faults)}", f"unknown fault {bad[0]!r}",
                       f"choose from {', '.join(FAULTS)} (comma-separated)")
    if corrupt is None:
        corrupt = CORRUPT_WORDS[seed % len(CORRUPT_WORDS)]
    elif corrupt not in CORRUPT_WORDS:
        raise BadInput(f"corrupt word {corrupt!r}", "unknown",
                       f"choose from {', '.join(CORRUPT_WORDS)}")
    return tuple(dict.fromkeys(faults)), corrupt


def unearned(t: dict[str, int], *, monitor: bool, check: bool, strict: bool) -> list[str]:
    """Why a run's summed counters ``t`` do not earn a success: what should have been checked
    and was not (the monitor and the transition checks only where the run has them)."""
    out = []
    if monitor and not t["monitor.samples"]:
        out.append("the monitor took no sample: S1/S2 were never sampled")
    if check and not t["check.checks"]:
        out.append("no transition was checked: no VM entry, exit or HOST entry was asserted")
    if not t["check.samples"]:
        out.append("no guest sampled the core buffer: S3 has no evidence")
    done = t["stun.requests"] - t["stun.aborts"]
    if strict and done <= 0:
        out.append(f"no stun request completed ({t['stun.requests']} made, "
                   f"{t['stun.aborts']} of them given up): the handshake was not exercised")
    return out


def _fault_problem(f: dict[str, Any]) -> str:
    where = f"fault {f['fault']} on slot {f['slot']} (cpu {f['cpu']})"
    if not f["injected"]:
        return f"{where} was not injected ({f.get('detail', '')}): run longer"
    want = f.get("expected")
    if want and f.get("detected_as") and want not in f["detected_as"]:
        return f"{where} was misjudged: detected as {', '.join(f['detected_as'])}, not {want}"
    return f"{where} was not detected" + (f" ({f['detail']})" if f.get("detail") else "")


def _unexplained_corruption(faults: Faults, events: list[dict[str, Any]], t: dict[str, int],
                            hists: dict[int, str], metric: str) -> list[str]:
    """Corrupt words and histograms that no corrupt fault put there."""
    words = {f.victim for f in faults.faults if f.kind == "corrupt" and f.word != "hist"}
    in_hist = {f.victim for f in faults.faults if f.kind == "corrupt" and f.word == "hist"}
    out = [f"the {metric} histogram of slot {s} is corrupt ({why}): left out of the merge"
           for s, why in hists.items() if s not in in_hist]
    stray = [e for e in events if e["kind"] == "CORRUPT" and e["other_slot"] not in words]
    if stray or (t["check.corrupt"] and not words):
        e = stray[0] if stray else None
        out.append(f"{t['check.corrupt']} corrupt words found"
                   + (f", first in slot {e['other_slot']} (its {e['word']} word held "
                      f"{e['value']:#x})" if e else "")
                   + ": the shared region was written by someone who does not own it")
    return out


class Watch:
    """The parent's side of a stress run while it goes on: progress, the faults' injection,
    the events as they come (collect.EventLog), stalls; then the liveness verdict."""

    def __init__(self, plan: Plan, faults: Faults, transitions: int | None, run_s: float,
                 stall_s: float, progress: ProgressLine | None, holder: dict[str, Any],
                 idle_slots: Sequence[int] = ()) -> None:
        self.holder = holder            # {"region": the run's region}, set by its init hook
        self.plan, self.faults = plan, faults
        self.transitions, self.run_s, self.stall_s = transitions, run_s, stall_s
        self.progress = progress
        self.vslots = plan.vslots
        self.idle = set(idle_slots)     # idle by design (a lane SMT-off keeps idle)
        self.cpus = [ws.cpu for ws in plan.workers]
        self.log = collect.EventLog()
        self.injected_at: float | None = None    # time.monotonic() of the injection
        self.at_injection: dict[int, int] = {}   # each worker's progress then
        self.last: dict[int, tuple[tuple[int, int], float]] = {}
        self.stalls: dict[int, float] = {}
        self.started: float | None = None        # the first look (the run has started)
        self.prev: float | None = None           # the last look

    def _fraction(self, fraction: float, slots: np.ndarray) -> float:
        if self.transitions:
            done = int(slots["progress"][self.vslots].sum())
            return min(1.0, done / self.transitions)
        return fraction

    def _region(self) -> Region | None:
        region = self.holder.get("region")
        return None if region is None or region.closed else region

    def update(self, fraction: float, slots: np.ndarray) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        if self.prev is not None and now - self.prev > PARENT_GAP_S:
            self.last.clear()        # the parent did not run meanwhile: judge nobody over it
        self.prev = now
        frac = self._fraction(fraction, slots)
        if self.progress is not None:
            self.progress.update(frac, slots)
        region = self._region()
        if region is not None:
            self.log.read(region, self.cpus)
        self._stalls(now, slots, region)
        if not self.faults.faults:
            return
        if self.injected_at is None:
            if frac >= 0.3 or now - self.started > 0.3 * self.run_s:
                self.injected_at = now
                self.at_injection = {s: int(slots["progress"][s]) for s in self.vslots}
                self.faults.inject(slots, region)
        elif region is not None:
            self.faults.keep_on(region)

    def _stalls(self, now: float, slots: np.ndarray, region: Region | None) -> None:
        """A worker progresses when its progress word or its mode seqlock (bumped at every
        transition, so a slow worker is seen between progress publications) moves."""
        progress = slots["progress"].tolist()
        mseq = region.array("cpu_state")["mseq"].tolist() if region is not None else None
        for s in self.vslots:
            if s in self.faults.victims or s in self.idle:
                continue
            seen = (progress[s], mseq[s] if mseq is not None else 0)
            prev = self.last.get(s)
            if prev is None or prev[0] != seen:
                self.last[s] = (seen, now)
            elif now - prev[1] > self.stall_s and self._stalled(s, slots):
                self.stalls[s] = max(self.stalls.get(s, 0.0), now - prev[1])

    def _stalled(self, s: int, slots: np.ndarray) -> bool:
        """Not stalled: dead (a failure, reported as one), stopped or traced (its siblings
        fence or wait), done, or finished with its share and waiting for its siblings."""
        if int(slots["state"][s]) != WorkerState.RUNNING:
            return False
        if Proc(int(slots["pid"][s])).life() is not Life.ALIVE:
            return False
        region = self._region()
        return region is None or int(region.array("cpu_state")["phase"][s]) != Phase.FINISHED

    def collect(self, region: Region) -> dict[str, Any]:
        """The run's end (the orchestrator's collect hook): the last events, then the rest."""
        self.log.read(region, self.cpus)
        return collect_run(region)

    def finish(self, out: orchestrator.RunOutcome, col: dict[str, Any]) -> list[dict[str, Any]]:
        """Liveness problems: stalls; after a fault, survivors without progress or limping;
        transitions not done in time. Failed workers and the faults' victims are judged as
        failures and faults, not here."""
        cpu_of = {s: self.plan.workers[s].cpu for s in self.vslots}
        problems: list[dict[str, Any]] = [
            {"kind": "STALL", "slot": s, "cpu": cpu_of[s], "stalled_s": round(v, 2)}
            for s, v in sorted(self.stalls.items())]
        failed = {f.slot for f in out.failures}
        survivors = [s for s in self.vslots if s not in self.faults.victims
                     and s not in failed and s not in self.idle]
        done = {s: col["counters"][s]["cpu.transitions"] for s in self.vslots}
        share = math.ceil(self.transitions / len(self.vslots)) if self.transitions else 0
        if self.injected_at is not None and self.started is not None and self.prev is not None:
            before_s = self.injected_at - self.started
            after_s = self.prev - self.injected_at
            for s in survivors:
                before, after = self.at_injection.get(s, 0), done[s]
                if after <= before:
                    problems.append({"kind": "NO_PROGRESS_AFTER_FAULT", "slot": s,
                                     "cpu": cpu_of[s], "transitions": after})
                elif (before_s > 0.1 and after_s > 0.1 and not (share and after >= share)
                      and (after - before) / after_s < before / before_s / LIMP_RATIO):
                    problems.append({
                        "kind": "LIMPING", "slot": s, "cpu": cpu_of[s],
                        "per_s_before": round(before / before_s),
                        "per_s_after": round((after - before) / after_s)})
        if self.transitions:
            short = [s for s in survivors if done[s] < share]
            if short and out.elapsed_s >= self.run_s * 0.99:
                problems.append({"kind": "UNFINISHED", "slots": short,
                                 "detail": f"the transitions were not done in {self.run_s:.0f}s"})
        return problems
