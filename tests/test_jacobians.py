"""Every Jacobian kind's semiring products and edge lists against numpy on the dense matrix.

Each instance comes with an independent dense matrix D (out_numel, in_numel): ``torch.func.jacrev``
of the op it stands for, or the matrix it was built from. Then, with f(D) = D, |D| or -|D| log|D|
(0 where D is 0):

* ``sum_product(x, t, transpose=False) == x @ f(D).T`` and ``sum_product(x, t, True) == x @ f(D)``
  for a batch of C = 3 rows;
* unsigned ``max_product``: ``max_j |D[i, j]| x[j]`` (0 when there is no edge);
* signed ``max_product``: max and min over the edges of ``D[i, j] * xmax[j]`` and ``D[i, j] * xmin[j]``,
  skipping inputs with no path (xmax = -inf); -inf / +inf when there is none;
* ``out_edges(j)``: exactly the non-zero entries of column j.
"""
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradgraph.capture.registry import RuleContext, get_rule
from gradgraph.jacobians import ConvJacobian, MatmulJacobian, RowBlockJacobian, SparseJacobian, WeightMap

aten = torch.ops.aten
RNG = np.random.default_rng(0)


def t(*shape, zeros=0.0):
    a = RNG.standard_normal(shape)
    a[RNG.random(shape) < zeros] = 0.0
    return torch.from_numpy(a)


def jac_of(f, x, out_numel):
    return torch.func.jacrev(f)(x).reshape(out_numel, x.numel()).numpy()


# ------------------------------------------------------------------------- instances
def sparse_random():
    D = t(5, 7, zeros=0.5).numpy()
    r, c = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
    # every position listed, zeros included: zero entries must not become edges
    return SparseJacobian((5,), (7,), r.reshape(-1), c.reshape(-1), D.reshape(-1)), D


def from_rule(op, args, key=0, **kwargs):
    def make():
        out = op(*args, **kwargs)
        ctx = RuleContext(op, args, kwargs, out, None, {key})
        jac = get_rule(op)(ctx)[key]

        def f(x):
            a = list(args)
            a[key] = x
            return op(*a, **kwargs)
        return jac, jac_of(f, args[key], out.numel())
    return make


def matmul(shape_l, shape_r, wrt):
    def make():
        L, R = t(*shape_l, zeros=0.3), t(*shape_r, zeros=0.3)
        if wrt == "left":
            return MatmulJacobian(tuple((L @ R).shape), L.shape, R.numpy(), "left"), \
                jac_of(lambda x: x @ R, L, (L @ R).numel())
        return MatmulJacobian(tuple((L @ R).shape), R.shape, L.numpy(), "right"), \
            jac_of(lambda x: L @ x, R, (L @ R).numel())
    return make


def conv(x_shape, w_shape, stride, padding, dilation, groups):
    def make():
        x, w = t(*x_shape), t(*w_shape, zeros=0.3)
        fn = F.conv2d if len(x_shape) == 4 else F.conv1d
        out = fn(x, w, None, stride, padding, dilation, groups)
        jac = ConvJacobian(out.shape, x.shape, w.numpy(), stride, padding, dilation, groups)
        return jac, jac_of(lambda v: fn(v, w, None, stride, padding, dilation, groups), x, out.numel())
    return make


CAUSAL_MASK = torch.triu(torch.full((6, 6), -torch.inf, dtype=torch.float64), 1)


def rowblock(function, shape, dim, data=None):
    def make():
        x = t(*shape) if data is None else data.clone()
        x.view(-1)[1] = -1000.0      # a probability that is exactly 0: zero entries in its row
        d = shape[dim]
        outer, inner = int(np.prod(shape[:dim])), int(np.prod(shape[dim + 1:]))

        def rows(v):
            return v.reshape(outer, d, inner).transpose(1, 2).reshape(-1, d).numpy()
        if function == "softmax":
            p = torch.softmax(x, dim)
            jac = RowBlockJacobian(x.shape, "softmax", outer, d, inner, rows(p))
            return jac, jac_of(lambda v: torch.softmax(v, dim), x, x.numel())
        p = torch.softmax(x, dim)
        jac = RowBlockJacobian(x.shape, "log_softmax", outer, d, inner, rows(p))
        return jac, jac_of(lambda v: torch.log_softmax(v, dim), x, x.numel())
    return make


def layer_norm(rows=4, d=5, precision="float64", data=None):
    def make():
        x = t(rows, d) if data is None else data.clone()
        gamma = t(d)
        gamma[2] = 0.0               # a zero gain: a row of zero entries
        eps = 1e-5
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
        jac = RowBlockJacobian(x.shape, "layer_norm", rows, d, 1, ((x - mean) * rstd).numpy(),
                               rstd.reshape(-1).numpy(), gamma.numpy(), precision=precision)
        return jac, jac_of(lambda v: F.layer_norm(v, (d,), gamma, None, eps), x, x.numel())
    return make


