"""Where the signed top path's value pass spends its time, per Jacobian kind and op, as the tokens grow.

For each number of ``--tokens``: capture a model of ``scale.py`` (``--model``, default GPT-2 small;
``--layers`` to shorten it),
run the backward (max, x) pass of ``top_paths`` once to warm up, then once timed, the product of
every edge timed by wrapping the product dispatch; prints the pass's time, the products by (kind,
consumer op), the rest (renormalisation, (+), the engine), the bytes and dtype of the values the
pass keeps for the enumeration, how many products met an input value below 1e-20 (which sends a
float32 product to float64), and the search's rounding bound. Then torch's backward, for scale.

Run::

    python benchmarks/max_pass.py --tokens 16 64 --threads 1
    python benchmarks/max_pass.py --tokens 64 256 --layers 2 --threads 1
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import THREADS, clock_for, machine, print_table, torch_backward  # noqa: E402

import numpy as np  # noqa: E402

import gradgraph as gg  # noqa: E402
from gradgraph.algorithms import paths, semirings  # noqa: E402
from gradgraph.algorithms.semirings import MAX_SIGNED  # noqa: E402


def max_pass(g):
    return paths._max_backward(g, MAX_SIGNED, paths.pass_dtype(g))


def profile(g, clock):
    """(total seconds, {(kind, op): [calls, seconds, input scalars]}, products meeting a value
    below 1e-20, kept bytes, dtypes) of one timed pass."""
    op_of = {id(e.jac): g.nodes[e.dst].op_name for e in g.edges}
    inner = semirings.product
    cells = collections.defaultdict(lambda: [0, 0.0, 0])
    inputs = []

    def timed(sr, jac, x, transpose):
        t0 = clock()
        y = inner(sr, jac, x, transpose)
        cell = cells[(type(jac).__name__, op_of.get(id(jac), "?"))]
        cell[0] += 1
        cell[1] += clock() - t0
        cell[2] += x.shape[1]
        inputs.append(x)                  # checked after the timed pass
        return y
    semirings.product = timed
    try:
        t0 = clock()
        B = max_pass(g)
        total = clock() - t0
    finally:
        semirings.product = inner
    tiny = 0
    for x in inputs:
        a = np.abs(x[np.isfinite(x) & (x != 0)])
        tiny += bool(a.size and a.min() < 1e-20)
    kept = [b.arr for b in B if b is not None]
    return total, cells, tiny, sum(a.nbytes for a in kept), sorted({str(a.dtype) for a in kept})


def torch_time(model, kwargs, output, clock, repeats=3):
    """Median of torch's backward alone (its forward untimed), after one warm-up."""
    times = []
    for _ in range(repeats + 1):
        backward = torch_backward(model, kwargs, output)()
        t0 = clock()
        backward()
        times.append(clock() - t0)
    return sorted(times[1:])[repeats // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", help="a model of scale.py (gpt2, bert-small-vocab, llama-1b, tiny)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--layers", type=int, help="override the model's depth")
    ap.add_argument("--threads", type=int, help="threads of every pool on both sides (process CPU time with 1)")
    args = ap.parse_args(argv)
    if args.threads:
        gg.set_num_threads(args.threads)
    import scale
    clock = clock_for(THREADS)
    print(f"# The signed max pass -- {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
    model, inputs, output = scale.build(args.model, args.layers, max(args.tokens))
    for tokens in args.tokens:
        kwargs = inputs(tokens, seed=0)
        g = gg.capture(model, (), kwargs, output=output)
        max_pass(g)                                                  # warm-up
        total, cells, tiny, kept, dtypes = profile(g, clock)
        products = sum(c[1] for c in cells.values())
        t_torch = torch_time(model, kwargs, output, clock)
        print(f"\n## {scale.MODELS[args.model][0]}, layers {args.layers or 'as built'}, {tokens} tokens: {g}")
        print(f"max pass {total:.3f} s (products {products:.3f} s, the rest {total - products:.3f} s); "
              f"torch backward {t_torch:.3f} s; kept values {kept / 2**20:.0f} MB {dtypes}; "
              f"products meeting a value < 1e-20: {tiny}; longest chain {paths._longest_chain(g)}, "
              f"rounding bound {paths._rounding_bound(g, paths.pass_dtype(g)):.2e}")
        rows = sorted(cells.items(), key=lambda kv: -kv[1][1])
        print_table([(kind, op, n, f"{t:.3f} s", f"{numel / 1e6:.1f} M") for (kind, op), (n, t, numel) in rows],
                    headers=("Jacobian kind", "consumer op", "calls", "time", "input scalars"))
        del g


if __name__ == "__main__":
    main()
