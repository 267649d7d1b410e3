"""``asirt bench kvm`` (and plain ``asirt bench``): the KVM vCPU workload under each mitigation
strategy, side by side -- asirt's main job.

Every selected strategy runs on the same profile, CPUs, seed and duration (workers/vcpu.py: one
vCPU loop per lane of every usable core, plus the sampling monitor). With ``repeat`` the
strategies are interleaved that many times and the spread across the repetitions is reported;
with a sweep the whole comparison runs once per swept value. The spin pingpong on the first
pair is measured first, in the same invocation: ``vm_cycle_overhead`` (the runtime's own cost
per exit/entry cycle) is reported as ``x ref`` against it.

Per strategy (``Entry.extra["kvm"]``): the guest-time fraction (throughput) and that relative
to ``none``; VM entries per second per vCPU; the share of exits handled without leaving the
restricted space; stuns and flushes per second; where each lane's time went (guest, handler,
halted, waiting for a stun, stunned, flushing, barrier, forced idle, host tasks, idle, the
runtime's own overhead); leaks per second by kind (host data, another VM's data); S1-S3
violations; gadgets and the ones that reached memory; ``claims_safety``. A strategy that
claims safety and shows a leak or a violation fails the run (exit 1); so does a run whose
checkers did not demonstrably look (no guest sample, no monitor snapshot, no cycle).
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import replace
from typing import Any, Iterator

import numpy as np

from asirt import collect, histogram, orchestrator
from asirt.errors import BadInput, FeatureMissing
from asirt.kvm import profile as profiles
from asirt.kvm import strategy as strategies
from asirt.kvm import backend, loop, vm
from asirt.kvm import vms as vm_memory
from asirt.kvmfloor import ExitFloor
from asirt.orchestrator import RunSpec
from asirt.params import CpuParams, KvmParams
from asirt.progress import ProgressLine
from asirt.results import Entry
from asirt.scenarios import KvmOptions, Options, parse_choices, pingpong
from asirt.scenarios.common import (MAX_LISTED, Plan, collect_run, plan, plan_cores, sync_init,
                                    sync_sections, violation_events)
from asirt.sync.coresched import backend_report
from asirt.topology import Topology
from shm_layout import Region

__all__ = ["metrics", "GUESTS", "SWEEP_KEYS", "run_kvm", "count", "run",
           "parse_sweep", "parse_strategies", "check_options", "resolve_guest"]


def metrics(real: bool) -> list[str]:
    """The histograms of a KVM run: the loop's, and a real guest's on top."""
    return [*loop.METRICS, *(backend.REAL_METRICS if real else ())]


GUESTS = ("auto", "kvm", "emulated")
#: what --sweep may vary, and how a value changes the run
SWEEP_KEYS = {
    "exit_rate": "the profile's exits per second of guest time (Hz)",
    "sensitive": "every reason's probability of touching host secrets (0..1)",
    "gadgets": "the speculative-gadget probability per exit (0..1)",
    "vms": "VMs multiplexed on every lane",
}
#: where a lane's time goes, in the order the breakdown shows it (counter, label)
BREAKDOWN = (("kvm.guest_ns", "guest"), ("kvm.handler_ns", "handler"),
             ("kvm.halt_ns", "halted"), ("stun.wait_ns", "stun wait"),
             ("stun.parked_ns", "stunned"), ("buffer.flush_ns", "flush"),
             ("kvm.barrier_ns", "barrier"), ("coresched.forced_idle_ns", "forced idle"),
             ("kvm.host_ns", "host tasks"), ("kvm.idle_ns", "idle"))
REFERENCE_S = 1.0


def parse_sweep(text: str) -> tuple[str, tuple[float, ...]]:
    """``"gadgets=0,0.01,0.1"`` -> ("gadgets", (0.0, 0.01, 0.1))."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or key not in SWEEP_KEYS:
        raise BadInput(f"--sweep {text!r}", "is not KEY=V1,V2,...", "keys: " + "; ".join(
            f"{k}: {v}" for k, v in SWEEP_KEYS.items()))
    try:
        vals = tuple(float(v) for v in values.split(",") if v.strip())
    except ValueError:
        raise BadInput(f"--sweep {text!r}", "has a value that is not a number",
                       "for example --sweep gadgets=0,0.01,0.1") from None
    if not vals:
        raise BadInput(f"--sweep {text!r}", "has no values", "for example --sweep vms=1,2,4")
    return key, vals


