"""The tokens^2 terms of GPT-2-sized attention, old way against new, in one process.

* (max, x) product through causal attention probabilities (12 heads x 64 x T x T, float32, half
  the weights exact zeros): the branching float64 kernel ``mm_maxmin`` against the branch-free
  ``mm_maxmin_masked`` (float32) that the contraction now uses for weights with many zeros;
* index maps of five views on attention-sized tensors (view, expand, transpose, slice of the
  fused q/k/v projection, select of the last position's logits): running the op on an int64
  tensor of flat indices (the generic data-movement rule) against reading the map from strides.

Both results are checked equal before timing. CPU time of one run after a warm-up.

Run: ``python benchmarks/attention_terms.py [--tokens 64 256 1024]`` (set ``OMP_NUM_THREADS=1`` for
one thread).
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
import torch

from gradgraph.capture import rules
from gradgraph.capture.registry import RuleContext
from gradgraph.jacobians.matmul import mm_maxmin, mm_maxmin_masked

aten = torch.ops.aten


def cpu(fn):
    fn()
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def attention_max(T, rng):
    A = rng.normal(size=(12, 64, T)).astype(np.float32)
    Amin = A - 1
    P = np.tril(rng.random((12, T, T))).astype(np.float32)      # causal attention probabilities
    times, results = [], []
    for kernel, dt in ((mm_maxmin, np.float64), (mm_maxmin_masked, np.float32)):
        a, b = A.astype(dt), Amin.astype(dt)
        Y, Z = np.full((12, 64, T), -np.inf, dt), np.full((12, 64, T), np.inf, dt)

        def run():
            Y[...] = -np.inf
            Z[...] = np.inf
            kernel(a, b, P, Y, Z) if kernel is mm_maxmin else kernel(a, b, P, Y, Z, 1)
        times.append(cpu(run))
        results.append((Y.astype(np.float32), Z.astype(np.float32)))
    assert all(np.array_equal(u, v) for u, v in zip(*results))
    return times


def view_maps(T):
    cases = [(aten.view.default, (torch.randn(1, 12, T, T), [12, T, T])),
             (aten.expand.default, (torch.randn(1, 12, T, 1), [1, 12, T, T])),
             (aten.transpose.int, (torch.randn(1, 12, T, 64), -1, -2)),
             (aten.slice.Tensor, (torch.randn(1, T, 2304), 2, 0, 768)),
             (aten.select.int, (torch.randn(1, T, 50257), 1, -1))]
    ctxs = [RuleContext(op, args, {}, op(*args), None, {0}) for op, args in cases]
    times, maps = [], []
    for patch in (lambda *a: False, rules._strided_index_map):
        with mock.patch.object(rules, "_strided_index_map", patch):
            times.append(cpu(lambda: [rules.data_movement(c) for c in ctxs]))
            maps.append([rules.data_movement(c)[0].to_dense() if c.out.numel() <= 4096 else
                         rules.data_movement(c)[0] for c in ctxs])
    for a, b in zip(*maps):       # the same map: compare the column of every output element
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b)
        else:
            assert np.array_equal(a._c()[np.argsort(a._r())], b._c()[np.argsort(b._r())])
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print("tokens  causal max product: branching f64 / masked f32   view index maps: op on indices / strides")
    for T in args.tokens:
        (a0, a1), (v0, v1) = attention_max(T, rng), view_maps(T)
        print(f"{T:6d}  {a0 * 1e3:10.1f} ms / {a1 * 1e3:8.1f} ms              {v0 * 1e3:10.1f} ms / {v1 * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
