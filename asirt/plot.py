"""PNG plots of a run directory (needs the ``plot`` extra: matplotlib).

One figure per metric: every entry's percentile distribution on HdrHistogram's usual axis,
1/(1-percentile) on a log scale, read from the run's own ``.hgrm`` files. A strategy
comparison (``asirt bench kvm``) adds, from result.json: exit-handling latency CDFs per
strategy (``kvm-exit-handling.png``), security against throughput (``kvm-security.png``),
where each lane's time goes (``kvm-time.png``) and, with ``--sweep``, guest fraction and
leaks against the swept value (``kvm-sweep.png``).
"""
from __future__ import annotations

import glob
import json
import os
from collections import defaultdict

from asirt import histogram
from asirt.errors import FeatureMissing
from asirt.results import hgrm_name


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise FeatureMissing("matplotlib", "it is not installed",
                             "pip install 'asirt[plot]' to get PNG plots") from err
    return plt


def plot_run(run_dir: str, scenarios: list[dict] | None = None) -> list[str]:
    """Write ``<metric>.png`` for every metric with .hgrm files in ``run_dir``, and the
    comparison's figures for its kvm entries (``scenarios``: result.json's, read from
    ``run_dir`` when not given); return the paths."""
    plt = _pyplot()
    if scenarios is None:
        try:
            with open(os.path.join(run_dir, "result.json")) as f:
                scenarios = json.load(f).get("scenarios", [])
        except (OSError, ValueError):
            scenarios = []
    by_metric: dict[str, list[str]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(run_dir, "*.hgrm"))):
        metric = os.path.basename(path)[:-len(".hgrm")].rpartition("-")[2]
        by_metric[metric].append(path)
    written = []
    for metric, paths in by_metric.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drawn = False
        for path in paths:
            rows = [r for r in histogram.read_hgrm(path) if r.percentile < 1.0]
            if not rows:
                continue
            label = os.path.basename(path)[:-len(f"-{metric}.hgrm")]
            ax.plot([1 / (1 - r.percentile) for r in rows], [r.value for r in rows], label=label)
            drawn = True
        if not drawn:                   # every entry recorded nothing of this metric
            plt.close(fig)
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [1, 2, 10, 100, 1000, 10000]
        ax.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%"])
        ax.set_xlabel("percentile")
        ax.set_ylabel(f"{metric} (ns)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_title(f"{metric} — {os.path.basename(os.path.normpath(run_dir))}")
        out = os.path.join(run_dir, f"{metric}.png")
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written + plot_strategies(plt, run_dir, scenarios)


# -- the strategy comparison (asirt bench kvm) --------------------------------------------

STRATEGY_COLORS = {"none": "#d62728", "smt-off": "#7f7f7f", "always": "#1f77b4",
                   "coresched": "#ff7f0e", "asi": "#2ca02c", "kcs": "#9467bd",
                   "asi+kcs": "#17becf"}
TIME_PARTS = ("guest", "handler", "halted", "stun wait", "stunned", "flush", "barrier",
              "forced idle", "host tasks", "idle", "checks", "overhead")


def _color(strategy: str) -> str:
    return STRATEGY_COLORS.get(strategy, "#333333")


def plot_strategies(plt, run_dir: str, scenarios: list[dict]) -> list[str]:
    """The comparison's figures (kvm entries of result.json): exit-handling CDFs, security
    against throughput, where each lane's time goes, and, for a sweep, the swept curves."""
    kvm = [s for s in scenarios if s.get("scenario") == "kvm" and isinstance(s.get("kvm"), dict)]
    if not kvm:
        return []
    return _strategy_figures(plt, run_dir, kvm)


def _strategy_figures(plt, run_dir: str, kvm: list[dict]) -> list[str]:
    swept = [s for s in kvm if s.get("sweep")]
    first = [s for s in kvm if not s.get("sweep")] or [
        s for s in kvm if s["sweep"]["value"] == kvm[0]["sweep"]["value"]]
    written = [_exit_cdfs(plt, run_dir, first), _security(plt, run_dir, first),
               _time_breakdown(plt, run_dir, first)]
    if swept:
        written.append(_sweep(plt, run_dir, swept))
    return [w for w in written if w]


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _exit_cdfs(plt, run_dir: str, group: list[dict]) -> str | None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for s in group:
        path = os.path.join(run_dir, hgrm_name(s.get("label", ""), "exit_handling"))
        if not os.path.exists(path):
            continue
        rows = [r for r in histogram.read_hgrm(path) if r.value > 0]
        if not rows:
            continue
        ax.plot([r.value for r in rows], [r.percentile for r in rows], label=s["strategy"],
                color=_color(s["strategy"]))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("exit handling (ns)")
    ax.set_ylabel("fraction of exits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("exit-handling latency, CDF per strategy")
    return _save(plt, fig, os.path.join(run_dir, "kvm-exit-handling.png"))


def _leaks(s: dict) -> float:
    lk = s["kvm"]["leaks_per_s"]
    return lk["host"] + lk["other_vm"]


def _security(plt, run_dir: str, group: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in group:
        x, y = 100 * s["kvm"]["guest_fraction"], _leaks(s)
        ax.scatter([x], [max(y, 0.1)], color=_color(s["strategy"]), s=60,
                   marker="o" if s.get("claims_safety") else "x")
        ax.annotate(s["strategy"], (x, max(y, 0.1)), textcoords="offset points",
                    xytext=(6, 4), fontsize="small")
    ax.set_yscale("log")
    ax.set_xlabel("guest-time fraction (%)  ->  more throughput")
    ax.set_ylabel("leaks per second (0 drawn at 0.1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("security against throughput (o: claims safety, x: does not)")
    return _save(plt, fig, os.path.join(run_dir, "kvm-security.png"))


def _time_breakdown(plt, run_dir: str, group: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [s["strategy"] for s in group]
    bottom = [0.0] * len(group)
    cmap = plt.get_cmap("tab20")
    for i, part in enumerate(TIME_PARTS):
        vals = [100 * s["kvm"]["time"].get(part, 0.0) for s in group]
        ax.bar(names, vals, bottom=bottom, label=part, color=cmap(i))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("share of each lane's time (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="x-small", ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("where the time goes, per strategy")
    return _save(plt, fig, os.path.join(run_dir, "kvm-time.png"))


def _sweep(plt, run_dir: str, swept: list[dict]) -> str:
    key = swept[0]["sweep"]["key"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    by: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for s in swept:
        by[s["strategy"]].append((s["sweep"]["value"], 100 * s["kvm"]["guest_fraction"],
                                  _leaks(s)))
    for name, pts in by.items():
        pts.sort()
        xs = [p[0] for p in pts]
        a1.plot(xs, [p[1] for p in pts], marker="o", label=name, color=_color(name))
        a2.plot(xs, [max(p[2], 0.1) for p in pts], marker="o", label=name, color=_color(name))
    a1.set_xlabel(key)
    a1.set_ylabel("guest-time fraction (%)")
    a2.set_xlabel(key)
    a2.set_ylabel("leaks per second (0 drawn at 0.1)")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize="small")
    fig.suptitle(f"sweep of {key}")
    return _save(plt, fig, os.path.join(run_dir, "kvm-sweep.png"))