def _swept(profile: profiles.Profile, opts: KvmOptions, key: str | None,
           value: float | None) -> tuple[profiles.Profile, KvmOptions]:
    """The profile and options of one sweep point."""
    if key is None or value is None:
        return profile, opts
    if key == "exit_rate":
        return replace(profile, exit_rate_hz=value), opts
    if key == "sensitive":
        return replace(profile, reasons=tuple(replace(r, p_sensitive=value)
                                              for r in profile.reasons)), opts
    if key == "gadgets":
        return profile, replace(opts, gadgets=value)
    return profile, replace(opts, vms=int(value))


#: the values each sweep key accepts: (low, high, integral)
_SWEEP_RANGE = {"exit_rate": (1e-3, 1e7, False), "sensitive": (0.0, 1.0, False),
                "gadgets": (0.0, 1.0, False), "vms": (1, 7, True)}


def check_options(opts: KvmOptions) -> None:
    """Refuse bad knobs (BadInput naming the option and the fix) before anything runs."""
    for s in opts.strategies:
        strategies.get(s)
    if opts.seed < 0:
        raise BadInput(f"--seed {opts.seed}", "is negative", "choose 0 or more")
    if opts.sweep is not None:
        key, values = opts.sweep
        lo, hi, integral = _SWEEP_RANGE[key]
        for v in values:
            if not lo <= v <= hi or integral and v != int(v):   # (NaN fails too)
                raise BadInput(f"--sweep {key}={v:g}", "is out of range",
                               f"choose {'whole numbers ' if integral else ''}"
                               f"{lo:g}..{hi:g} for {key} ({SWEEP_KEYS[key]})")
    if not (math.isfinite(opts.tick_ms) and opts.tick_ms > 0):
        raise BadInput(f"--tick-ms {opts.tick_ms}", "must be positive", "for example 2")
    if not 0 <= opts.host_share <= 1:
        raise BadInput(f"--host-share {opts.host_share}", "is not a share", "choose 0..1")
    if not 0 <= opts.gadgets <= 1:
        raise BadInput(f"--gadgets {opts.gadgets}", "is not a probability", "choose 0..1")
    if not 1 <= opts.vms <= 7:
        raise BadInput(f"--vms {opts.vms}", "out of range", "choose 1..7 (security domains)")
    if opts.repeat < 1:
        raise BadInput(f"--repeat {opts.repeat}", "must be at least 1", "for example --repeat 3")
    if opts.stun_at not in strategies.STUN_AT:
        raise BadInput(f"--stun-at {opts.stun_at}", "unknown",
                       f"choose from {', '.join(strategies.STUN_AT)}")
    if opts.interrupts not in strategies.INTERRUPTS:
        raise BadInput(f"--interrupts {opts.interrupts}", "unknown",
                       f"choose from {', '.join(strategies.INTERRUPTS)}")


