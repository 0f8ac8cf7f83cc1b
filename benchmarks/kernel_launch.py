"""What starting a numba parallel region costs here, against a serial call, in one process.

gradgraph's kernels run under numba's ``omp`` threading layer where torch runs on GNU OpenMP,
else under its ``workqueue`` layer, whose sleeping workers are woken for every parallel call
(``gradgraph.threads.LAYER``; ``NUMBA_THREADING_LAYER=workqueue`` forces it). This script
times, at one and at two numba threads, an empty ``prange`` loop compiled with ``parallel=True``
and the same loop compiled without, and the signed product of one small layer norm (32 rows of
512, float32, the shape of the benchmark BERT at 32 tokens) through its two compilations
(``threads.kernel``'s ``.parallel`` and ``.serial``). Figures: the median of 200 calls, in microseconds.

Run: ``python benchmarks/kernel_launch.py``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median_time, print_table  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import prange  # noqa: E402

import gradgraph  # noqa: E402  (numba's CPU target and threading layer first)
from gradgraph.jacobians.rowblock import RowBlockJacobian, rows_sum_product  # noqa: E402


def _fill(n, out):
    for i in prange(n):
        out[i] = i


fill_parallel = numba.njit(parallel=True)(_fill)
fill_serial = numba.njit(_fill)


def median_us(fn, repeats=200):
    return median_time(fn, repeats=repeats) * 1e6


def main():
    print(machine(), "| numba threading layer:", gradgraph.threads.LAYER)
    rng = np.random.default_rng(0)
    R, d = 32, 512
    ln = RowBlockJacobian((R, d), "layer_norm", R, d, 1, rng.standard_normal((R, d)).astype(np.float32),
                          rng.uniform(0.5, 2, R), rng.standard_normal(d), precision="float32")
    x = ln._row_view(rng.standard_normal((1, R * d)).astype(np.float32))
    y = np.empty_like(x)
    out = np.empty(64)
    args = (ln._code, True, False, ln._A, ln.rstd, ln.gamma, x, y)
    rows = []
    for nt in (1, 2):
        if nt > numba.config.NUMBA_NUM_THREADS:
            continue
        numba.set_num_threads(nt)
        rows.append((nt, "empty prange loop", f"{median_us(lambda: fill_parallel(64, out)):.1f}",
                     f"{median_us(lambda: fill_serial(64, out)):.1f}"))
        rows.append((nt, f"layer norm {R} x {d}, signed", f"{median_us(lambda: rows_sum_product.parallel(*args)):.1f}",
                     f"{median_us(lambda: rows_sum_product.serial(*args)):.1f}"))
    print_table(rows, headers=("numba threads", "call", "parallel=True, us", "serial, us"))


if __name__ == "__main__":
    main()
