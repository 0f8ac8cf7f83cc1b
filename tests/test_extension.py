"""Extending the library from outside it: semirings and a Jacobian kind defined only in this file.

* the counting semiring (number of sink -> source paths, in log space: (R u {-inf}, logaddexp, +,
  -inf, 0), an edge is log 1 = 0) and the (min, x) semiring on |w| (the weakest path) run on every
  Jacobian kind through the generic product -- no kernel is registered for them -- and equal
  brute-force path enumeration (tests/oracle.py) on small random models (MLP, residual + layer
  norm, attention, convolution);
* the generic product of every built-in semiring equals its fast kernel on every kind;
* a Jacobian kind defined here (structure only: ``out_edges``) runs in every built-in semiring;
* a semiring with no generic definition and no kernel raises instead of computing anything.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradgraph.algorithms.dp import backward
from gradgraph.algorithms.products import (UnsupportedProductError, generic_product, lookup_product, product,
                                           register_product)
from gradgraph.algorithms.semirings import SEMIRINGS, Semiring
from gradgraph.jacobians import JACOBIAN_KINDS, Jacobian, SparseJacobian

from oracle import captured_case, tiny_attention, tiny_mlp, tiny_residual_ln


class Counting(Semiring):
    """Number of paths, as its natural log (no per-tensor scale: the values are logs already)."""

    scalable = False

    def one(self, n):
        return np.zeros((1, n))

    def zero(self, n):
        return np.full((1, n), -np.inf)

    def plus(self, a, b):
        return np.logaddexp(a, b)

    def weight(self, w):
        return np.zeros((1, len(w)))

    def times(self, wv, x):
        return wv + x


class Weakest(Semiring):
    """(R>=0 u {inf}, min, x, inf, 1) on |w|: the smallest |g(path)|."""

    def one(self, n):
        return np.ones((1, n))

    def zero(self, n):
        return np.full((1, n), np.inf)

    def plus(self, a, b):
        return np.minimum(a, b)

    def weight(self, w):
        return np.abs(np.asarray(w, dtype=np.float64))[None]

    def times(self, wv, x):
        return wv * x


COUNTING = Counting("count", 1)
WEAKEST = Weakest("weakest", 1)


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 2)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def tiny_conv(seed=0):
    """A 2x2 convolution over a 3x3 image, tanh, a linear head; sink y[0, 0] - y[0, 1]."""
    torch.manual_seed(seed)
    model = _Conv().double().eval()
    x = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    return model, (x,), {}, lambda y: y[0, 0] - y[0, 1]


MODELS = [(tiny_mlp, dict(seed=11, widths=(3, 3, 2), batch=2, act="tanh")),
          (tiny_mlp, dict(seed=12, widths=(2, 4, 3, 2), act="relu")),
          (tiny_residual_ln, dict(seed=13, d=3, rows=2)),
          (tiny_residual_ln, dict(seed=14, d=4)),
          (tiny_attention, dict(seed=15)),
          (tiny_attention, dict(seed=16, tokens=2, vocab=4)),
          (tiny_conv, dict(seed=17)),
          (tiny_conv, dict(seed=18))]
IDS = [f"{b.__name__}-{p['seed']}" for b, p in MODELS]


def _per_source_element(oracle, reduce):
    """{(source fx name, flat index): reduce(paths ending there)} over the enumerated paths."""
    per = {}
    for p in oracle.paths():
        per.setdefault(p.source, []).append(p)
    return {k: reduce(v) for k, v in per.items()}


def _check_against_paths(g, oracle, sr, expected, missing, rtol):
    B = backward(g, sr)
    for name, i in g.sources.items():
        fx = g.nodes[i].fx_name
        got = np.full(g.nodes[i].numel, missing) if B[i] is None else B[i].real()[0]
        want = np.array([expected.get((fx, j), missing) for j in range(g.nodes[i].numel)])
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0, err_msg=f"{sr.name} at source {name}")


@pytest.mark.parametrize("builder, params", MODELS, ids=IDS)
def test_counting_semiring_counts_the_paths(builder, params):
    g, oracle, _ = captured_case(builder, **params)
    assert all(lookup_product(type(e.jac), COUNTING) is None for e in g.edges)     # generic product only
    counts = _per_source_element(oracle, lambda ps: math.log(len(ps)))
    assert counts and max(counts.values()) > 0                # some element has several paths
    _check_against_paths(g, oracle, COUNTING, counts, -np.inf, 1e-12)


@pytest.mark.parametrize("builder, params", MODELS, ids=IDS)
def test_min_times_semiring_finds_the_weakest_path(builder, params):
    g, oracle, _ = captured_case(builder, **params)
    weakest = _per_source_element(oracle, lambda ps: min(math.exp(p.log_abs) for p in ps))
    _check_against_paths(g, oracle, WEAKEST, weakest, np.inf, 1e-10)


def test_the_models_cover_every_jacobian_kind():
    kinds = {type(e.jac) for b, p in MODELS for e in captured_case(b, **p)[0].edges}
    assert kinds == set(JACOBIAN_KINDS.values())


@pytest.mark.parametrize("name", sorted(SEMIRINGS))
@pytest.mark.parametrize("builder, params", MODELS[::2], ids=IDS[::2])
def test_generic_product_equals_the_kernels(name, builder, params):
    """The generic product (semiring definition x non-zero entries) against each kind's fast kernel,
    on every edge of the captured models, both directions, on random values of the semiring."""
    sr = SEMIRINGS[name]
    g, _, _ = captured_case(builder, **params)
    rng = np.random.default_rng(0)
    for e in g.edges:
        assert lookup_product(type(e.jac), sr) is not None
        for transpose in (False, True):
            n = e.jac.out_numel if transpose else e.jac.in_numel
            x = _random_values(sr, n, rng)
            fast = product(sr, e.jac, x, transpose)
            slow = generic_product(sr, e.jac, x, transpose)
            np.testing.assert_allclose(slow, fast, rtol=1e-10, atol=1e-12, err_msg=f"{e.jac!r} {transpose}")


def _random_values(sr, n, rng):
    """Values of semiring ``sr`` for n elements, about 30% of them 0-bar ("no path")."""
    C = sr.channels or 3
    x = rng.uniform(0.5, 2.0, (C, n))
    if sr.name == "real":
        x *= rng.choice([-1.0, 1.0], x.shape)
    if sr.name == "max_signed":
        x[1] = -x[1]                                      # a (max, min) pair: min <= max
    zero = sr.zero(n)
    dead = rng.random(n) < 0.3
    x[:, dead] = zero[:, dead] if zero.shape[0] == C else 0.0
    return x


class Doubling(Jacobian):
    """out = 2 * in elementwise, stated by its edges alone (no kernel of any semiring)."""

    kind = "doubling"

    def __init__(self, n):
        super().__init__((n,), (n,))

    def out_edges(self, j):
        return np.array([j], dtype=np.int64), np.array([2.0 if j % 2 else -2.0])


@pytest.mark.parametrize("name", sorted(SEMIRINGS))
def test_a_new_kind_runs_in_every_semiring(name):
    sr = SEMIRINGS[name]
    n = 6
    new = Doubling(n)
    same = SparseJacobian((n,), (n,), vals=np.where(np.arange(n) % 2, 2.0, -2.0))
    assert lookup_product(Doubling, sr) is None
    x = _random_values(sr, n, np.random.default_rng(1))
    for transpose in (False, True):
        np.testing.assert_allclose(product(sr, new, x, transpose), product(sr, same, x, transpose),
                                   rtol=1e-12, atol=0)


def test_a_semiring_without_a_generic_form_raises_rather_than_guessing():
    class Opaque(Semiring):
        def one(self, n):
            return np.ones((1, n))

    with pytest.raises(UnsupportedProductError, match="opaque"):
        product(Opaque("opaque", 1), SparseJacobian((3,), (3,), vals=np.arange(1.0, 4.0)), np.ones((1, 3)), True)


def test_a_registered_kernel_is_used_and_can_be_removed():
    jac = SparseJacobian((3,), (3,), vals=np.arange(1.0, 4.0))
    x = np.ones((1, 3))
    generic = product(WEAKEST, jac, x, True)
    with register_product(SparseJacobian, WEAKEST, lambda j, v, t: np.full_like(v, 7.0)):
        assert np.all(product(WEAKEST, jac, x, True) == 7.0)
    assert lookup_product(SparseJacobian, WEAKEST) is None
    np.testing.assert_array_equal(product(WEAKEST, jac, x, True), generic)


def test_add_writes_only_into_arrays_the_engine_owns():
    from gradgraph.algorithms.dp import Scaled
    from gradgraph.algorithms.semirings import ENTROPY, REAL
    jac = SparseJacobian((3,), (3,), vals=np.arange(1.0, 4.0))
    x = Scaled(np.ones((2, 3)))
    y = ENTROPY.carry(jac, x, True)                 # a product's result: a new array
    assert y.owned and not np.may_share_memory(y.arr, x.arr)
    theirs = Scaled(np.full((2, 3), 5.0))           # e.g. a value kept by a pass
    expected = theirs.arr + y.arr
    s = ENTROPY.add(theirs, y)
    assert s.owned and s.arr is y.arr               # accumulated into the engine's array
    np.testing.assert_array_equal(s.arr, expected)
    assert np.all(theirs.arr == 5.0)
    other = Scaled(np.ones((2, 3)))
    t = ENTROPY.add(theirs, other)                  # neither is the engine's: a new array
    assert not t.owned and np.all(theirs.arr == 5.0) and np.all(other.arr == 1.0)
    # at different scales the smaller side is rescaled into the owned array
    u = ENTROPY.add(Scaled(np.ones((2, 3)), 2.0), Scaled(np.ones((2, 3)), 0.0, owned=True))
    np.testing.assert_allclose(u.real(), np.full((2, 3), math.exp(2.0) + 1.0), rtol=1e-14)
    # a kernel may hand back its input: that array is not the engine's
    with register_product(SparseJacobian, REAL, lambda j, v, transpose: v):
        z = REAL.carry(jac, Scaled(np.ones((1, 3))), True)
    assert not z.owned


@pytest.mark.parametrize("builder, params", MODELS, ids=IDS)
@pytest.mark.parametrize("name", ["real", "entropy"])
def test_in_place_accumulation_leaves_every_kept_value_as_a_fresh_sum_would(builder, params, name, monkeypatch):
    # every node's value of a pass that keeps them all, against the same pass where each (+)
    # makes a new array (nothing written in place): a value kept, visited or shared through an
    # identity edge must not be changed by contributions added later to another node
    g, _, _ = captured_case(builder, **params)
    sr = SEMIRINGS[name]
    seen, in_place = {}, []
    plus_into = type(sr).plus_into

    def counted(self, a, b):
        in_place.append(a.shape)
        return plus_into(self, a, b)
    monkeypatch.setattr(type(sr), "plus_into", counted)
    B = backward(g, sr, visit=lambda v, b: seen.__setitem__(v, b.arr.copy()))
    if builder in (tiny_residual_ln, tiny_attention):
        assert in_place                  # their residual branches meet: some (+) ran in place
    monkeypatch.setattr(type(sr), "plus_into", lambda self, a, b: self.plus(a, b))
    fresh = backward(g, sr)
    for v, (b, f) in enumerate(zip(B, fresh)):
        assert (b is None) == (f is None)
        if b is not None:
            np.testing.assert_array_equal(b.arr, f.arr)
            np.testing.assert_array_equal(b.arr, seen[v])    # unchanged since it was complete
