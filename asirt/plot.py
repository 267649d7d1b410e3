"""PNG latency plots of a run directory (needs the ``plot`` extra: matplotlib).

One figure per metric: every entry's percentile distribution on HdrHistogram's usual axis,
1/(1-percentile) on a log scale, read from the run's own ``.hgrm`` files.
"""
from __future__ import annotations

import glob
import os
from collections import defaultdict

from asirt import histogram
from asirt.errors import FeatureMissing


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_run(run_dir: str) -> list[str]:
    """Write ``<metric>.png`` for every metric with .hgrm files in ``run_dir``; return the paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise FeatureMissing("matplotlib", "it is not installed",
                             "pip install 'asirt[plot]' to get PNG plots") from err
    by_metric: dict[str, list[str]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(run_dir, "*.hgrm"))):
        metric = os.path.basename(path)[:-len(".hgrm")].rpartition("-")[2]
        by_metric[metric].append(path)
    written = []
    for metric, paths in by_metric.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for path in paths:
            rows = [r for r in histogram.read_hgrm(path) if r.percentile < 1.0]
            if not rows:
                continue
            label = os.path.basename(path)[:-len(f"-{metric}.hgrm")]
            ax.plot([1 / (1 - r.percentile) for r in rows], [r.value for r in rows], label=label)
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
    return written
