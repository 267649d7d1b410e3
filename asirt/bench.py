"""`asirt bench`: which runs a scenario is made of, running them, and showing progress.

Each scenario turns a topology and options into a list of entries; each entry is one
orchestrator run (fresh region, fresh pinned workers) whose merged histograms become an
:class:`asirt.results.Entry`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from asirt import histogram, orchestrator, stun_scenario
from asirt.cfloor import CFloor, compiler
from asirt.errors import BadInput, FeatureMissing
from asirt.orchestrator import RunSpec, WorkerSpec
from asirt.results import Entry
from asirt.topology import Topology
from workers.pingpong import TRANSPORTS

DEFAULT_SCENARIO = "pingpong"


@dataclass(frozen=True)
class Options:
    """What the command line chose, for every scenario (each reads what applies to it)."""
    transports: tuple[str, ...] = TRANSPORTS
    duration_s: float = 2.0
    floor: bool = True                          # also measure the reference (C floor, raw pingpong)
    protocols: tuple[str, ...] = ("strict", "naive")   # stun handshake variants


def parse_choices(text: str, valid: Sequence[str], option: str) -> list[str]:
    """``"spin,sem"`` -> ["spin", "sem"], refusing anything not in ``valid``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in valid]
    if bad or not items:
        raise BadInput(f"{option} {text!r}", f"unknown value {bad[0]!r}" if bad else "is empty",
                       f"choose from {', '.join(valid)} (comma-separated)")
    return list(dict.fromkeys(items))


class ProgressLine:
    """One status line on stderr, rewritten in place on a terminal, one line per entry otherwise."""

    def __init__(self, total: int, stream=sys.stderr, quiet: bool = False) -> None:
        self.total, self.stream, self.quiet = total, stream, quiet
        self.tty = stream.isatty()
        self.index, self.label, self._last = 0, "", 0.0

    def start(self, label: str) -> None:
        self.index += 1
        self.label = label
        if not self.quiet and not self.tty:
            print(f"[{self.index}/{self.total}] {label} ...", file=self.stream, flush=True)

    def update(self, fraction: float, slots: np.ndarray) -> None:
        now = time.monotonic()
        if self.quiet or not self.tty or now - self._last < 0.2:
            return
        self._last = now
        samples = int(slots["samples"].sum())
        print(f"\r[{self.index}/{self.total}] {self.label}  {fraction:4.0%}  "
              f"{samples:,} samples\033[K", end="", file=self.stream, flush=True)

    def done(self, summary: str) -> None:
        if self.quiet:
            return
        prefix = "\r" if self.tty else ""
        end = "\033[K\n" if self.tty else "\n"
        print(f"{prefix}[{self.index}/{self.total}] {self.label}  {summary}", end=end,
              file=self.stream, flush=True)


@dataclass(frozen=True)
class Pair:
    a: int
    b: int
    kind: str   # "siblings" (or emulated siblings) or "cross-core"


def pingpong_pairs(topo: Topology) -> list[Pair]:
    """Every sibling pair, plus one pair on different cores for contrast where there is one."""
    pairs = [Pair(a, b, "siblings") for a, b in topo.sibling_pairs()]
    cores = [c for c in topo.usable_cores if c]
    if len(cores) >= 2:
        pairs.append(Pair(cores[0][0], cores[1][0], "cross-core"))
    if not pairs:
        raise BadInput("--cpus", f"the selected CPUs {list(topo.cpus)} form no pair",
                       "select at least two CPUs")
    return pairs


def _summary_text(counts: np.ndarray) -> str:
    s = histogram.summarize(counts)
    if not s.count:
        return "no samples"
    return f"p50 {s.p50} ns  p99 {s.p99} ns  ({s.count:,} samples)"


def count_pingpong(topo: Topology, opts: Options) -> int:
    nfloor = 1 if opts.floor and compiler() is not None else 0
    return len(pingpong_pairs(topo)) * (len(opts.transports) + nfloor)


