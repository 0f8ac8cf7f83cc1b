"""Which parts of a query use more than one core: wall time against process CPU time per part.

For each query of ``benchmarks/scale.py`` on one captured graph, the script times every semiring
product (by semiring, Jacobian kind and the kind's case: a sparse Jacobian is an identity, a
diagonal -- an elementwise op -- or a scatter), the engine's per-node work (``add``: the (+) of a
node's contributions; ``normalize``: the per-tensor rescaling) and the rest of the query, each in
wall time and in the process's CPU time (all its threads). CPU / wall is the number of cores the
part kept busy on average: about 1 for serial code, up to the thread count for parallel code. Run
it at default threads and with ``--threads 1`` to see what a second core buys each part
(``--no-dynamic``: every query on all the threads even when the machine is busy)::

    python benchmarks/cores.py --model gpt2 --layers 2 --tokens 256
    python benchmarks/cores.py --model gpt2 --layers 2 --tokens 256 --threads 1

The thread count a query actually got (``gradgraph.threads.free_threads``, which follows the
machine's load) is printed with each query: on a busy machine it is 1 whatever the setting.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import THREADS, machine, print_table  # noqa: E402,F401  (THREADS: sets the pools first)

import torch  # noqa: E402

import gradgraph as gg  # noqa: E402
from gradgraph import threads  # noqa: E402
from gradgraph.algorithms import semirings  # noqa: E402
from gradgraph.algorithms.semirings import Semiring  # noqa: E402

from scale import MODELS, build, queries  # noqa: E402


def _case(jac):
    """The kind of a Jacobian and, for a sparse one, which of its code paths a product takes."""
    kind = type(jac).__name__
    if kind == "SparseJacobian":
        if jac.is_identity:
            return kind + " (identity)"
        return kind + (" (diagonal)" if jac.is_diagonal else " (scatter)")
    return kind


class Meter:
    """Wall and CPU seconds per label, with nested labels subtracted from their parent."""

    def __init__(self):
        self.cells = collections.defaultdict(lambda: [0, 0.0, 0.0])
        self.stack = []

    def timed(self, label, fn, *args):
        w0, c0 = time.perf_counter(), time.process_time()
        self.stack.append([0.0, 0.0])
        try:
            return fn(*args)
        finally:
            dw, dc = time.perf_counter() - w0, time.process_time() - c0
            inner_w, inner_c = self.stack.pop()
            cell = self.cells[label]
            cell[0] += 1
            cell[1] += dw - inner_w
            cell[2] += dc - inner_c
            if self.stack:
                self.stack[-1][0] += dw
                self.stack[-1][1] += dc


def run(g, name, fn, repeats):
    meter = Meter()
    product, add, normalize = semirings.product, Semiring.add, Semiring.normalize

    def timed_product(sr, jac, x, transpose):
        return meter.timed(f"product {sr.name} / {_case(jac)}", product, sr, jac, x, transpose)

    def timed_add(self, acc, y):
        return meter.timed("add (+) into a node", add, self, acc, y)

    def timed_normalize(self, value):
        return meter.timed("normalize", normalize, self, value)

    fn()                                           # warm-up: numba kernels, cached transposes
    semirings.product, Semiring.add, Semiring.normalize = timed_product, timed_add, timed_normalize
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        semirings.product, Semiring.add, Semiring.normalize = product, add, normalize
    rest = (repeats, wall - sum(c[1] for c in meter.cells.values()), cpu - sum(c[2] for c in meter.cells.values()))
    rows = sorted(meter.cells.items(), key=lambda kv: -kv[1][1]) + [("(rest of the query)", rest)]
    print(f"\n### {name}: wall {wall / repeats:.3f} s, CPU {cpu / repeats:.3f} s, "
          f"cores {cpu / max(wall, 1e-9):.2f}; threads {gg.get_num_threads()}, "
          f"a query now gets {threads.free_threads(gg.get_num_threads())}; "
          f"load {os.getloadavg()[0]:.1f}")
    print_table([(label, n // repeats, f"{w / repeats * 1e3:.1f}", f"{c / repeats * 1e3:.1f}",
                  f"{c / w:.2f}" if w > 0 else "", f"{100 * w / wall:.0f}%")
                 for label, (n, w, c) in rows if w / wall >= 0.005 or label.startswith("(")],
                headers=("part", "calls", "wall ms", "CPU ms", "cores", "of wall"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, help="override the model's depth")
    ap.add_argument("--repeats", type=int, default=2, help="runs per query (summed, reported per run)")
    ap.add_argument("--threads", type=int, help="threads of every pool; default: the environment's")
    ap.add_argument("--queries", nargs="*", help="a subset of the queries (default: all)")
    ap.add_argument("--no-dynamic", action="store_true",
                    help="every query uses all the threads whatever the machine's load (threads.set_dynamic(False))")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_dynamic:
        threads.set_dynamic(False)
    print(f"# Cores per part of a query -- {machine()}; threads {gg.get_num_threads()}")
    model, inputs, output = build(args.model, args.layers, args.tokens)
    gg.capture(model, (), inputs(args.tokens, seed=0), output=output)
    g = gg.capture(model, (), inputs(args.tokens, seed=1), output=output)
    print(f"{MODELS[args.model][0]}, {args.tokens} tokens, {len(g.nodes)} tensors, {len(g.edges)} Jacobians")
    for name, fn in queries(g).items():
        if not args.queries or name in args.queries:
            run(g, name, fn, args.repeats)


if __name__ == "__main__":
    main()