def resolve_guest(choice: str, transport: str, path: str = vm.DEFAULT_PATH,
                  lanes_per_core: int = 2, nreasons: int = 1) -> tuple[str, str]:
    """``--guest``: (the backend, why). ``auto`` takes real vCPUs when a VM can be created
    through ``path`` and the real guest can run the run's cores and profile; ``kvm`` insists
    (FeatureMissing or BadInput, exit 2, naming the cause: no device, permission, nested
    virtualization off, cores too wide, too many exit reasons...)."""
    from asirt.kvm.real import unfit
    if choice not in GUESTS:
        raise BadInput(f"--guest {choice}", "unknown", f"choose from {', '.join(GUESTS)}")
    if choice == "emulated":
        return "emulated", "chosen with --guest emulated"
    support = vm.probe(path)
    device = (f" (ASIRT_KVM_DEVICE={path}: unset it to use /dev/kvm)"
              if os.environ.get("ASIRT_KVM_DEVICE") else "")
    layout = unfit(lanes_per_core, nreasons)
    if choice == "kvm":
        if layout is not None:           # the run's own shape first: true on any host
            raise BadInput("--guest kvm", layout, "run with --guest emulated, or cores of "
                           "two (--topology emulated:2) and a profile of at most 256 reasons")
        if not support.usable:
            raise FeatureMissing("a usable KVM for --guest kvm", support.reason + device,
                                 "run with --guest emulated, or --guest auto to fall back")
        if transport == "signal":
            raise BadInput("--transport signal", "cannot drive real vCPUs: its IPI signal is "
                           "what kicks a vCPU out of guest mode", "use --transport spin or sem")
        return "kvm", support.reason
    if not support.usable:
        return "emulated", f"--guest auto: no usable KVM ({support.reason}{device})"
    if layout is not None:
        return "emulated", f"--guest auto: KVM works, but {layout}"
    if transport == "signal":
        return "emulated", ("--guest auto: the signal transport's IPI is the vCPU kick, so "
                            "real vCPUs run only with spin or sem")
    return "kvm", f"--guest auto: {support.reason}"


def _one(topo: Topology, strat: str, profile: profiles.Profile, opts: KvmOptions,
         duration_s: float, progress: ProgressLine | None, label: str) -> tuple[Plan, Any]:
    """One orchestrator run of one strategy (``opts.guest`` resolved: kvm or emulated)."""
    core_cpus = plan_cores(topo)
    real = opts.guest == "kvm"
    params = KvmParams(CpuParams(transport=opts.transport), strat,
                       profiles.to_toml(profile), opts.seed, opts.gadgets, opts.vms,
                       opts.tick_ms, opts.host_share, opts.stun_at, opts.interrupts,
                       guest=opts.guest)
    pl = plan(core_cpus, "vcpu", lambda k, lane: params, monitor=True)

    def setup(region: Region) -> None:
        vm_memory.setup(region, opts.vms)

    spec = RunSpec(workers=pl.workers, metrics=metrics(real),
                   duration_s=duration_s, cores=pl.cores,
                   emulated=topo.emulated, l1d_bytes=topo.l1d_bytes or 0,
                   extra_sections=[*sync_sections(pl),
                                   *vm_memory.sections(len(pl.workers), opts.vms)],
                   init=sync_init(pl, setup), collect=collect_run)
    if progress is not None:
        progress.start(label)
    return pl, orchestrator.run(spec, progress.update if progress is not None else None)


def _derive(t: dict[str, int], elapsed: float, lanes: int, vcpus: int,
            strat: strategies.Strategy) -> dict[str, Any]:
    """The per-strategy figures of one run (module docstring)."""
    wall = t["kvm.wall_ns"] or 1
    secs = elapsed or 1.0
    parts = {label: t[k] / wall for k, label in BREAKDOWN}
    parts["checks"] = (t["check.ns"] + t["check.sample_ns"]) / wall
    parts["overhead"] = max(0.0, 1.0 - sum(parts.values()))
    exits = t["kvm.exits"]
    return {
        "guest_fraction": t["kvm.guest_ns"] / wall,
        "entries_per_s_per_vcpu": t["cpu.guest_entries"] / secs / vcpus,
        "restricted_pct": (100.0 * t["kvm.exits_restricted"] / exits
                           if strat.restricted and exits else None),
        "stuns_per_s": t["stun.requests"] / secs,
        "flushes_per_s": t["buffer.flushes"] / secs,
        "stunned_or_forced_idle": (t["stun.parked_ns"] + t["coresched.forced_idle_ns"]) / wall,
        "leaks_per_s": {"host": t["check.leak_host"] / secs,
                        "other_vm": t["check.leak_domain"] / secs},
        "violations": {k: t[k] for k in ("check.s1", "check.s2", "check.s3", "monitor.s1",
                                         "monitor.s2")},
        "gadgets": t["asi.gadgets"], "gadget_hits": t["asi.gadget_hits"],
        "time": parts, "lanes": lanes, "vcpus": vcpus,
    }


