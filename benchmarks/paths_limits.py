"""Top paths at the limits: long runs of exact ties, and the cost of each enumerated path.

Graphs (built directly from their Jacobians, no model):

* ``ties``: s = sum of n inputs, every weight 1 -- n exactly tied paths; k = 1 and k = 10;
* ``inner ties``: one input fans out to n units summed by the sink (weights 2 and 0.5) -- the n
  ties sit in one inner list;
* ``distinct``: s = sum of n inputs with distinct random weights; k = 1000 and 10000, to give the
  time and the traced memory per enumerated path.

Reported per query: wall time (best of the repeats) and the peak memory traced by tracemalloc
(numpy arrays included), beyond what the graph already holds.

Run: ``.venv/bin/python benchmarks/paths_limits.py [--n 1000000] [--repeats 3]``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt_bytes, machine, print_table  # noqa: E402

from gradgraph.graph import Edge, GradGraph, Node  # noqa: E402
from gradgraph.jacobians import SparseJacobian  # noqa: E402


def layered(mats):
    """x -> h1 -> ... -> sink from dense (out, in) Jacobians; the last has one row."""
    nodes = [Node("x", "input", (mats[0].shape[1],), "torch.float64", role="source")]
    edges = []
    for layer, W in enumerate(mats):
        last = layer == len(mats) - 1
        shape = () if last else (W.shape[0],)
        nodes.append(Node("s" if last else f"h{layer + 1}", "aten.mv.default", shape, "torch.float64",
                          role="sink" if last else "op"))
        rows, cols = np.nonzero(W)
        edges.append(Edge(layer, layer + 1, SparseJacobian(shape, (W.shape[1],), rows, cols, W[rows, cols])))
    return GradGraph(nodes, edges, {"x": 0}, len(nodes) - 1, "function")


def measure(g, k, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        g.top_paths(k=k, progress=False)
        best = min(best, time.perf_counter() - t)
    tracemalloc.start()
    got = g.top_paths(k=k, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return len(got), best, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="inputs (default 10^6)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    n = a.n
    rng = np.random.default_rng(0)
    graphs = {
        "ties": layered([np.ones((1, n))]),
        "inner ties": layered([np.full((n, 1), 2.0), np.full((1, n), 0.5)]),
        "distinct": layered([rng.uniform(0.5, 1.5, size=(1, n))]),
    }
    layered([np.ones((1, 4))]).top_paths(k=2)            # compile the kernels outside the timings
    rows, runs = [], {}
    for name, k in [("ties", 1), ("ties", 10), ("inner ties", 1), ("distinct", 1), ("distinct", 1000),
                    ("distinct", 10000)]:
        found, seconds, peak = runs[name, k] = measure(graphs[name], k, a.repeats)
        rows.append([f"{name}, n = {n:,}, k = {k:,}", found, f"{seconds:.3f} s", fmt_bytes(peak)])
    print(f"# top paths at the limits, {datetime.date.today()}: {machine()}")
    print_table(rows, ("query", "paths", "time", "peak traced memory"))
    (_, t0, m0), (_, t1, m1) = runs["distinct", 1000], runs["distinct", 10000]
    print(f"each further path (distinct, k = 1,000 -> 10,000): {1e3 * (t1 - t0) / 9000:.3f} ms, "
          f"{(m1 - m0) / 9000:.0f} bytes of traced peak")

if __name__ == "__main__":
    main()
