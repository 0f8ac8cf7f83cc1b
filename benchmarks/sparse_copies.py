"""The sparse kind's index maps as strided copies (torch, on the query's threads) against the
numba scatter they replace: wall and process CPU time per product, at one and two threads.

Each case is the backward (transposed) product of an index map of GPT-2 small at 256 tokens: a
split of the attention's q/k/v (196,608 of 589,824 elements), a transpose of its heads, a slice
of the MLP's width (786,432 elements), and the select of one position from the vocabulary-sized
logits (12.9 M elements read through a permutation-free slice). The scatter is timed by
switching the copy off (``SparseJacobian._copy_forms`` returning None), in the same process::

    python benchmarks/sparse_copies.py
    python benchmarks/sparse_copies.py --threads 1

Both timings are of the product only: outputs are allocated, zero-filled or filled with
(-inf, +inf) the same way on both paths (``_empty_max``), and included.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import THREADS, machine, print_table  # noqa: E402,F401  (THREADS: sets the pools first)

import numpy as np  # noqa: E402

import gradgraph as gg  # noqa: E402
from gradgraph import threads  # noqa: E402
from gradgraph.algorithms.products import product  # noqa: E402
from gradgraph.algorithms.semirings import ENTROPY, MAGNITUDE, REAL  # noqa: E402
from gradgraph.jacobians import SparseJacobian  # noqa: E402


def cases(tokens=256, width=768, heads=12, vocab=50257):
    """(name, Jacobian) pairs: GPT-2's index maps, forward direction (the products are transposed)."""
    T, D, H = tokens, width, heads
    qkv = np.arange(T * 3 * D).reshape(T, 3, D)
    heads_t = np.arange(T * D).reshape(T, H, D // H).transpose(1, 0, 2)
    mlp = np.arange(T * 4 * D * 2).reshape(T, 2, 4 * D)
    logits = np.arange(T * vocab).reshape(T, vocab)
    return [
        ("split of q/k/v", SparseJacobian((T * D,), (3 * T * D,), cols=qkv[:, 1].ravel())),
        ("transpose of the heads", SparseJacobian((T * D,), (T * D,), cols=heads_t.ravel())),
        ("slice of 2 x MLP width", SparseJacobian((T * 4 * D,), (2 * T * 4 * D,), cols=mlp[:, 1].ravel())),
        ("vocabulary rows 1:", SparseJacobian(((T - 1) * vocab,), (T * vocab,), cols=logits[1:].ravel())),
    ]


def best(fn, budget=0.5):
    """The best wall and CPU seconds of ``fn`` over repeated runs (about ``budget`` seconds)."""
    fn()
    walls, cpus, spent = [], [], 0.0
    while spent < budget or len(walls) < 3:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        spent += walls[-1]
    return min(walls), min(cpus)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, help="threads of every pool; default: the environment's")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of repeated runs per measurement")
    args = ap.parse_args(argv)
    if args.threads:
        gg.set_num_threads(args.threads)
    threads.set_dynamic(False)                 # every product on all the threads asked for
    print(f"# sparse index maps: copy vs scatter -- {machine()}; threads {gg.get_num_threads()}; "
          f"load {os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(0)
    rows = []
    for name, jac in cases(args.tokens, args.width, args.heads, args.vocab):
        x64 = rng.random((2, jac.out_numel))
        for dtype in (np.float32, np.float64):
            x = x64.astype(dtype)
            queries = {
                "real": lambda: product(REAL, jac, x[:1], True),
                "magnitude": lambda: product(MAGNITUDE, jac, x[:1], True),
                "entropy": lambda: product(ENTROPY, jac, x, True),
                "max_signed": lambda: jac.max_product(x[0], x[1], True),
            }
            for semiring, fn in queries.items():
                times, results = {}, {}
                for path in ("copy", "scatter"):
                    jac._forms.clear()
                    if path == "scatter":
                        jac._forms[True] = None     # no strided forms: the numba scatter
                    times[path] = best(fn, args.budget)
                    out = fn()
                    results[path] = [np.array(a, copy=True) for a in (out if isinstance(out, tuple) else (out,))
                                     if a is not None]
                jac._forms.clear()
                same = all(a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
                           for a, b in zip(results["copy"], results["scatter"]))
                (cw, cc), (sw, sc) = times["copy"], times["scatter"]
                rows.append((name, f"{jac.n:,}", np.dtype(dtype).name, semiring, f"{sw * 1e3:.2f}",
                             f"{sc * 1e3:.2f}", f"{cw * 1e3:.2f}", f"{cc * 1e3:.2f}", f"{sw / cw:.2f}x",
                             "yes" if same else "NO"))
    print_table(rows, headers=("index map", "entries", "dtype", "product", "scatter wall ms", "CPU ms",
                               "copy wall ms", "CPU ms", "wall gain", "same values"))


if __name__ == "__main__":
    main()
