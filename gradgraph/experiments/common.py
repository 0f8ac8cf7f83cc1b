"""What every study shares: the output folder, the per-item loop, tables and figures.

Each study's per-item work runs through the batch runner (:func:`gradgraph.batch.run`, see
``docs/batch.md``): an item is captured by a build object, and one ``call`` query -- a module-level
function ``graph -> JSON-serialisable answer`` -- computes everything the study needs from the
graph, sharing the passes between its answers. The study turns the answers into table rows. So
``--workers N`` and ``--engine dask`` apply to every study, the per-item results are kept in
``OUT/_batch/`` and an interrupted run picks up where it stopped.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import os

import numpy as np

from ..errors import GradGraphError

__all__ = ["ExperimentError", "prepare_out", "one_thread", "check_runner", "run_batch", "path_entropies", "write_csv", "new_figure",
           "save_figure", "ENGINES"]

ENGINES = ("local", "dask")


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


def one_thread(study):
    """Decorator: run a study with one thread in every pool (restored afterwards). Its models are small: threads
    within one op cost more than they bring (tiny training steps took 40x the CPU time with two
    threads on a busy machine); parallel work comes from ``--workers``, whose processes also run
    one thread each, so every item is computed with the same arithmetic however many workers."""
    @functools.wraps(study)
    def run(*args, **kwargs):
        from ..threads import get_num_threads, set_num_threads
        before = get_num_threads()
        set_num_threads(1)      # every pool (torch, numba, numpy's BLAS), as in a batch worker
        try:
            return study(*args, **kwargs)
        finally:
            set_num_threads(before)
    return run


def check_runner(workers, engine):
    """Validate ``--workers`` / ``--engine`` before any work starts."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ExperimentError(f"--workers must be a positive integer, got {workers!r}")
    if engine not in ENGINES:
        raise ExperimentError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def run_batch(items, build, function, out, stage, config, *, workers=1, engine="local",
              overwrite=False, sources=None, dynamic="auto"):
    """Capture every item and answer ``function(graph)`` on it through :func:`gradgraph.batch.run`.

    Parameters
    ----------
    items : list of (id, value)
        Ids are unique strings; ``build`` turns a value into the model's inputs.
    build : object or callable
        The batch runner's build (``setup()`` / ``inputs(value)``, or ``value -> (model, args,
        kwargs, output)``).
    function : str
        ``"package.module:name"`` of the ``call`` query: ``graph -> JSON-serialisable answer``.
    out, stage : str
        The per-item results go to ``out/_batch/<stage>-<hash of config>/``.
    config : dict
        Everything besides the item that decides an answer (checkpoint, sink, ...): a folder
        written with another configuration is never reused.
    workers : int
        1: every item in this process; N > 1: N worker processes (or a Dask ``LocalCluster`` of N
        with ``engine="dask"``).
    overwrite : bool
        Recompute every item; otherwise items already answered in the folder (an interrupted run)
        are reused.
    sources, dynamic :
        As for :func:`gradgraph.batch.run` (``dynamic=None``: every item has the same shapes).

    Returns
    -------
    list of (answer, sink value), in the order of ``items``.

    Raises
    ------
    ExperimentError
        An item failed (its error is named).
    """
    from ..batch import run
    check_runner(workers, engine)
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    folder = os.path.join(out, "_batch", f"{stage}-{digest}")
    n = (0 if workers == 1 else workers) if engine == "local" else workers
    run(items, build, [{"query": "call", "function": function, "name": stage}], folder, engine=engine,
        workers=n, resume=not overwrite, force=overwrite, sources=sources, dynamic=dynamic)
    import pandas as pd
    table = pd.read_parquet(folder, columns=["item", "status", "error", "result", "sink_value"])
    table = table.drop_duplicates("item", keep="last").set_index("item")
    answers = []
    for key, _ in items:
        row = table.loc[str(key)]
        if row["status"] != "ok":
            raise ExperimentError(f"{stage}: item {key} failed: {row['error']} (results in {folder})")
        answers.append((json.loads(row["result"]), float(row["sink_value"])))
    return answers


def path_entropies(g, groups):
    """From one entropy pass: (the whole graph's entropy, ``{source: entropy per group}``).

    ``groups``: ``{source name: axis}`` as for :meth:`GradGraph.entropy` (e.g. ``{name: 1}``: one
    entropy per token). Equal to ``g.entropy()`` and ``g.entropy(groups=groups)``, which would run
    the pass twice.
    """
    from ..algorithms.entropy import _h, _labels, _pairs
    pairs = _pairs(g)
    per = {}
    for name, axis in groups.items():
        lab = _labels(g, name, axis)
        z, r, s = pairs[name]
        per[name] = _h(np.bincount(lab, weights=z), np.bincount(lab, weights=r), s)
    live = [(z, r, s) for z, r, s in pairs.values() if np.any(z > 0)]
    if not live:
        return float("nan"), per
    top = max(s for _, _, s in live)
    Z = sum(float(z.sum()) * np.exp(s - top) for z, r, s in live)
    R = sum(float(r.sum()) * np.exp(s - top) for z, r, s in live)
    return float(_h(np.array([Z]), np.array([R]), top)[0]), per


def branch_answer(b):
    """A :class:`Branches` as JSON: per group the best path's value through each branch (0 where
    no path goes through it) and the index of the best branch; branches named as in Fig. 2/4."""
    values = np.where(b.sign != 0, b.values, 0.0)
    return {"labels": [branch_name(lab) for lab in b.labels], "values": values.tolist(),
            "best": [int(x) for x in b.best]}


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