def matmul_float32(wrt):
    """A float32 weight: products run in float32 (the dense matrix is of the same rounded weights)."""
    def make():
        L, R = t(3, 43, zeros=0.3), t(43, 37, zeros=0.3)
        if wrt == "left":
            R32 = R.float()
            return MatmulJacobian((3, 37), L.shape, R32.numpy(), "left"), \
                jac_of(lambda x: x @ R32.double(), L, 3 * 37)
        L32 = L.float()
        return MatmulJacobian((3, 37), R.shape, L32.numpy(), "right"), \
            jac_of(lambda x: L32.double() @ x, R, 3 * 37)
    return make


INSTANCES = {
    "sparse-random": sparse_random,
    "sparse-broadcast-mul": from_rule(aten.mul.Tensor, (t(3), t(2, 3, zeros=0.3)), key=0),
    "sparse-sum-keepdim": from_rule(aten.sum.dim_IntList, (t(2, 3, 4), [1], True)),
    # elementwise: one edge j -> j per element (the diagonal kernels), and an all-ones identity
    "sparse-elementwise-mul": from_rule(aten.mul.Tensor, (t(2, 3), t(2, 3)), key=0),
    "sparse-add-identity": from_rule(aten.add.Tensor, (t(2, 3), t(2, 3)), key=1),
    "sparse-index-repeat": from_rule(aten.index.Tensor, (t(4, 3), [torch.tensor([2, 0, 2])])),
    "sparse-amax-ties": from_rule(aten.amax.default,
                                  (torch.tensor([[1.0, 3.0, 3.0], [0.5, -1.0, 0.0]], dtype=torch.float64), [1])),
    # the rules for in-place writes, cumsum, prod and the transposed / 3-d convolutions
    "sparse-index-put-accumulate": from_rule(aten.index_put.default, (t(2, 4, 3), [None, torch.tensor([3, 1, 3])],
                                                                      t(3, zeros=0.3), True), key=2),
    "sparse-scatter-add": from_rule(aten.scatter_add.default, (t(3, 4), 1, torch.tensor([[0, 0, 3], [1, 1, 1], [2, 0, 2]]),
                                                               t(3, 3, zeros=0.3)), key=3),
    "sparse-slice-scatter": from_rule(aten.slice_scatter.default, (t(4, 5), t(4, 2), 1, 1, 5, 2), key=0),
    "sparse-cumsum": from_rule(aten.cumsum.default, (t(2, 4, 3), 1)),
    "sparse-prod-zeros": from_rule(aten.prod.dim_int, (torch.tensor([[1.5, 0.0, 2.0], [0.0, 3.0, 0.0], [1.0, -2.0, 0.5]],
                                                                    dtype=torch.float64), 1)),
    "sparse-conv-transpose2d": from_rule(aten.convolution.default, (t(2, 4, 3, 4), t(4, 1, 3, 2, zeros=0.3), None,
                                                                    [2, 1], [1, 0], [1, 2], True, [1, 0], 2)),
    "sparse-conv3d": from_rule(aten.convolution.default, (t(1, 2, 4, 3, 3), t(2, 2, 2, 3, 2, zeros=0.3), None,
                                                          [2, 1, 1], [1, 1, 0], [1, 1, 1], False, [0, 0, 0], 1)),
    "matmul-left-2d": matmul((3, 4), (4, 5), "left"),
    "matmul-right-2d": matmul((3, 4), (4, 5), "right"),
    "matmul-left-3d": matmul((2, 3, 4), (2, 4, 2), "left"),
    "matmul-right-3d": matmul((2, 3, 4), (2, 4, 2), "right"),
    "conv2d-strided-grouped-dilated": conv((2, 4, 6, 7), (6, 2, 3, 2), (2, 1), (1, 2), (1, 2), 2),
    "conv2d-plain": conv((1, 2, 5, 5), (3, 2, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    "conv1d": conv((2, 3, 9), (4, 3, 3), (2,), (1,), (2,), 1),
    "softmax-last": rowblock("softmax", (3, 5), 1),
    "softmax-middle": rowblock("softmax", (2, 4, 3), 1),
    "log-softmax-first": rowblock("log_softmax", (4, 3), 0),
    # regression: a vocabulary-sized row (the O(d) max path of softmax / log-softmax)
    "log-softmax-wide-row": rowblock("log_softmax", (2, 700), 1),
    "softmax-wide-row": rowblock("softmax", (2, 700), 1),
    # a causal attention pattern: exact zeros above the diagonal; the first row a single 1, whose
    # diagonal entry p (1 - p) is 0
    "softmax-causal": rowblock("softmax", (2, 6, 6), 2, data=t(2, 6, 6) + CAUSAL_MASK),
    "layer-norm": layer_norm(),
    # rows long enough for the vectorised loops and their remainders
    "layer-norm-wide": layer_norm(3, 37),
    # tied and exactly-zero normalised values (the sign split of 1 + xh_i xh_j at its edges)
    "layer-norm-ties": layer_norm(2, 9, data=torch.tensor([[1.0, 1, 3, 3, 2, 2, 1, 3, 2],
                                                       [0.0, 5, 5, 5, -5, -5, -5, 0, 0]], dtype=torch.float64)),
}

#: instances computing in float32 (the model's precision), checked at float32 tolerances
FLOAT32_INSTANCES = {
    "layer-norm-float32": layer_norm(3, 37, "float32"),
    "matmul-left-float32": matmul_float32("left"),
    "matmul-right-float32": matmul_float32("right"),
}


@pytest.fixture(params=list(INSTANCES), scope="module")
def instance(request):
    jac, D = INSTANCES[request.param]()
    assert D.shape == (jac.out_numel, jac.in_numel)
    return jac, D


def f_of(D, t):
    if t == 0:
        return D
    a = np.abs(D)
    if t == 1:
        return a
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, -a * np.log(np.where(a > 0, a, 1.0)), 0.0)


def test_instance_is_not_trivial(instance):
    jac, D = instance
    assert np.abs(D).max() > 0


@pytest.mark.parametrize("name, diagonal, identity", [("sparse-elementwise-mul", True, False),
                                                      ("sparse-add-identity", True, True),
                                                      ("sparse-broadcast-mul", False, False)])
def test_sparse_diagonal_and_identity_flags(name, diagonal, identity):
    jac, D = INSTANCES[name]()
    assert jac.is_diagonal == diagonal and jac.is_identity == identity
    assert np.array_equal(D, np.eye(D.shape[0])) == identity


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("t", list(WeightMap))
def test_sum_product(instance, t, transpose):
    jac, D = instance
    FD = f_of(D, t)
    n_src = D.shape[0] if transpose else D.shape[1]
    x = RNG.standard_normal((3, n_src))
    expected = x @ FD if transpose else x @ FD.T
    np.testing.assert_allclose(jac.sum_product(x, t, transpose), expected, rtol=1e-10, atol=1e-12)


def entropy_expected(D, x, transpose):
    """<Z, R> -> <|D| Z, |D| R + H Z>, H = -|D| log|D|, on the dense matrix."""
    A, H = f_of(D, 1), f_of(D, 2)
    if not transpose:
        A, H = A.T, H.T
    return np.stack([x[0] @ A, x[1] @ A + x[0] @ H])


@pytest.mark.parametrize("transpose", [False, True])
def test_entropy_product(instance, transpose):
    jac, D = instance
    x = RNG.random((2, D.shape[0] if transpose else D.shape[1]))
    x[:, ::3] = 0.0              # elements with no path
    x[:, :x.shape[1] // 3] = 0.0  # and a block of them (the first row of "layer-norm-wide")
    np.testing.assert_allclose(jac.entropy_product(x, transpose), entropy_expected(D, x, transpose),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transpose", [False, True])
def test_softmax_entropy_product_subnormal_probabilities(transpose):
    # probabilities near e^-720 and e^-745 (below float64's smallest normal, where the fused
    # kernel's vectorised logarithm does not apply) next to the causal zeros
    shift = torch.tensor([0.0, -720.0, 0.0, 0.0, -745.0, 0.0], dtype=torch.float64)
    jac, D = rowblock("softmax", (2, 6, 6), 2, data=t(2, 6, 6) + CAUSAL_MASK + shift)()
    assert ((D > 0) & (D < np.finfo(np.float64).tiny)).any()
    tiny = np.flatnonzero(((D > 0) & (D < np.finfo(np.float64).tiny)).any(axis=0))
    focused = np.zeros((2, D.shape[0]))
    focused[:, tiny] = 1e300      # only paths through the tiny probabilities: their terms dominate
    x = RNG.random((2, D.shape[0]))
    np.testing.assert_allclose(jac.entropy_product(x, transpose), entropy_expected(D, x, transpose),
                               rtol=1e-10, atol=1e-300)
    # the dense oracle's entries p_i p_j are subnormal themselves (down to ~20 significant bits),
    # so the comparison on these paths alone is at 1e-5; a wrong logarithm of a tiny p is off by %
    np.testing.assert_allclose(jac.entropy_product(focused, transpose), entropy_expected(D, focused, transpose),
                               rtol=1e-5, atol=1e-300)


@pytest.mark.parametrize("name", list(FLOAT32_INSTANCES))
@pytest.mark.parametrize("transpose", [False, True])
def test_entropy_product_float32(name, transpose):
    jac, D = FLOAT32_INSTANCES[name]()
    x = RNG.random((2, D.shape[0] if transpose else D.shape[1]))
    expected = entropy_expected(D, x, transpose)
    got = jac.entropy_product(x, transpose)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("transpose", [False, True])
def test_max_product_unsigned(instance, transpose):
    jac, D = instance
    A = np.abs(D.T if transpose else D)          # (dst, src)
    x = np.abs(RNG.standard_normal(A.shape[1]))
    x[0] = 0.0                                   # a source element with no path
    expected = (A * x[None, :]).max(1, initial=0.0)
    ymax, ymin = jac.max_product(x, None, transpose)
    assert ymin is None
    np.testing.assert_allclose(ymax, expected, rtol=1e-12, atol=0)


def signed_max_expected(W, xmax, xmin):
    """Max and min over the edges (W != 0) of W[i, j] * xmax[j] and W[i, j] * xmin[j], skipping
    sources with no path (xmax = -inf); -inf / +inf where no edge remains. W is (dst, src)."""
    finite = np.isfinite(xmax)
    valid = (W != 0) & finite[None, :]
    c1 = W * np.where(finite, xmax, 0.0)[None, :]
    c2 = W * np.where(finite, xmin, 0.0)[None, :]
    return (np.where(valid, np.maximum(c1, c2), -np.inf).max(1),
            np.where(valid, np.minimum(c1, c2), np.inf).min(1))


@pytest.mark.parametrize("transpose", [False, True])
def test_max_product_signed(instance, transpose):
    jac, D = instance
    W = D.T if transpose else D                  # (dst, src)
    a, b = RNG.standard_normal((2, W.shape[1]))
    xmax, xmin = np.maximum(a, b), np.minimum(a, b)
    xmax[0], xmin[0] = -np.inf, np.inf           # no path reaches this element
    exp_max, exp_min = signed_max_expected(W, xmax, xmin)
    ymax, ymin = jac.max_product(xmax.copy(), xmin.copy(), transpose)
    np.testing.assert_allclose(ymax, exp_max, rtol=1e-12, atol=0)
    np.testing.assert_allclose(ymin, exp_min, rtol=1e-12, atol=0)


def test_out_edges_are_the_nonzero_entries(instance):
    jac, D = instance
    n_edges = 0
    for j in range(D.shape[1]):
        idx, w = jac.out_edges(j)
        order = np.argsort(idx)
        idx, w = np.asarray(idx)[order], np.asarray(w)[order]
        # entries jacrev gives as ~1e-17 rounding noise are zero in exact arithmetic
        expected_idx = np.nonzero(np.abs(D[:, j]) > 1e-14)[0]
        assert np.all(w != 0), "a zero entry was reported as an edge"
        np.testing.assert_array_equal(idx[np.abs(w) > 1e-14], expected_idx)
        np.testing.assert_allclose(w, D[idx, j], rtol=1e-10, atol=1e-13)
        assert len(np.unique(idx)) == len(idx)
        n_edges += len(idx)
    assert n_edges > 0
    np.testing.assert_allclose(jac.to_dense(), D, rtol=1e-10, atol=1e-13)


def test_zero_entries_are_not_edges():
    jac, D = sparse_random()
    assert jac.nnz() == np.count_nonzero(D) < D.size


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dead", ["none", "rows-and-columns", "scattered"])
@pytest.mark.parametrize("wrt", ["left", "right"])
@pytest.mark.parametrize("transpose", [False, True])
def test_max_product_signed_long_contraction(dtype, dead, wrt, transpose):
    """Contractions long enough for the branch-free kernels (float32 weights in float32), with the
    inputs' dead (no path) rows and columns dropped before the product, and one zero weight (not
    an edge) redone exactly."""
    L = RNG.standard_normal((2, 16, 130)).astype(dtype)
    R = RNG.standard_normal((2, 130, 16)).astype(dtype)
    (L if wrt == "right" else R)[1, 2, 3] = 0.0
    if wrt == "left":
        jac = MatmulJacobian((2, 16, 16), L.shape, R, "left")
        D = jac_of(lambda x: x @ torch.from_numpy(R).double(), torch.from_numpy(L).double(), 512)
    else:
        jac = MatmulJacobian((2, 16, 16), R.shape, L, "right")
        D = jac_of(lambda x: torch.from_numpy(L).double() @ x, torch.from_numpy(R).double(), 512)
    W = D.T if transpose else D                  # (dst, src)
    src_shape = jac.out_shape if transpose else jac.in_shape
    a, b = RNG.standard_normal((2,) + src_shape)
    xmax, xmin = np.maximum(a, b), np.minimum(a, b)
    if dead == "rows-and-columns":
        xmax[:, 1], xmax[..., 2] = -np.inf, -np.inf
    elif dead == "scattered":
        xmax[0, 0, 0] = xmax[1, 3, 1] = -np.inf
    xmin[xmax == -np.inf] = np.inf
    xmax, xmin = xmax.reshape(-1), xmin.reshape(-1)
    exp_max, exp_min = signed_max_expected(W, xmax, xmin)
    ymax, ymin = jac.max_product(xmax.copy(), xmin.copy(), transpose)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(ymax, exp_max, rtol=rtol, atol=0)
    np.testing.assert_allclose(ymin, exp_min, rtol=rtol, atol=0)
    assert np.isfinite(xmax).all() == (dead == "none")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("wrt", ["left", "right"])
@pytest.mark.parametrize("transpose", [False, True])
def test_max_product_signed_causal_weights(dtype, wrt, transpose):
    """A product with causal attention probabilities (exact zeros above the diagonal, far more
    than the branch-free kernels redo column by column): zero weights are no edges, in the
    weights' dtype, with one dead input element."""
    T = 24
    probs = np.tril(RNG.random((2, T, T)) + 0.1).astype(dtype)
    V = RNG.standard_normal((2, T, 5)).astype(dtype)
    if wrt == "left":     # d(probs @ V) / d probs: the weights are V (few zeros); wrt V: probs
        jac = MatmulJacobian((2, T, 5), probs.shape, V, "left")
        D = jac_of(lambda x: x @ torch.from_numpy(V).double(), torch.from_numpy(probs).double(), 2 * T * 5)
    else:
        jac = MatmulJacobian((2, T, 5), V.shape, probs, "right")
        D = jac_of(lambda x: torch.from_numpy(probs).double() @ x, torch.from_numpy(V).double(), 2 * T * 5)
    W = D.T if transpose else D                  # (dst, src)
    a, b = RNG.standard_normal((2, W.shape[1]))
    xmax, xmin = np.maximum(a, b), np.minimum(a, b)
    xmax[3], xmin[3] = -np.inf, np.inf
    exp_max, exp_min = signed_max_expected(W, xmax, xmin)
    from gradgraph.jacobians import matmul as matmul_module
    with mock.patch.object(matmul_module, "mm_maxmin_masked", wraps=matmul_module.mm_maxmin_masked) as masked:
        ymax, ymin = jac.max_product(xmax.copy(), xmin.copy(), transpose)
    assert masked.called == (wrt == "right")      # the probabilities are the weights: many zeros
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(ymax, exp_max, rtol=rtol, atol=0)
    np.testing.assert_allclose(ymin, exp_min, rtol=rtol, atol=0)


def _layer_norm_values(case, jac, x):
    """Backward values (xmax, xmin) of a layer norm's output for the envelope cases."""
    rows, d = x.shape
    a, b = RNG.standard_normal((2, rows * d))
    xmax, xmin = np.maximum(a, b), np.minimum(a, b)
    if case == "ties":
        xmin = xmax.copy()                          # max == min: the two sets of lines coincide
    elif case == "own-on-top":
        xmax[::7] *= 50.0                           # a few lines far above the rest (every case
        xmin[::7] *= 50.0                           # has 2-3 outputs per row whose own line is on top)
    elif case == "many-pieces":
        # the lines a_i x_i (1 + xh_i z) tangent to y = z^2 at t_i = -2 / xh_i: every one is on
        # the upper envelope over the row's range of z, far more pieces than it walks
        xh = np.asarray(jac.A, dtype=np.float64).reshape(rows, d)
        gam = np.asarray(jac.gamma, dtype=np.float64)
        s = np.asarray(jac.rstd, dtype=np.float64).reshape(rows, 1)
        coef = -gam[None, :] * s / d
        tpt = -2.0 / np.where(np.abs(xh) > 0.2, xh, 0.2)
        with np.errstate(divide="ignore"):
            v = np.where(coef != 0, -tpt ** 2 / np.where(coef != 0, coef, 1.0), 1.0).reshape(-1)
        xmax, xmin = v, v.copy()
    xmax[5], xmin[5] = -np.inf, np.inf                  # a source with no path
    return xmax, xmin


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("case", ["random", "ties", "own-on-top", "many-pieces"])
def test_layer_norm_signed_max_envelope(case, precision):
    """The backward signed max through wide layer-norm rows, by the upper and lower envelopes of
    the rows' lines, against max / min over the dense Jacobian's edges (torch.func.jacrev):
    random values, max == min, outputs whose own line is on top (the reduction over the other
    lines), and lines tangent to a parabola (an envelope of more pieces than the kernel walks:
    the quadratic reduction)."""
    rows, d = 3, 300
    data = t(rows, d)
    data[1, :40] = data[1, 40:80]                      # tied normalised values
    jac, D = layer_norm(rows, d, precision, data=data)()
    xmax, xmin = _layer_norm_values(case, jac, data.numpy())
    exp_max, exp_min = signed_max_expected(D.T, xmax, xmin)
    ymax, ymin = jac.max_product(xmax.copy(), xmin.copy(), True)
    # the kernel's lines P + Q z round differently from w_ij x_i: a few ulps of the dtype
    # (float32 in the float32 case, the model's precision)
    rtol = 1e-12 if precision == "float64" else 1e-5
    scale = np.abs(D).max() * np.abs(xmax[np.isfinite(xmax)]).max()
    np.testing.assert_allclose(ymax, exp_max, rtol=rtol, atol=rtol * scale * 1e-3)
    np.testing.assert_allclose(ymin, exp_min, rtol=rtol, atol=rtol * scale * 1e-3)


@pytest.mark.parametrize("tiny", [False, True])
def test_layer_norm_signed_max_in_float32(tiny):
    """A float32 model's layer norm: the signed backward max product runs in float32 (to float32
    rounding), or in float64 (to float64 rounding) when some value is below 1e-20."""
    jac, D = layer_norm(rows=3, d=40, precision="float32")()
    W = D.T                                      # (dst, src), backward
    a, b = RNG.standard_normal((2, W.shape[1]))
    xmax, xmin = np.maximum(a, b), np.minimum(a, b)
    xmax[7], xmin[7] = -np.inf, np.inf
    if tiny:
        xmin[3] = 1e-30
        xmax[3] = max(xmax[3], 1e-30)
    exp_max, exp_min = signed_max_expected(W, xmax, xmin)
    ymax, ymin = jac.max_product(xmax.copy(), xmin.copy(), True)
    rtol = 1e-12 if tiny else 1e-5
    np.testing.assert_allclose(ymax, exp_max, rtol=rtol, atol=1e-12 if tiny else 1e-6)
    np.testing.assert_allclose(ymin, exp_min, rtol=rtol, atol=1e-12 if tiny else 1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("J, jb", [(1, 1), (5, 2), (37, 8), (37, 64)])
def test_mm_maxmin_dot_blocks_against_numpy(dtype, J, jb):
    """The dot-product kernel, its weight rows taken in blocks of ``jb`` (a last short block
    included), against max / min over all products in numpy, bit for bit (a max is exact): ties,
    zero weights (edges of weight 0 in this kernel), negative weights and inputs."""
    from gradgraph.jacobians.matmul import mm_maxmin_dot
    B, I, T = 2, 3, 11
    a, b = RNG.integers(-3, 4, (2, B, I, T)).astype(dtype) / 2      # many ties
    Amax, Amin = np.maximum(a, b), np.minimum(a, b)
    PT = RNG.integers(-2, 3, (B, J, T)).astype(dtype) * dtype(0.25)   # zeros and ties
    Ymax = np.full((B, I, J), -np.inf, dtype)
    Ymin = np.full((B, I, J), np.inf, dtype)
    mm_maxmin_dot(Amax, Amin, PT, Ymax, Ymin, jb)
    u = PT[:, None, :, :] * Amax[:, :, None, :]                       # (B, I, J, T)
    v = PT[:, None, :, :] * Amin[:, :, None, :]
    np.testing.assert_array_equal(Ymax, np.maximum(u, v).max(-1))
    np.testing.assert_array_equal(Ymin, np.minimum(u, v).min(-1))
    assert Ymax.dtype == Ymin.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B, nb", [(1, 1), (1, 3), (2, 2), (3, 5)])
def test_mm_maxmin_masked_row_blocks_against_numpy(dtype, B, nb):
    """The causal (masked) kernel with its output rows split into ``nb`` blocks per batch entry
    (last blocks short, more blocks than rows per block), against max / min over the products
    of non-zero weights in numpy, bit for bit (a max is exact): ties, zero weights (no edges
    here), negative weights and inputs, and a dead input entry."""
    from gradgraph.jacobians.matmul import mm_maxmin_masked
    I, T, J = 7, 9, 6
    a, b = RNG.integers(-3, 4, (2, B, I, T)).astype(dtype) / 2
    Amax, Amin = np.maximum(a, b), np.minimum(a, b)
    Amax[0, 2, 4], Amin[0, 2, 4] = -np.inf, np.inf
    P = RNG.integers(-2, 3, (B, T, J)).astype(dtype) * dtype(0.25)
    P[0, 0] = 0.0                                   # a row without edges
    P[0, 1, :2] = P[0, 1, -2:] = 0.0                # zeros at both ends (rows are visited between
    P[-1, 2:] = np.tril(P[-1, 2:] + 1.0)[:, :J]     # their first and last edge); a causal pattern
    Ymax = np.full((B, I, J), -np.inf, dtype)
    Ymin = np.full((B, I, J), np.inf, dtype)
    mm_maxmin_masked(Amax, Amin, P, Ymax, Ymin, nb)
    live = (P != 0)[:, None, :, :] & (Amax > -np.inf)[:, :, :, None]      # (B, I, T, J)
    with np.errstate(invalid="ignore"):
        u = np.where(live, P[:, None] * Amax[:, :, :, None], -np.inf)
        v = np.where(live, P[:, None] * Amin[:, :, :, None], np.inf)
    np.testing.assert_array_equal(Ymax, np.maximum(u, np.where(live, v, -np.inf)).max(2))
    np.testing.assert_array_equal(Ymin, np.minimum(v, np.where(live, u, np.inf)).min(2))
    assert Ymax.dtype == Ymin.dtype == dtype


@pytest.mark.parametrize("function", ["softmax", "log_softmax"])
@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_softmax_signed_max_in_float32(function, tiny, transpose):
    """A float32 model's softmax / log-softmax rows: the signed max product runs in float32 (to
    float32 rounding), or in float64 (to float64 rounding) when a probability is below 1e-8 (a
    product of two could leave float32's range). Tied probabilities and values (the best and
    second best of a row are equal), an exact zero probability and a dead input."""
    x = torch.from_numpy(RNG.standard_normal((3, 40)))
    x[0, 5] = -1000.0                      # probability exactly 0
    x[1, 7] = x[1, 8] = x[1, 9]            # tied probabilities
    if tiny:
        x[2, 3] = -30.0                    # probability ~1e-14
    p = torch.softmax(x, 1)
    jac = RowBlockJacobian(x.shape, function, 3, 40, 1, p.numpy(), precision="float32")
    f = (lambda v: torch.softmax(v, 1)) if function == "softmax" else (lambda v: torch.log_softmax(v, 1))
    D = jac_of(f, x, x.numel())
    W = D.T if transpose else D
    a, b = RNG.standard_normal((2, W.shape[1]))
    a[50:53] = b[50:53] = 0.75             # tied values
    xmax, xmin = np.maximum(a, b), np.minimum(a, b)
    xmax[11], xmin[11] = -np.inf, np.inf
    exp_max, exp_min = signed_max_expected(W, xmax, xmin)
    ymax, ymin = jac.max_product(xmax.copy(), xmin.copy(), transpose)
    rtol = 1e-12 if tiny else 1e-6
    np.testing.assert_allclose(ymax, exp_max, rtol=rtol, atol=0)
    np.testing.assert_allclose(ymin, exp_min, rtol=rtol, atol=0)


@pytest.mark.parametrize("shape", [(1, 3072, 768), (2, 13, 29), (3, 8, 8), (1, 1, 17), (1, 17, 1), (4, 9, 16), (1, 0, 5)])
def test_transpose_into_against_numpy(shape):
    """The tiled transpose behind the max kernels' per-product weight copies: 8 x 8 tiles, ragged
    edges in both dimensions, empty and single-row operands, batches."""
    from gradgraph.jacobians.matmul import transpose_into
    for dtype in (np.float32, np.float64):
        a = RNG.standard_normal(shape).astype(dtype)
        d = np.full((shape[0], shape[2], shape[1]), np.nan, dtype)
        transpose_into(a, d)
        np.testing.assert_array_equal(d, np.swapaxes(a, 1, 2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("wrt", ["left", "right"])
@pytest.mark.parametrize("transpose", [False, True])
def test_max_product_signed_rows_with_dead_entries(dtype, wrt, transpose):
    """A linear layer's product whose input has a few rows with dead (no path) entries, e.g. the
    query of the first position: the fully live rows take the dot-product kernel, the others
    the axpy-form one, and one zero weight (no edge) is redone exactly. 20 rows: enough to take
    the dot form also where it reads a copy of the weight made for the product (DOT_MIN_ROWS)."""
    from gradgraph.jacobians import matmul as matmul_module
    X = RNG.standard_normal((20, 130)).astype(dtype) if wrt == "left" else RNG.standard_normal((130, 20)).astype(dtype)
    Wt = RNG.standard_normal((130, 140)).astype(dtype) if wrt == "left" else RNG.standard_normal((140, 130)).astype(dtype)
    Wt[3, 5] = 0.0
    if wrt == "left":
        jac = MatmulJacobian((20, 140), X.shape, Wt, "left")
        D = jac_of(lambda x: x @ torch.from_numpy(Wt).double(), torch.from_numpy(X).double(), 20 * 140)
    else:
        jac = MatmulJacobian((140, 20), X.shape, Wt, "right")
        D = jac_of(lambda x: torch.from_numpy(Wt).double() @ x, torch.from_numpy(X).double(), 140 * 20)
    W = D.T if transpose else D                  # (dst, src)
    src_shape = jac.out_shape if transpose else jac.in_shape
    a, b = RNG.standard_normal((2,) + src_shape)
    xmax, xmin = np.maximum(a, b), np.minimum(a, b)
    # canonical rows are the first axis (left) or the second (right): kill a few entries of two rows
    dead = (np.array([0, 0, 4]), np.array([1, 7, 3]))
    if wrt == "right":
        dead = dead[::-1]
    xmax[dead] = -np.inf
    xmin[dead] = np.inf
    xmax, xmin = xmax.reshape(-1), xmin.reshape(-1)
    exp_max, exp_min = signed_max_expected(W, xmax, xmin)
    with mock.patch.object(matmul_module, "mm_maxmin_dot", wraps=matmul_module.mm_maxmin_dot) as dot, \
            mock.patch.object(matmul_module, "mm_maxmin_dense", wraps=matmul_module.mm_maxmin_dense) as axpy:
        ymax, ymin = jac.max_product(xmax.copy(), xmin.copy(), transpose)
    long_rows = (src_shape[-1] if wrt == "left" else src_shape[0]) >= 128
    assert dot.called == axpy.called == long_rows
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(ymax, exp_max, rtol=rtol, atol=0)
    np.testing.assert_allclose(ymin, exp_min, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------- index maps as strided copies
def _strided_indices(form):
    """The index array a strided form stands for, by brute force over its multi-indices."""
    import itertools
    offset, shape, strides = form
    return np.array([offset + sum(i * s for i, s in zip(ix, strides)) for ix in itertools.product(*map(range, shape))],
                    dtype=np.int64).reshape(-1)


_INDEX_MAPS = {
    "transpose": np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5).transpose(2, 0, 3, 1),
    "slice": np.arange(120).reshape(2, 3, 4, 5)[:, 1, ::2],
    "split": np.arange(120).reshape(2, 3, 4, 5)[..., 2:4],
    "select": np.arange(120).reshape(2, 3, 4, 5)[1, 2],
    "broadcast": np.broadcast_to(np.arange(5), (4, 5)),
    "one": np.array([7]),
    "reversed": np.arange(10)[::-1],                                 # negative stride: no form
    "shuffled": np.random.default_rng(0).permutation(24),            # no form
}


@pytest.mark.parametrize("name", sorted(_INDEX_MAPS))
def test_strided_form_lists_the_index_array(name):
    from gradgraph.jacobians.sparse import _strided_form
    idx = np.ascontiguousarray(_INDEX_MAPS[name]).reshape(-1)
    form = _strided_form(idx, idx.size)
    if name in ("reversed", "shuffled"):
        assert form is None
    else:
        assert np.array_equal(_strided_indices(form), idx)


@pytest.mark.parametrize("a", sorted(_INDEX_MAPS))
@pytest.mark.parametrize("b", sorted(_INDEX_MAPS))
def test_common_shape_keeps_both_index_arrays(a, b):
    from gradgraph.jacobians.sparse import _common_shape, _strided_form
    ia, ib = (np.ascontiguousarray(_INDEX_MAPS[k]).reshape(-1) for k in (a, b))
    fa, fb = _strided_form(ia, ia.size), _strided_form(ib, ib.size)
    if fa is None or fb is None or ia.size != ib.size:
        return
    common = _common_shape(fa, fb)
    assert common is not None                       # these shapes nest
    assert common[0][1] == common[1][1]
    assert np.array_equal(_strided_indices(common[0]), ia) and np.array_equal(_strided_indices(common[1]), ib)


def test_common_shape_of_dimensions_that_do_not_nest():
    from gradgraph.jacobians.sparse import _common_shape
    # (3, 2) against (2, 3): the inner counts 2 and 3 do not divide each other
    assert _common_shape((0, (3, 2), (1, 3)), (0, (2, 3), (1, 2))) is None


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_index_map_copies_against_the_dense_matrix(transpose, dtype):
    """A transpose's permutation composed with a slice (both index arrays strided, of different
    shapes): every product is a copy, checked against the dense matrix -- several channels (the
    LENGTH semiring's), signed and unsigned max, the entropy pair."""
    from gradgraph.algorithms.semirings import ENTROPY
    from gradgraph.algorithms.products import product
    rows = np.arange(4 * 6 * 5).reshape(4, 6, 5).transpose(1, 0, 2)[:, :, 1:4].reshape(-1)
    cols = np.arange(2 * 72).reshape(72, 2)[:, 1]
    jac = SparseJacobian((4 * 6 * 5,), (2 * 72,), rows=rows, cols=cols)
    assert jac._copy_forms(transpose) is not None
    D = jac.to_dense().T if transpose else jac.to_dense()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, D.shape[1])).astype(dtype)
    x[:, ::7] = 0.0
    y = jac.sum_product(x, WeightMap.SIGNED, transpose)
    assert y.dtype == dtype and np.array_equal(y, (D @ x.T.astype(np.float64)).T.astype(dtype))
    pair = np.abs(x[:2])
    assert np.array_equal(product(ENTROPY, jac, pair, transpose), (D @ pair.T.astype(np.float64)).T.astype(dtype))
    hit = D.any(axis=1)
    xmax, xmin = x[0].copy(), x[1].copy()
    xmax[::5], xmin[::5] = -np.inf, np.inf                   # no path
    hi, lo = jac.max_product(xmax, xmin, transpose)
    src = D.argmax(axis=1)
    assert np.array_equal(hi, np.where(hit, xmax[src], -np.inf)) and np.array_equal(lo, np.where(hit, xmin[src], np.inf))
    mag, none = jac.max_product(np.abs(x[0]), None, transpose)
    assert none is None and np.array_equal(mag, np.where(hit, np.abs(x[0])[src], 0.0))
