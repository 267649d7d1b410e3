"""The parent's reading of what the CPUs published: counters and events, by name.

Counters are per CPU (``cpu_state.counters``, names in shm_layout.counters) and summed over the
CPUs an entry reports; events come back from every worker's ring (the last EVENTS of each),
oldest first, with names instead of numbers.
"""
from __future__ import annotations

from typing import Any, Sequence

from shm_layout import Region
from shm_layout.counters import COUNTERS
from shm_layout.cpu import EVENT_FIELDS, EVENTS, EventKind, Source, Word, describe_token
from shm_layout.sections import Mode

__all__ = ["counters", "per_slot_counters", "events", "EventLog", "describe", "violations_of",
           "VIOLATION_KINDS", "LIVENESS_KINDS", "VIOLATION_COUNTERS"]

VIOLATION_KINDS = ("S1", "S2", "S3", "LEAK")
LIVENESS_KINDS = ("TIMEOUT", "FENCE_DEAD", "FENCE_STOPPED", "FENCE_CORRUPT", "ABORT", "STALL",
                  "CORRUPT")
#: the counters that are violations, by checker and property
VIOLATION_COUNTERS = ("check.s1", "check.s2", "check.s3", "monitor.s1", "monitor.s2",
                      "check.leaks")


def counters(region: Region, slots: Sequence[int] | None = None) -> dict[str, int]:
    """Every counter summed over ``slots`` (default: all)."""
    arr = region.array("cpu_state")["counters"]
    rows = arr if slots is None else arr[list(slots)]
    total = rows.sum(axis=0)
    return {name: int(total[i]) for i, name in enumerate(COUNTERS)}


def per_slot_counters(region: Region) -> list[dict[str, int]]:
    arr = region.array("cpu_state")["counters"]
    return [{name: int(row[i]) for i, name in enumerate(COUNTERS)} for row in arr]


def violations_of(totals: dict[str, int]) -> dict[str, int]:
    """The violation counters of summed counters."""
    return {k: totals[k] for k in VIOLATION_COUNTERS}


def events(region: Region, cpus: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Every event still in the rings, oldest first; ``cpus[slot]`` names each slot's CPU."""
    rings = region.array("cpu_events")
    out = []
    for ring in rings:
        head = int(ring["head"])
        for k in range(max(0, head - EVENTS), head):
            ev = ring["ev"][k % EVENTS]
            out.append(describe({f: int(ev[f]) for f in EVENT_FIELDS}, cpus))
    out.sort(key=lambda e: e["ns"])
    return out


class EventLog:
    """Every worker's events, read from the rings while a run goes on, so that a long run
    keeps its early ones (a ring holds only the last EVENTS of its worker). :meth:`read`
    takes what came since the last read. Events overwritten before a read are counted in
    ``lost``; of each kind only the first ``per_kind`` are kept (``dropped`` counts the rest:
    a broken protocol's violations come by the thousand, and the counters have them all).
    """

    def __init__(self, per_kind: int = 1000) -> None:
        self.per_kind = per_kind
        self.events: list[dict[str, Any]] = []
        self.kept: dict[str, int] = {}
        self.lost = self.dropped = 0
        self._heads: list[int] | None = None

    def read(self, region: Region, cpus: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """The events written since the last read, oldest first (also kept in ``events``)."""
        rings = region.array("cpu_events")
        heads = [int(h) for h in rings["head"]]
        last = self._heads or [0] * len(heads)
        new = []
        for s, head in enumerate(heads):
            if head == last[s]:
                continue
            ring = rings[s]
            # an entry is whole once head passed it; the one at head may be half-written over
            # the oldest, so never read that far back; re-read head after, for what the
            # worker overwrote meanwhile
            lo = max(last[s], head - EVENTS + 1)
            rows = ring["ev"][[k % EVENTS for k in range(lo, head)]].tolist()
            recs = [dict(zip(EVENT_FIELDS, row)) for row in rows]
            safe = int(ring["head"]) - EVENTS + 1
            kept = [r for k, r in zip(range(lo, head), recs) if k >= safe]
            self.lost += (lo - last[s]) + len(recs) - len(kept)
            new += [describe(r, cpus) for r in kept]
        self._heads = heads
        new.sort(key=lambda e: e["ns"])
        for e in new:
            n = self.kept.get(e["kind"], 0)
            if n < self.per_kind:
                self.kept[e["kind"]] = n + 1
                self.events.append(e)
            else:
                self.dropped += 1
        return new


def describe(rec: dict[str, int], cpus: Sequence[int] | None = None) -> dict[str, Any]:
    """An event as result.json shows it."""
    kind = EventKind(rec["kind"])
    source = Source(rec["source"])

    def cpu(s: int) -> int:
        return s if cpus is None or not 0 <= s < len(cpus) else cpus[s]

    out: dict[str, Any] = {"ns": rec["ns"], "kind": kind.name, "source": source.name.lower(),
                           "slot": rec["slot"], "cpu": cpu(rec["slot"]),
                           "other_slot": rec["other"], "other_cpu": cpu(rec["other"])}
    if kind in (EventKind.S1, EventKind.S2) and source == Source.MONITOR:
        # slot = the monitor; other = the CPU in the wrong mode; c = the guest
        out["guest_slot"], out["guest_cpu"] = rec["c"], cpu(rec["c"])
        out["other_mode"], out["other_domain"] = _mode_name(rec["a"]), rec["b"]
    elif kind in (EventKind.S1, EventKind.S2):
        out["mode"], out["other_mode"], out["other_domain"] = (
            _mode_name(rec["a"]), _mode_name(rec["b"]), rec["c"])
    elif kind in (EventKind.S3, EventKind.LEAK):
        out["lane"], out["token"], out["domain"] = rec["a"], rec["b"], rec["c"]
        out["saw"] = describe_token(rec["b"])
    elif kind == EventKind.CORRUPT:
        out["word"] = Word(rec["a"]).name.lower() if rec["a"] in iter(Word) else str(rec["a"])
        out["value"], out["found_by"] = rec["b"], "owner" if rec["c"] else "reader"
    else:
        out["phase"], out["waited_ns"], out["detail"] = rec["a"], rec["b"], rec["c"]
    return out


def _mode_name(m: int) -> str:
    try:
        return Mode(m).name
    except ValueError:
        return str(m)