_SPREAD = ("guest_fraction", "entries_per_s_per_vcpu", "stuns_per_s", "flushes_per_s")


def _spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in _SPREAD:
        xs = [r[k] for r in runs]
        out[k] = {"min": min(xs), "max": max(xs),
                  "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0}
    leaks = [r["leaks_per_s"]["host"] + r["leaks_per_s"]["other_vm"] for r in runs]
    out["leaks_per_s"] = {"min": min(leaks), "max": max(leaks),
                          "stdev": statistics.stdev(leaks) if len(leaks) > 1 else 0.0}
    return out


def run_kvm(topo: Topology, opts: KvmOptions, duration_s: float,
            progress: ProgressLine | None = None, reference: bool = True) -> Iterator[Entry]:
    """The comparison (module docstring): one entry per strategy (per sweep point)."""
    check_options(opts)
    base = profiles.load(opts.profile)
    core_cpus = plan_cores(topo)
    guest, why = resolve_guest(opts.guest, opts.transport,
                               lanes_per_core=max(len(c) for c in core_cpus),
                               nreasons=len(base.reasons))
    opts = replace(opts, guest=guest)
    ref: dict[str, Any] = {"guest_reason": why}
    if reference and guest == "kvm":
        ref["kvm_floor"] = _exit_floor(core_cpus[0][0], progress)
    if reference:
        a, b = core_cpus[0][:2]
        if progress is not None:
            progress.start(f"reference: spin pingpong cpus {a},{b}")
        p50, failures = pingpong.p50_of(a, b, "spin", REFERENCE_S)
        ref.update({"kind": "pingpong-spin", "cpus": [a, b],
                    "p50_ns": None if failures else p50})
        if failures:
            ref["skipped"] = "; ".join(failures)
        if progress is not None:
            progress.done(f"p50 {p50} ns" if not failures else "FAILED: " + ref["skipped"])
    key, values = opts.sweep if opts.sweep else (None, (None,))
    for value in values:
        profile, o = _swept(base, opts, key, value)
        runs: dict[str, list[tuple[Plan, Any]]] = {s: [] for s in o.strategies}
        done: list[Entry] = []

        def entry(s: str) -> Entry:
            done.append(_entry(s, runs[s], o, profile, ref, topo, key, value))
            return done[-1]
        try:
            for rep in range(o.repeat):
                for s in o.strategies:
                    where = f" {key}={value:g}" if key else ""
                    label = (f"kvm {s}{where} cpus {','.join(map(str, sum(core_cpus, [])))}"
                             + (f" (run {rep + 1}/{o.repeat})" if o.repeat > 1 else ""))
                    pl, out = _one(topo, s, profile, o, duration_s, progress, label)
                    runs[s].append((pl, out))
                    if progress is not None:
                        progress.done(_progress_text(out))
                    if o.repeat == 1:
                        yield entry(s)       # at once: a later interrupt cannot lose it
        except KeyboardInterrupt:
            # what the repetitions that completed measured, marked partial; then the
            # interrupt goes on to the caller, which keeps every entry it was given
            if o.repeat > 1:
                for s, rs in runs.items():
                    if rs:
                        e = entry(s)
                        e.extra["partial"] = f"{len(rs)} of {o.repeat} runs"
                        yield e
            _relative_to_none(done)
            raise
        if o.repeat > 1:
            for s in o.strategies:
                yield entry(s)
        _relative_to_none(done)


def _relative_to_none(entries: list[Entry]) -> None:
    """Each entry's guest fraction relative to none's of the same sweep point (filled in on
    entries already handed out: the caller builds its results after the last one)."""
    none = next((e for e in entries if e.strategy == "none"), None)
    base = none.extra["kvm"]["guest_fraction"] if none is not None else None
    for e in entries:
        e.extra["kvm"]["guest_vs_none"] = e.extra["kvm"]["guest_fraction"] / base if base else None


def _exit_floor(cpu: int, progress: ProgressLine | None) -> dict[str, Any]:
    """The C program's IO exit round trip on ``cpu`` (asirt.kvmfloor): kvm_exit_roundtrip's
    reference, measured in the same run."""
    if progress is not None:
        progress.start(f"reference: C KVM exit floor cpu {cpu}")
    try:
        with ExitFloor() as floor:
            p50 = histogram.summarize(floor.measure(cpu, REFERENCE_S)).p50
        out: dict[str, Any] = {"kind": "c-kvm-exit-floor", "cpu": cpu, "p50_ns": p50}
    except FeatureMissing as err:
        out = {"kind": "c-kvm-exit-floor", "cpu": cpu, "p50_ns": None, "skipped": str(err)}
    if progress is not None:
        progress.done(f"p50 {out['p50_ns']} ns" if out["p50_ns"] else "skipped: "
                      + out["skipped"])
    return out


def _progress_text(out: Any) -> str:
    if out.failures:
        return "FAILED: " + "; ".join(str(f) for f in out.failures)
    t = out.collected["totals"]
    return (f"{t['kvm.cycles']:,} cycles, {t['check.leaks']:,} leaks, "
            f"{sum(collect.violations_of(t).values()) - t['check.leaks']:,} violations")


def _entry(strat: str, runs: list[tuple[Plan, Any]], o: KvmOptions,
           profile: profiles.Profile, ref: dict[str, Any], topo: Topology,
           key: str | None, value: float | None) -> Entry:
    s = strategies.get(strat)
    pl = runs[0][0]
    lanes = sum(len(c) for c in pl.cores)
    vcpus = lanes * o.vms
    derived, totals = [], None
    names = metrics(o.guest == "kvm")
    hists = {m: np.zeros(histogram.NBUCKETS, np.int64) for m in names}
    failures, events, elapsed = [], [], 0.0
    for _, out in runs:
        t = out.collected["totals"]
        derived.append(_derive(t, out.elapsed_s, lanes, vcpus, s))
        totals = t if totals is None else {k: totals[k] + v for k, v in t.items()}
        for i, m in enumerate(names):
            hists[m] += out.merged(i, pl.vslots)
        failures += [str(f) for f in out.failures]
        events += out.collected["events"]
        elapsed += out.elapsed_s
    assert totals is not None
    kvm = _derive(totals, elapsed, lanes, vcpus, s)
    if len(runs) > 1:
        kvm["spread"] = _spread(derived)
    viol = collect.violations_of(totals)
    counters = {k: totals[k] for k in (
        "kvm.cycles", "kvm.exits", "kvm.exits_restricted", "kvm.kicked", "kvm.halts",
        "kvm.to_user", "kvm.switches", "kvm.host_tasks", "kvm.refused", "cpu.guest_entries",
        "stun.requests", "stun.parks", "buffer.flushes", "cpu.idle_flushes", "asi.faults",
        "asi.gadgets", "asi.gadget_hits", "check.samples", "check.checks", "monitor.samples",
        "coresched.forced_idle")}
    counters.update(viol)
    counters["violations"] = sum(viol.values())
    overhead = histogram.summarize(hists["vm_cycle_overhead"]).p50
    baseline = {k: v for k, v in ref.items() if k not in ("guest_reason", "kvm_floor")}
    if baseline:
        baseline["ratio_p50"] = (round(overhead / ref["p50_ns"], 3)
                                 if overhead and ref.get("p50_ns") and not failures else None)
    kvm_floor = dict(ref["kvm_floor"]) if "kvm_floor" in ref else None
    if kvm_floor is not None:
        rt = histogram.summarize(hists["kvm_exit_roundtrip"]).p50
        kvm_floor["roundtrip_p50_ns"] = rt
        kvm_floor["ratio_p50"] = (round(rt / kvm_floor["p50_ns"], 3)
                                  if rt and kvm_floor.get("p50_ns") and not failures else None)
    claims = s.claims_safety(o.gadgets)
    problems = []
    if not failures:
        if not totals["kvm.cycles"]:
            problems.append("no VM entry/exit cycle ran: the run measured nothing")
        if not totals["check.samples"]:
            problems.append("the guests took no sample of the core buffer: leaks were not looked for")
        if not totals["monitor.samples"]:
            problems.append("the sampling monitor took no snapshot: S1/S2 were not looked for")
    leaks = [e for e in events if e["kind"] == "LEAK"][:MAX_LISTED]
    extra: dict[str, Any] = {
        "kvm": kvm, "profile": profile.name, "gadgets": o.gadgets, "vms": o.vms,
        "repeat": o.repeat, "seed": o.seed, "guest": o.guest,
        "guest_reason": ref.get("guest_reason", ""), "stun_at": o.stun_at,
        "interrupts": o.interrupts, "tick_ms": o.tick_ms, "host_share": o.host_share,
        "emulated": topo.emulated, "lanes": pl.core_cpus, "baseline": baseline,
        "strategy_claims": s.claims,
    }
    if kvm_floor is not None:
        extra["kvm_floor"] = kvm_floor
    if key is not None:
        extra["sweep"] = {"key": key, "value": value}
    if s.cookies:
        extra["core_sched"] = backend_report()
    return Entry("kvm", strat, o.transport, pl.cpus, elapsed / len(runs), hists=hists,
                 counters=counters, leaks=leaks,
                 violations=[e for e in violation_events(events) if e["kind"] != "LEAK"],
                 failures=failures, claims_safety=claims, problems=problems, extra=extra,
                 tag=f"{key}={value:g}" if key is not None and value is not None else "")


def count(topo: Topology, opts: Options) -> int:
    """The run's entries, for the progress line; the guest is resolved here first, so that
    ``--guest kvm`` where it cannot run exits 2 before anything runs."""
    k = opts.kvm
    points = len(k.sweep[1]) if k.sweep else 1
    wide = max(len(c) for c in plan_cores(topo))
    guest = resolve_guest(k.guest, k.transport, lanes_per_core=wide,
                          nreasons=len(profiles.load(k.profile).reasons))[0]
    floors = (2 if guest == "kvm" else 1) if opts.floor else 0
    return floors + points * k.repeat * len(k.strategies)


def run(topo: Topology, opts: Options, progress: ProgressLine | None = None) -> Iterator[Entry]:
    """The registry's ``kvm``."""
    return run_kvm(topo, opts.kvm, opts.duration_s, progress, reference=opts.floor)


def parse_strategies(text: str) -> tuple[str, ...]:
    """``--strategy``: a comma-separated list of strategies, or ``all`` (the seven; the
    broken ones only when named)."""
    listed = [n.strip() for n in text.split(",") if n.strip()]
    if listed == ["all"]:
        return strategies.NAMES
    if "all" in listed:
        raise BadInput(f"--strategy {text}", "combines 'all' with other names",
                       "give all alone, or list the strategies")
    return tuple(parse_choices(text, strategies.ALL_NAMES, "--strategy"))
