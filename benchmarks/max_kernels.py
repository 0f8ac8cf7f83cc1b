"""The signed (max, x) product of GPT-2-small linear layers, loop orders compared in one process.

For each weight shape of a GPT-2-small block at T tokens (float32, every input entry live, so the
dot-product kernel ``mm_maxmin_dot`` applies), the kernel with its weight rows taken in
cache-sized blocks (``dot_block``, what the products use) against one block per thread (the loop
order before: every row of A passes over the whole weight, which for the 3,072 x 768 MLP weights
is streamed from memory once per row), and against the BLAS product of the same shapes (what
torch's backward pays; a sum, not a max, shown for scale). Results are checked equal before
timing; the figures are the best CPU time of three runs, in G multiply-max pairs per second.

Run: ``python benchmarks/max_kernels.py [--tokens 64 256 1024] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import THREADS, print_table  # noqa: E402  (sets the pools' thread variables)

import numpy as np  # noqa: E402

import gradgraph as gg  # noqa: E402
from gradgraph.jacobians.matmul import dot_block, mm_maxmin_dot  # noqa: E402
from gradgraph.threads import parallel  # noqa: E402

#: (contraction T, outputs J) of the signed backward products through GPT-2-small's weights
SHAPES = {"attn.c_attn": (2304, 768), "attn.c_proj": (768, 768), "mlp.c_fc": (3072, 768),
          "mlp.c_proj": (768, 3072)}


def best_cpu(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--threads", type=int, help="threads of every pool (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        gg.set_num_threads(args.threads)
    threads = gg.get_num_threads()
    rng = np.random.default_rng(0)
    rows = []
    for tokens in args.tokens:
        for name, (T, J) in SHAPES.items():
            a, b = rng.standard_normal((2, 1, tokens, T)).astype(np.float32)
            A, Amin = np.maximum(a, b), np.minimum(a, b)
            PT = (rng.standard_normal((1, J, T)) * 0.02).astype(np.float32)
            results = {}

            def run(jb, key):
                Y = (np.full((1, tokens, J), -np.inf, np.float32), np.full((1, tokens, J), np.inf, np.float32))
                with parallel():
                    mm_maxmin_dot(A, Amin, PT, *Y, jb)
                results[key] = Y
            blocked = best_cpu(lambda: run(dot_block(T, 4, threads, J), "blocked"))
            whole = best_cpu(lambda: run(-(-J // threads), "whole"))
            assert all(np.array_equal(x, y) for x, y in zip(results["blocked"], results["whole"]))
            blas = best_cpu(lambda: A[0] @ PT[0].T)
            pairs = tokens * T * J / 1e9
            rows.append((tokens, f"{name} ({T} -> {J})", f"{1e3 * whole:.1f} ms ({pairs / whole:.2f})",
                         f"{1e3 * blocked:.1f} ms ({pairs / blocked:.2f})", f"{whole / blocked:.2f}x",
                         f"{1e3 * blas:.1f} ms", f"{blocked / blas:.1f}x"))
    print(f"threads: {threads} ({'THREADS=' + THREADS if THREADS else 'default'}); CPU time, best of 3; "
          f"(G pairs / s)")
    print_table(rows, headers=("tokens", "weight", "whole weight per row", "blocked", "speed-up",
                               "BLAS (sum)", "blocked / BLAS"))


if __name__ == "__main__":
    main()
