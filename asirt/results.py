"""The run directory: result.json, one .hgrm per latency metric, summary.csv, and the table.

A run directory is written into a hidden temporary sibling and renamed into place, so a
reader never sees a half-written one; an interrupted run still writes what it completed
(``"interrupted": true``).
"""
from __future__ import annotations

import csv
import datetime as _dt
import errno
import io
import json
import os
import platform
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import numpy as np

from asirt import histogram
from asirt.errors import BadInput

SCHEMA_VERSION = 2   # 2: every entry has its label and its unsafe verdict
SUMMARY_FIELDS = ("count", "min", "p50", "p90", "p99", "p999", "max", "mean")


@dataclass
class Entry:
    """One scenario entry: a (scenario, strategy, transport, cpus) combination and its results."""
    scenario: str
    strategy: str
    transport: str
    cpus: list[int]
    duration_s: float
    hists: dict[str, np.ndarray] = field(default_factory=dict)   # metric -> merged counts
    counters: dict[str, int] = field(default_factory=dict)
    leaks: list[dict[str, Any]] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: the variant claims to be safe (a violation or leak then fails the run); None: n/a
    claims_safety: bool | None = None
    #: why this entry's own check failed (beyond worker failures and safety): the run did not
    #: earn its success -- no progress, no samples, a fault not survived or misjudged, ...
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)          # e.g. the floor comparison
    #: what tells this entry from others of the same combination (a sweep's "gadgets=0.1")
    tag: str = ""

    @property
    def label(self) -> str:
        return label_of(self.scenario, self.strategy, self.transport, self.cpus, self.tag)

    def summary(self, metric: str) -> dict[str, Any]:
        return histogram.to_dict(histogram.summarize(self.hists[metric]))

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "scenario": self.scenario, "strategy": self.strategy, "transport": self.transport,
            "cpus": list(self.cpus), "duration_s": round(self.duration_s, 6),
            "metrics": {m: self.summary(m) for m in self.hists},
            "counters": {k: int(v) for k, v in self.counters.items()},
            "leaks": self.leaks, "violations": self.violations, "failures": self.failures,
            "claims_safety": self.claims_safety, "problems": self.problems,
            "unsafe": self.unsafe,
            "ok": not (self.failures or self.problems or self.unsafe),
            **self.extra,
        }

    @property
    def unsafe(self) -> bool:
        """A variant that claims safety showed a violation or a leak."""
        return bool(self.claims_safety and (self.counters.get("violations") or self.leaks))


def label_of(scenario: str, strategy: str, transport: str, cpus: list[int],
             tag: str = "") -> str:
    """An entry's name in its run directory (its .hgrm files): unique within a run."""
    parts = [scenario, strategy, transport, "cpu" + "_".join(map(str, cpus)), tag]
    return "-".join(p for p in parts if p and p != "-")


def hgrm_name(label: str, metric: str) -> str:
    """The file name of an entry's histogram of ``metric``."""
    return _safe(f"{label}-{metric}.hgrm")


def check_problems(entries: list[Entry]) -> list[str]:
    """Why a run must exit 1: a worker failed, a variant that claims safety showed a violation
    or a leak, or an entry's own check failed (its ``problems``)."""
    out = []
    for e in entries:
        where = (f"{e.scenario} {e.strategy} {e.transport} cpus {','.join(map(str, e.cpus))}"
                 + (f" {e.tag}" if e.tag else ""))
        out += [f"{where}: {f}" for f in e.failures]
        if e.unsafe:
            leaks = e.counters.get("check.leaks", len(e.leaks))
            out.append(f"{where}: {e.counters.get('violations', 0)} violations (leaks among "
                       f"them: {leaks}) under a variant that claims safety")
        out += [f"{where}: {p}" for p in e.problems]
    return out


def host_info() -> dict[str, str]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except FileNotFoundError:
        pass
    try:
        version = metadata.version("asirt")
    except metadata.PackageNotFoundError:  # running from a source tree
        version = "unknown"
    return {"hostname": socket.gethostname(), "kernel": platform.release(), "cpu_model": model,
            "python": platform.python_version(), "asirt_version": version}


