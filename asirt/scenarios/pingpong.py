"""``asirt bench pingpong``: the raw round trip of each IPI-like transport between every sibling
pair (and one pair on different cores for contrast), each against the C cache-line floor
measured on the same pair first (asirt.cfloor)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from asirt import histogram, orchestrator
from asirt.cfloor import CFloor, compiler
from asirt.errors import BadInput, FeatureMissing
from asirt.orchestrator import RunSpec, WorkerSpec
from asirt.params import PingpongParams
from asirt.progress import ProgressLine
from asirt.results import Entry
from asirt.scenarios import Options
from asirt.topology import Topology

__all__ = ["Pair", "pairs", "spec", "count", "run", "p50_of"]


def spec(a: int, b: int, transport: str, duration_s: float,
         topo: Topology | None = None) -> RunSpec:
    """The raw pingpong of ``transport`` between CPUs a (ping) and b (pong): one run."""
    return RunSpec(
        workers=[WorkerSpec(a, "pingpong", PingpongParams("ping", 1, transport)),
                 WorkerSpec(b, "pingpong", PingpongParams("pong", 0, transport))],
        metrics=["roundtrip"], duration_s=duration_s, cores=[[0, 1]],
        emulated=bool(topo and topo.emulated), l1d_bytes=(topo.l1d_bytes or 0) if topo else 0)


def p50_of(a: int, b: int, transport: str, duration_s: float) -> tuple[int | None, list[str]]:
    """The p50 of one raw pingpong run, and its failures (a reference for other scenarios)."""
    out = orchestrator.run(spec(a, b, transport, duration_s))
    return histogram.summarize(out.merged(0)).p50, [str(f) for f in out.failures]


@dataclass(frozen=True)
class Pair:
    a: int
    b: int
    kind: str   # "siblings" (or emulated siblings) or "cross-core"


def pairs(topo: Topology) -> list[Pair]:
    """Every sibling pair, plus one pair on different cores for contrast where there is one."""
    out = [Pair(a, b, "siblings") for a, b in topo.sibling_pairs()]
    cores = [c for c in topo.usable_cores if c]
    if len(cores) >= 2:
        out.append(Pair(cores[0][0], cores[1][0], "cross-core"))
    if not out:
        raise BadInput("--cpus", f"the selected CPUs {list(topo.cpus)} form no pair",
                       "select at least two CPUs")
    return out


def _summary_text(counts: np.ndarray) -> str:
    s = histogram.summarize(counts)
    if not s.count:
        return "no samples"
    return f"p50 {s.p50} ns  p99 {s.p99} ns  ({s.count:,} samples)"


def count(topo: Topology, opts: Options) -> int:
    nfloor = 1 if opts.floor and compiler() is not None else 0
    return len(pairs(topo)) * (len(opts.transports) + nfloor)


def run(topo: Topology, opts: Options,
        progress: ProgressLine | None = None) -> Iterator[Entry]:
    """Yield the floor entry (when a compiler exists) and one entry per transport, per pair."""
    transports, duration_s, floor = opts.transports, opts.duration_s, opts.floor
    the_pairs = pairs(topo)
    cfloor: CFloor | None = None
    floor_note = "skipped (--no-floor)"
    if floor:
        try:
            cfloor, floor_note = CFloor(), ""
        except FeatureMissing as err:
            floor_note = str(err)
    try:
        for pair in the_pairs:
            base = {"pair": pair.kind, "emulated": topo.emulated}
            floor_p50 = None
            if cfloor is not None:
                if progress:
                    progress.start(f"c-floor cpus {pair.a},{pair.b}")
                f = cfloor.measure(pair.a, pair.b, duration_s)
                floor_p50 = histogram.summarize(f.counts).p50
                e = Entry("pingpong", "-", "c-floor", [pair.a, pair.b], duration_s,
                          hists={"roundtrip": f.counts}, extra={**base, "compiler": f.compiler})
                if progress:
                    progress.done(_summary_text(f.counts))
                yield e
            for t in transports:
                label = f"{t} cpus {pair.a},{pair.b}"
                if progress:
                    progress.start(label)
                out = orchestrator.run(spec(pair.a, pair.b, t, duration_s, topo),
                                       progress.update if progress else None)
                counts = out.merged(0)
                extra = dict(base)
                p50 = histogram.summarize(counts).p50
                if floor_p50:
                    extra["floor"] = {"transport": "c-floor", "p50_ns": floor_p50,
                                      "ratio_p50": None if p50 is None else round(p50 / floor_p50, 3)}
                elif floor_note:
                    extra["floor"] = {"skipped": floor_note}
                e = Entry("pingpong", "-", t, [pair.a, pair.b], out.elapsed_s,
                          hists={"roundtrip": counts},
                          counters={"samples": int(out.slots["samples"][0])},
                          failures=[str(f) for f in out.failures], extra=extra)
                if progress:
                    progress.done(_summary_text(counts) if not out.failures else
                                  "FAILED: " + "; ".join(e.failures))
                yield e
    finally:
        if cfloor is not None:
            cfloor.close()
