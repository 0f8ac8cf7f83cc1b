"""What every study shares: the output folder, the per-item loop, tables and figures.

Each study is written as a function ``item -> row dict`` (one sentence in, one table row out) and a
summary over the rows, so the per-item work runs unchanged under any runner: :func:`run_items`
maps it serially or over a local process pool with a progress bar.
"""
from __future__ import annotations

import csv
import multiprocessing
import os

from tqdm import tqdm

from ..errors import GradGraphError

__all__ = ["ExperimentError", "prepare_out", "run_items", "write_csv", "new_figure", "save_figure"]


class ExperimentError(GradGraphError):
    """A study cannot run as asked (an existing output folder, a bad option)."""


def prepare_out(out, files, overwrite=False):
    """Create ``out`` and check that none of ``files`` (names inside it) exists unless ``overwrite``."""
    existing = [f for f in files if os.path.exists(os.path.join(out, f))]
    if existing and not overwrite:
        raise ExperimentError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace "
                              "them or choose another --out")
    os.makedirs(out, exist_ok=True)
    return out


def _call(args):
    fn, item = args
    return fn(item)


def run_items(fn, items, *, workers=1, desc=None):
    """``[fn(item) for item in items]`` with a tqdm bar; ``workers > 1``: a process pool.

    ``fn`` must be a module-level function (it is pickled by name); state it needs, such as a model,
    should be loaded lazily per process (see the studies' ``_model()`` helpers). Order is kept.
    """
    items = list(items)
    if workers < 1:
        raise ExperimentError(f"--workers must be at least 1, got {workers}")
    if workers == 1 or len(items) < 2:
        return [fn(it) for it in tqdm(items, desc=desc, unit="item")]
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    with ctx.Pool(workers) as pool:
        return list(tqdm(pool.imap(_call, [(fn, it) for it in items], chunksize=4),
                         total=len(items), desc=desc, unit="item"))


def write_csv(path, rows, columns=None):
    """Write a list of dicts as CSV (columns: ``columns`` or the first row's keys)."""
    columns = columns or (list(rows[0]) if rows else [])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def new_figure(ncols=1, width=5.0, height=3.6):
    """A matplotlib figure with ``ncols`` axes side by side (the Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


BRANCH_COLORS = {"query": "#4C72B0", "key": "#DD8452", "value": "#55A868", "skip": "#8172B3"}
BRANCHES = ("query", "key", "value", "skip")


def branch_name(label):
    """"addmm @ ....attention.self.key" -> "key"; the residual add of attention.output -> "skip"."""
    op, _, module = label.partition(" @ ")
    if op == "add":
        return "skip"
    last = module.rsplit(".", 1)[-1]
    return last if last in ("query", "key", "value") else label


def bar_groups(ax, groups, series, values, *, errors=None, colors=BRANCH_COLORS):
    """Grouped bars: one group per entry of ``groups``, one bar per series; ``values[s][g]``."""
    import numpy as np
    n = len(series)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, s in enumerate(series):
        ax.bar(x + (i - (n - 1) / 2) * width, values[s], width, label=s, color=colors.get(s),
               yerr=None if errors is None else errors[s], capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.axhline(0, color="black", linewidth=0.5)