def new_run_id(scenario: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{scenario}-{os.getpid()}"


def build_result(run_id: str, started_at: str, topology: dict, system: dict, config: dict,
                 entries: list[Entry], interrupted: bool = False,
                 error: str | None = None) -> dict[str, Any]:
    """result.json; ``error``: why the run stopped before its last entry, when an error did."""
    result = {
        "schema_version": SCHEMA_VERSION, "run_id": run_id, "started_at": started_at,
        "host": host_info(), "topology": topology, "system": system, "config": config,
        "scenarios": [e.to_json() for e in entries], "interrupted": interrupted,
    }
    return {**result, "error": error} if error is not None else result


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


_OUT_FIX = "pass a directory this user can create run directories in with --out"


def prepare_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` if needed and prove a run directory can be made in it, so that an
    unusable --out is refused before anything runs rather than after the benchmark.

    The probe creates and removes an empty hidden directory: permission bits alone do not
    tell (root ignores them; /proc and /sys refuse new entries whatever the mode says).
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise BadInput(f"--out {out_dir}", f"cannot create it ({err.strerror or err})",
                       _OUT_FIX) from err
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=out_dir))
    except OSError as err:
        raise BadInput(f"--out {out_dir}", f"cannot create a run directory in it "
                       f"({err.strerror or err})", _OUT_FIX) from err


def write_run(out_dir: str, result: dict[str, Any], entries: list[Entry]) -> str:
    """Write the run directory ``out_dir/<run_id>`` atomically; returns its path.

    OSError, naming the path, if it cannot (a full disk, a directory become read-only):
    nothing half-written stays behind.
    """
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, result["run_id"])
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "a run directory of that name exists", final)
    tmp = os.path.join(out_dir, f".tmp-{result['run_id']}")
    os.makedirs(tmp)
    try:
        for e in entries:
            for metric, counts in e.hists.items():
                histogram.write_hgrm(os.path.join(tmp, hgrm_name(e.label, metric)), counts)
        with open(os.path.join(tmp, "summary.csv"), "w", newline="") as f:
            f.write(summary_csv(entries))
        with open(os.path.join(tmp, "result.json"), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def summary_csv(entries: list[Entry]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["scenario", "strategy", "transport", "cpus", "metric", "unit", *SUMMARY_FIELDS])
    for e in entries:
        for metric in e.hists:
            s = e.summary(metric)
            wr.writerow([e.scenario, e.strategy, e.transport, " ".join(map(str, e.cpus)), metric,
                         s["unit"], *("" if s[k] is None else s[k] for k in SUMMARY_FIELDS)])
    return buf.getvalue()


def fmt_ns(v: Any) -> str:
    """A time in ns as the tables print it: 253ns, 16.9us, 1.85ms."""
    if v is None:
        return "-"
    v = float(v)
    if v >= 1e6:
        return f"{v / 1e6:.2f}ms"
    if v >= 1e4:
        return f"{v / 1e3:.1f}us"
    return f"{v:.0f}ns"


#: counters worth a row of their own in the table
TABLE_COUNTERS = ("cpu.transitions", "kvm.cycles", "violations", "check.leaks",
                  "asi.shootdowns_sent")


def render(head: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> str:
    """Columns as wide as their widest cell (left-aligned, those in ``right`` right-aligned),
    a dashed rule under the head."""
    right = set(right)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [head, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                     for r in lines)


def format_table(scenarios: list[dict[str, Any]]) -> str:
    """A fixed-width table of every metric of every entry (from result.json's ``scenarios``);
    the ``kvm`` entries as the strategy comparison (asirt.comparison).

    ``x ref`` is the entry's first metric's p50 over its reference's p50: the C cache-line
    floor (pingpong, stun over spin) or the raw pingpong of the same transport (stun).
    """
    kvm = [s for s in scenarios if s.get("scenario") == "kvm" and "kvm" in s]
    others = [s for s in scenarios if not (s.get("scenario") == "kvm" and "kvm" in s)]
    if kvm:
        from asirt.comparison import format_strategies
        text = format_strategies(kvm)
        return text + ("\n\n" + format_table(others) if others else "")
    head = ["scenario", "strategy", "transport", "cpus", "metric", "count", "p50", "p90", "p99",
            "p99.9", "max", "x ref"]
    rows = []
    for s in scenarios:
        where = [s["scenario"], s["strategy"], s["transport"], ",".join(map(str, s["cpus"]))]
        ratio = (s.get("floor") or s.get("baseline") or {}).get("ratio_p50")
        for i, (metric, m) in enumerate(s["metrics"].items()):
            rows.append([*where, metric, str(m["count"]),
                         *(fmt_ns(m[k]) for k in ("p50", "p90", "p99", "p999", "max")),
                         f"{ratio:.2f}" if i == 0 and ratio is not None else "-"])
        for name in TABLE_COUNTERS:
            if name in s.get("counters", {}):
                rows.append([*where, name, str(s["counters"][name]), *[""] * 6])
        for f in s.get("faults", []):
            what = f"fault {f['fault']}" + (f" {f['word']}" if f.get("word") else "")
            rows.append([*where, f"{what} cpu {f['cpu']}", _fault_seen(f), *[""] * 6])
        for f in s.get("failures", []):
            rows.append([*where, "FAILED", f, *[""] * 6])
        for p in s.get("problems", []):
            rows.append([*where, "FAILED", p, *[""] * 6])
        if s["unsafe"]:
            rows.append([*where, "FAILED", f"{s['counters'].get('violations', 0)} violations "
                         "under a variant that claims safety", *[""] * 6])
    return render(head, rows)


def _fault_seen(f: dict[str, Any]) -> str:
    """A fault's verdict in the table: not injected, NOT DETECTED, or detected (in how long,
    where the detection has a time: a delay fault's has none, only the waits it caused)."""
    if f.get("injected") is False:
        return "not injected"
    if f.get("detected") is None and f.get("injected"):
        return "nobody waits (survivors judged)"
    if not f.get("detected"):
        return "NOT DETECTED"
    ms = f.get("detect_after_ms")
    return "detected" if ms is None else f"detected in {ms} ms"


def _key(s: dict[str, Any]) -> tuple:
    """An entry's identity across runs: its label (a sweep point's tag is in it)."""
    return (s["scenario"], s["strategy"], s["transport"], tuple(s["cpus"]), s["label"])


def _ratio(b: Any, a: Any) -> str:
    """B/A, or "-" where A is 0 or either is missing."""
    return f"{b / a:.2f}" if a and b is not None else "-"


def format_comparison(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    """Entries present in both runs, metric by metric: p50 and p99 of A and B, and B/A."""
    index = {_key(s): s for s in a}
    head = ["scenario", "strategy", "transport", "cpus", "metric", "p50 A", "p50 B", "B/A",
            "p99 A", "p99 B", "B/A"]
    rows = []
    for sb in b:
        sa = index.get(_key(sb))
        if sa is None:
            continue
        for metric, mb in sb["metrics"].items():
            ma = sa["metrics"].get(metric)
            if not ma or not ma["count"] or not mb["count"]:
                continue
            rows.append([*map(str, _key(sb)[:3]), ",".join(map(str, sb["cpus"])), metric,
                         fmt_ns(ma["p50"]), fmt_ns(mb["p50"]), _ratio(mb["p50"], ma["p50"]),
                         fmt_ns(ma["p99"]), fmt_ns(mb["p99"]), _ratio(mb["p99"], ma["p99"])])
    if not rows:
        return "no entry appears in both runs"
    return render(head, rows)


# What report and compare read from result.json, checked on load so that a file of another
# shape is refused with the field named: a type (int never matches a bool), a tuple of
# types, a list of one shape, {str: shape} for any keys, or a dict of required keys
# (optional ones end in "?").
_NUMBER = (int, float, type(None))
_METRIC = {"count": int, **{k: _NUMBER for k in ("min", "p50", "p90", "p99", "p999", "max")}}
_FLOAT = (int, float)
#: what the strategy table and the kvm plots read of a kvm entry (asirt.scenarios.kvm._derive)
_KVM = {"guest_fraction": _FLOAT, "guest_vs_none?": _NUMBER,
        "entries_per_s_per_vcpu": _FLOAT, "restricted_pct": _NUMBER, "stuns_per_s": _FLOAT,
        "flushes_per_s": _FLOAT, "stunned_or_forced_idle": _FLOAT,
        "leaks_per_s": {"host": _FLOAT, "other_vm": _FLOAT},
        "violations": {k: int for k in ("check.s1", "check.s2", "check.s3", "monitor.s1",
                                        "monitor.s2")},
        "gadgets": int, "gadget_hits": int, "time": {str: _FLOAT}}
_SCENARIO = {"label": str, "scenario": str, "strategy": str, "transport": str, "cpus": [int],
             "metrics": {str: _METRIC}, "counters?": {str: int}, "failures?": [str],
             "problems?": [str], "claims_safety?": (bool, type(None)), "unsafe": bool,
             "faults?": [{"fault": str, "cpu": int, "detected?": (bool, type(None)),
                          "injected?": bool, "detect_after_ms?": _NUMBER, "word?": str}],
             "floor?": {"ratio_p50?": _NUMBER}, "baseline?": {"ratio_p50?": _NUMBER},
             "kvm?": _KVM, "sweep?": {"key": str, "value": _FLOAT}}
_RESULT = {"run_id": str, "started_at": str, "host": {"hostname": str, "cpu_model": str},
           "topology": {"emulated?": bool}, "scenarios": [_SCENARIO]}
_MAX_RESULT_BYTES = 256 * 2**20


def _shape_error(value: Any, shape: Any, where: str) -> str | None:
    """Where ``value`` departs from ``shape``, in words; None if it does not."""
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {type(value).__name__}, not a list"
        return next((e for i, v in enumerate(value)
                     if (e := _shape_error(v, shape[0], f"{where}[{i}]"))), None)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is {type(value).__name__}, not an object"
        if list(shape) == [str]:
            return next((e for k, v in value.items()
                         if (e := _shape_error(v, shape[str], f"{where}.{k}"))), None)
        for key, sub in shape.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return f"{where} has no {name!r}"
            if err := _shape_error(value[name], sub, f"{where}.{name}"):
                return err
        return None
    kinds = shape if isinstance(shape, tuple) else (shape,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        return f"{where} is {json.dumps(value)[:40]}, not {names}"
    return None


def load_result(run_dir: str) -> dict[str, Any]:
    """result.json of ``run_dir``; BadInput naming the file and the fix for anything else."""
    fix = "pass a directory written by 'asirt bench' or 'asirt stress'"
    if os.path.isfile(run_dir):
        raise BadInput(f"run directory {run_dir}", "is a file, not a run directory",
                       f"pass the directory that holds it: {os.path.dirname(run_dir) or '.'}")
    path = os.path.join(run_dir, "result.json")
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_RESULT_BYTES + 1)
    except FileNotFoundError as err:
        raise BadInput(f"run directory {run_dir}", "has no result.json", fix) from err
    except OSError as err:
        raise BadInput(path, f"cannot be read ({err.strerror or err})", fix) from err
    if len(data) > _MAX_RESULT_BYTES:
        raise BadInput(path, f"is over {_MAX_RESULT_BYTES >> 20} MiB: not a result.json", fix)
    try:
        result = json.loads(data)
    except (ValueError, RecursionError) as err:   # JSON, UTF-8 and nesting errors
        raise BadInput(path, f"is not JSON asirt wrote ({str(err)[:100]})", fix) from err
    if not isinstance(result, dict) or result.get("schema_version") != SCHEMA_VERSION:
        found = result.get("schema_version") if isinstance(result, dict) else result
        raise BadInput(path, f"schema_version {json.dumps(found)[:40]} is not {SCHEMA_VERSION}",
                       "re-run the benchmark with this asirt version")
    if err := _shape_error(result, _RESULT, "result"):
        raise BadInput(path, f"is not a result asirt wrote: {err}", fix)
    return result
