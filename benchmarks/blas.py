"""numpy's BLAS against torch's on the contractions of a query, at one thread, in one process.

A one-thread query's contractions (the gradient's, entropy's and flow's products through the
weights) go to one of the two BLAS libraries a process holds: numpy's (OpenBLAS) or torch's
(MKL on x86 builds). Which is faster depends on the CPU (``NUMPY_GEMM_AT_ONE_THREAD`` in
``gradgraph/jacobians/matmul.py`` makes the choice by vendor); this script measures both on the
shapes of the benchmark BERT (32 tokens, 512 / 2,048 wide) and GPT-2 small (64 and 256 tokens,
768 / 3,072 wide), float32, the weight transposed as a linear layer's is. Figures: the median of
21 runs, in microseconds.

Run: ``python benchmarks/blas.py``.
"""
from __future__ import annotations

import os
import sys

sys.argv += [] if "--threads" in sys.argv else ["--threads", "1"]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median_time, print_table  # noqa: E402  (sets the pools' thread variables)

import torch  # noqa: E402

from gradgraph.jacobians.matmul import NUMPY_GEMM_AT_ONE_THREAD  # noqa: E402

SHAPES = [(3, 768, 768), (32, 512, 512), (32, 512, 2048), (32, 2048, 512), (64, 768, 2304),
          (64, 768, 3072), (64, 3072, 768), (256, 768, 3072), (256, 3072, 768)]


def median_us(fn, repeats=21):
    return median_time(fn, repeats=repeats) * 1e6


def main():
    torch.set_num_threads(1)
    print(machine())
    print(f"gradgraph's choice at one thread: {'numpy' if NUMPY_GEMM_AT_ONE_THREAD else 'torch'}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        a = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen).t()            # a linear layer's weight, transposed
        an, wn = a.numpy(), w.numpy()
        t_np = median_us(lambda: an @ wn)
        t_torch = median_us(lambda: torch.mm(a, w))
        rows.append((f"{m} x {k} x {n}", f"{t_np:.0f}", f"{t_torch:.0f}", f"{t_np / t_torch:.2f}"))
    print_table(rows, headers=("rows x contraction x columns", "numpy us", "torch us", "numpy / torch"))


if __name__ == "__main__":
    main()