def run_pingpong(topo: Topology, opts: Options,
                 progress: ProgressLine | None = None) -> Iterator[Entry]:
    """Yield the floor entry (when a compiler exists) and one entry per transport, per pair."""
    transports, duration_s, floor = opts.transports, opts.duration_s, opts.floor
    pairs = pingpong_pairs(topo)
    cfloor: CFloor | None = None
    floor_note = "skipped (--no-floor)"
    if floor:
        try:
            cfloor, floor_note = CFloor(), ""
        except FeatureMissing as err:
            floor_note = str(err)
    try:
        for pair in pairs:
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
                common = {"transport": t}
                spec = RunSpec(
                    workers=[WorkerSpec(pair.a, "pingpong", {**common, "side": "ping", "peer": 1}),
                             WorkerSpec(pair.b, "pingpong", {**common, "side": "pong", "peer": 0})],
                    metrics=["roundtrip"], duration_s=duration_s, cores=[[0, 1]],
                    emulated=topo.emulated, l1d_bytes=topo.l1d_bytes or 0)
                out = orchestrator.run(spec, progress.update if progress else None)
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


def check_duration(duration: float) -> float:
    if not (math.isfinite(duration) and duration > 0):
        raise BadInput(f"--duration {duration}", "must be a positive, finite number of seconds",
                       "for example --duration 2")
    return duration


def run_asi(topo: Topology, opts: Options,
            progress: ProgressLine | None = None) -> Iterator[Entry]:
    """One vCPU of one VM on every selected CPU, timing page walks, ASI switches and flushes."""
    from asirt import asi_scenario, uarch
    cpus = list(topo.cpus)
    slot = {cpu: i for i, cpu in enumerate(cpus)}
    cores = [[slot[c] for c in core] for core in topo.usable_cores if core]
    params: dict = {}
    if progress:
        progress.start(f"asi cpus {','.join(map(str, cpus))}")
    l1d = topo.l1d_bytes     # None: sysfs does not say; 0 below makes uarch use its default
    out = orchestrator.run(RunSpec(
        workers=[WorkerSpec(cpu, "asi", params) for cpu in cpus],
        metrics=asi_scenario.METRICS, duration_s=opts.duration_s, cores=cores,
        emulated=topo.emulated, l1d_bytes=l1d or 0,
        extra_sections=asi_scenario.sections(len(cpus), len(cores), params),
        init=lambda region: asi_scenario.init(region, cores, l1d or 0, params),
        collect=asi_scenario.counters), progress.update if progress else None)
    hists = {m: out.merged(i) for i, m in enumerate(asi_scenario.METRICS)}
    extra: dict = {"emulated": topo.emulated, "l1d_bytes": l1d, "l1d_assumed": not l1d}
    if not l1d:
        extra["warnings"] = [f"sysfs does not give the L1D size (no cache/index*/ of level 1, "
                             f"type Data): flushes evict an assumed "
                             f"{uarch.DEFAULT_L1D // 1024} KiB"]
    e = Entry("asi", "asi", "-", cpus, out.elapsed_s, hists=hists,
              counters=dict(out.collected or {}), failures=[str(f) for f in out.failures],
              extra=extra)
    if progress:
        progress.done("FAILED: " + "; ".join(e.failures) if e.failures else
                      "  ".join(f"{m} p50 {histogram.summarize(h).p50} ns"
                                for m, h in list(hists.items())[:3]))
    yield e


class Scenario(NamedTuple):
    help: str
    count: Callable[[Topology, Options], int]     # entries it will produce (for progress)
    run: Callable[[Topology, Options, ProgressLine | None], Iterator[Entry]]


SCENARIOS: dict[str, Scenario] = {
    "pingpong": Scenario("raw round trip of each IPI-like transport per CPU pair",
                         count_pingpong, run_pingpong),
    "stun": Scenario("strict and naive sibling stun round trips, unstun and VM-entry barrier",
                     stun_scenario.count_stun, stun_scenario.run_stun_scenario),
    "asi": Scenario("page walks, asi_enter/exit, faults, flushes and shootdowns on every CPU",
                    lambda topo, opts: 1, run_asi),
}
