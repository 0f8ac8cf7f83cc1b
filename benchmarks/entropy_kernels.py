"""The entropy query's kernels on GPT-2-sized tensors, old way against new, in one process.

* the entropy product through attention softmax rows (12 heads x T rows of T, causal: half the
  probabilities exact zeros): the two generic sum products in float64 numpy (``|J| (Z, R)`` and
  ``-|J| log|J| Z``, a dozen temporaries of the whole tensor) against the fused numba kernel
  ``softmax_entropy`` (three sums and two logarithms per element, the rows in parallel);
* the support scan of a contraction's input when the operand is transposed (the keys of
  ``q k^T`` and the values of ``probs @ V`` wrt the right operand; (2, 12, T, T) values whose unit
  stride is along the rows): scanning in the canonical order against scanning in memory order;
* adding a second edge's contribution to a vocabulary-sized node (the logits near a logit
  difference sink, 2 channels x T x 50,257 float64): a new array against adding into the first
  contribution's own array.

* the weight transforms of one GPT-2 MLP weight (3,072 x 768, float32) as a query needs them:
  |W| and -|W| log|W| computed for the product by the vectorised kernels (what every query did
  outside ``WEIGHT_CACHE.active()``) against the kept pair checked against the weight (the bitwise |W|
  comparison each query now runs once per weight).

Every pair of results is checked equal before timing. CPU time of one run after a warm-up.

Run: ``python benchmarks/entropy_kernels.py [--tokens 64 256]`` (``--threads 1`` for one thread).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import gradgraph as gg
from gradgraph.jacobians import RowBlockJacobian
from gradgraph.jacobians.base import Jacobian
from gradgraph.jacobians.matmul import _support_scan, support_rows_cols


def cpu(fn):
    fn()
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def causal_softmax(T, rng):
    scores = torch.from_numpy(rng.normal(size=(12, T, T)))
    scores = scores + torch.triu(torch.full((T, T), -torch.inf, dtype=torch.float64), 1)
    p = torch.softmax(scores, -1).numpy().reshape(-1, T)
    jac = RowBlockJacobian((12, T, T), "softmax", 12 * T, T, 1, p, precision="float32")
    x = rng.random((2, jac.in_numel))
    old = lambda: Jacobian.entropy_product(jac, x, True)       # noqa: E731  (the generic pair)
    new = lambda: jac.entropy_product(x, True)                  # noqa: E731
    np.testing.assert_allclose(new(), old(), rtol=1e-9, atol=1e-12 * np.abs(old()).max())
    return cpu(old), cpu(new)


def transposed_scan(T, rng):
    a = np.swapaxes(rng.random((2, 12, T, T)), 2, 3)
    out_old = np.empty(a.shape, np.float32)
    out_new = np.empty_like(a, dtype=np.float32)
    old = lambda: support_rows_cols(a, out_old)                 # noqa: E731
    new = lambda: _support_scan(a, out_new)                     # noqa: E731
    (r0, c0), (r1, c1) = old(), new()
    assert np.array_equal(r0, r1) and np.array_equal(c0, c1) and np.array_equal(out_old, out_new)
    return cpu(old), cpu(new)


def vocab_add(T, rng):
    n = T * 50257
    first = np.zeros((2, n))
    second = np.zeros((2, n))
    first[:, -5], second[:, -7] = 1.0, 2.0
    old = lambda: first + second                                # noqa: E731

    def new():
        a = first.copy()          # stands for the first product's new array (its cost is not counted below)
        t0 = time.process_time()
        a += second
        return time.process_time() - t0, a
    assert np.array_equal(old(), new()[1])
    new()
    return cpu(old), new()[0]


def weight_transforms(T, rng):
    from gradgraph.jacobians import WEIGHT_CACHE
    from gradgraph.jacobians.matmul import MatmulJacobian, weight_transforms as fresh_pair
    w = torch.from_numpy(rng.normal(size=(768, 3072)).astype(np.float32))
    jac = MatmulJacobian((T, 768), (T, 3072), w.t().numpy(), "left")

    def old():
        """the fresh pair by the kernel a query outside a block uses (one pass over the weight)"""
        a, h = (x.reshape(w.shape) for x in fresh_pair(w.numpy().reshape(-1), True))
        return torch.from_numpy(a)[None], torch.from_numpy(h)[None]        # P of the backward product: W

    def new():
        with WEIGHT_CACHE.query():                                   # one query: one check
            return jac._magnitudes(True, True)
    a0, h0 = old()
    a1, h1 = new()
    assert torch.equal(a0, a1) and torch.equal(h0, h1)
    return cpu(old), cpu(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, help="threads of every pool (gg.set_num_threads)")
    args = ap.parse_args()
    if args.threads:
        gg.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads {gg.get_num_threads()}; CPU time of one run, old -> new")
    for T in args.tokens:
        for name, fn in (("softmax entropy product", causal_softmax), ("transposed support scan", transposed_scan),
                         ("second contribution to the logits", vocab_add),
                         ("|W|, -|W| log|W| of a 3072 x 768 weight", weight_transforms)):
            old, new = fn(T, rng)
            print(f"{T:5d} tokens  {name:36s} {old * 1e3:9.1f} ms -> {new * 1e3:8.1f} ms  ({old / max(new, 1e-9):.1f}x)")


if __name__ == "__main__":
    main()
