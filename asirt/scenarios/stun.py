"""``asirt bench stun``: the handshake between real pinned siblings, one entry per protocol x
transport. Every sibling of every usable core takes part (all of them in one handshake when a
core has more than two); they take turns as the requester (workers/stun.py).

Metrics: ``stun_roundtrip`` (request -> the requester may enter HOST; strict: every sibling
parked and acked, naive: the IPIs sent, since naive does not wait), ``unstun_resume`` (release
-> parked sibling back in ASI), ``barrier_wait`` (first barrier check -> GUEST) and, naive
only, ``exposure_window`` (requester in HOST -> sibling actually parked, per request and
sibling). Violations found by the checkers are counted.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

from asirt import collect, histogram, orchestrator
from asirt.cpu.transport import TRANSPORTS
from asirt.errors import BadInput, FeatureMissing
from asirt.orchestrator import RunSpec
from asirt.params import CpuParams, StunBenchParams
from asirt.progress import ProgressLine
from asirt.results import Entry
from asirt.scenarios import Options, pingpong
from asirt.scenarios.common import (collect_run, plan, plan_cores, sync_init, sync_sections,
                                    violation_events)
from asirt.sync.barrier import BARRIERS
from asirt.sync.stun import ALL_PROTOCOLS, PROTOCOL, PROTOCOLS
from asirt.topology import Topology

__all__ = ["METRICS", "run_stun", "baselines", "count", "run_scenario", "check_cost"]

METRICS = ("stun_roundtrip", "unstun_resume", "barrier_wait", "exposure_window")
_COUNTERS = ("stun.requests", "stun.acks", "stun.parks", "cpu.ipis", "stun.aborts",
             "cpu.timeouts", "cpu.fenced", "cpu.guest_entries", "barrier.tries", "barrier.busy",
             "barrier.dom", "barrier.flushes", "stun.flushes", "buffer.flushes", "stun.exposed")


def check_cost(t: dict[str, int]) -> dict[str, Any]:
    n = t["check.checks"]
    return {"checks": n, "mean_ns": round(t["check.ns"] / n, 1) if n else None}


def _summary_text(e: Entry) -> str:
    s = histogram.summarize(e.hists["stun_roundtrip"])
    v = e.counters.get("violations", 0)
    head = "no samples" if not s.count else f"p50 {s.p50} ns  p99 {s.p99} ns  ({s.count:,})"
    return head + (f"  {v} violations" if v else "")


def run_stun(topo: Topology, protocols: Sequence[str], transports: Sequence[str],
             duration_s: float, progress: ProgressLine | None = None, *,
             barrier: str = StunBenchParams.barrier, lanes_per_core: int | None = None,
             slice_ms: float = StunBenchParams.slice_ms, monitor: bool = False,
             check: bool = CpuParams.check, baseline: bool = False) -> Iterator[Entry]:
    """One entry per protocol x transport over every usable core (module docstring).

    ``baseline`` adds, per transport, the raw reference on lanes 0,1 of the first core: the C
    cache-line floor for ``spin``, the pingpong of the same transport otherwise;
    ``extra["baseline"]`` then holds its p50 and the ratio of the stun round trip's p50 to it.
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
    base = baselines(core_cpus[0][:2], transports, duration_s) if baseline else {}
    for protocol in protocols:
        for transport in transports:
            # the bench runs one domain: the S3 assertion looks at that one's classes only
            params = StunBenchParams(CpuParams(transport=transport, check=check, domains=1),
                                     protocol, barrier, slice_ms)
            pl = plan(core_cpus, "stun", lambda k, lane: params, monitor)
            spec = RunSpec(workers=pl.workers, metrics=list(METRICS), duration_s=duration_s,
                           cores=pl.cores, emulated=topo.emulated,
                           l1d_bytes=topo.l1d_bytes or 0, extra_sections=sync_sections(pl),
                           init=sync_init(pl), collect=collect_run)
            if progress is not None:
                progress.start(f"stun {protocol} {transport} cpus "
                               f"{','.join(map(str, pl.cpus))}")
            out = orchestrator.run(spec, progress.update if progress is not None else None)
            hists = {m: out.merged(i, pl.vslots) for i, m in enumerate(METRICS)
                     if m != "exposure_window" or protocol == "naive"}
            col = out.collected
            t = col["totals"]
            counters = {k: t[k] for k in _COUNTERS}
            viol = collect.violations_of(t)
            counters.update(viol)
            counters["violations"] = sum(viol.values())
            extra: dict[str, Any] = {
                "emulated": topo.emulated, "lanes": core_cpus, "barrier": barrier,
                "oversubscribed": pl.oversubscribed, "check_cost": check_cost(t),
                "roundtrip_means": ("request -> may enter HOST: every sibling parked and acked"
                                    if protocol != "naive" else
                                    "request -> may enter HOST: IPIs sent (naive does not "
                                    "wait for acks)"),
            }
            failures = [str(f) for f in out.failures]
            if transport in base:
                b = base[transport]
                p50 = histogram.summarize(hists["stun_roundtrip"]).p50
                ok = p50 and b.get("p50_ns") and not failures
                extra["baseline"] = {**b, "ratio_p50": round(p50 / b["p50_ns"], 3) if ok else None}
            e = Entry("stun", protocol, transport, pl.cpus, out.elapsed_s, hists=hists,
                      counters=counters, violations=violation_events(col["events"]),
                      failures=failures, claims_safety=PROTOCOL[protocol].claims_safety,
                      extra=extra)
            if progress is not None:
                progress.done(_summary_text(e) if not e.failures else
                              "FAILED: " + "; ".join(e.failures))
            yield e


def baselines(pair: list[int], transports: Sequence[str], duration_s: float) -> dict[str, dict]:
    """p50 of the raw reference of each transport on one pair: the C cache-line floor for
    ``spin``, the raw pingpong of the transport otherwise. A reference whose run had a failure
    is no reference: it says so (``skipped``) and gives no p50."""
    from asirt.cfloor import CFloor
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
        p50, failures = pingpong.p50_of(a, b, t, duration_s)
        out[t] = {"kind": f"pingpong-{t}", "cpus": [a, b], "p50_ns": None if failures else p50}
        if failures:
            out[t]["skipped"] = "; ".join(failures)
    return out


def count(topo: Topology, opts: Options) -> int:
    plan_cores(topo)
    return len(opts.protocols) * len(opts.transports)


def run_scenario(topo: Topology, opts: Options,
                 progress: ProgressLine | None = None) -> Iterator[Entry]:
    """The registry's ``stun``: both protocols over ``opts.transports``, each entry
    ``opts.duration_s`` long, with the references unless ``opts.floor`` is false."""
    return run_stun(topo, opts.protocols, opts.transports, opts.duration_s, progress,
                    baseline=opts.floor)
