"""Every Jacobian rule against ``torch.func.jacrev`` of its op, on random float64 inputs.

``SAMPLES`` maps each op to sample calls. The test covers every op in ``registered_ops()`` (it
fails when a registered op has no sample, so a new rule cannot escape it) and representative ops of
every generic rule family (it fails when a generic family has no representative). For each sample,
each floating-point output and each floating-point tensor argument, ``jac.to_dense()`` must equal
the jacrev matrix of shape (out_numel, in_numel).
"""
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from gradgraph.capture.registry import RuleContext, generic_rules, get_rule, registered_ops, substitute

aten = torch.ops.aten
G = torch.Generator().manual_seed(0)


def r(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def pos(*shape):
    return torch.rand(*shape, generator=G, dtype=torch.float64) + 0.5


@dataclass
class Case:
    args: tuple
    kwargs: dict = field(default_factory=dict)
    # A differentiable reference computing the same outputs, for outputs autograd itself treats as
    # non-differentiable (layer norm's saved mean and rstd).
    ref: object = None
    id: str = ""


def C(*args, ref=None, id="", **kwargs):
    return Case(tuple(args), kwargs, ref, id)


TIES = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, -1.0], [5.0, 1.0, 5.0, 5.0]], dtype=torch.float64)
IDX = torch.tensor([2, 0, 2, 1])
MASK = torch.tensor([[True, False, False, True], [False, False, False, False], [True, True, False, True]])
SCATTER_IDX = torch.tensor([[0, 0, 3], [1, 1, 1], [2, 0, 2]])
# rows with no, one and two zeros
ZEROS = torch.tensor([[1.5, -2.0, 0.5, 3.0], [1.5, 0.0, 0.5, 3.0], [0.0, 2.0, 0.0, -1.0]], dtype=torch.float64)


def _used_src(op):
    """``op`` (a scatter) with src cut to the index's shape first: autograd's scatter backward
    returns a gradient of the index's shape for a larger src and fails; the elements beyond the
    index are not read, so their derivatives are 0."""
    def f(x, dim, index, src, *rest, **kwargs):
        return op(x, dim, index, src[tuple(slice(0, n) for n in index.shape)], *rest, **kwargs)
    return f


def _copy(x, src, non_blocking=False):
    # aten.copy has no autograd formula: the same function, differentiable (nothing of x is kept)
    return x * 0 + src


def _ln_stats(x, shape, w, b, eps):
    d = x.reshape(-1, int(np.prod(shape)))
    mean = d.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((d - mean) ** 2).mean(-1, keepdim=True) + eps)
    keep = x.shape[:x.dim() - len(shape)] + (1,) * len(shape)
    return (torch.nn.functional.layer_norm(x, shape, w, b, eps), mean.reshape(keep), rstd.reshape(keep))


def _bn_eval(x, w, b, m, v, momentum, eps):
    # autograd treats the running statistics as constants; the formula differentiates them too
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - m.reshape(shape)) * torch.rsqrt(v.reshape(shape) + eps)
    if w is not None:
        y = y * w.reshape(shape) + b.reshape(shape)
    return y, x.new_zeros(0), x.new_zeros(0)


SAMPLES = {
    # --- rules of their own
    aten._to_copy.default: [C(r(2, 3), dtype=torch.float64)],
    aten.sum.default: [C(r(2, 3))],
    aten.sum.dim_IntList: [C(r(2, 3, 4), [1]), C(r(2, 3, 4), [0, 2], True, id="keepdim"),
                           C(r(2, 3), [-1])],
    aten.mean.default: [C(r(3, 2))],
    aten.mean.dim: [C(r(2, 3, 4), [-1], True, id="keepdim"), C(r(2, 3, 4), [0, 1])],
    aten.amax.default: [C(TIES, [1], id="ties"), C(TIES, [0], True, id="ties-keepdim"), C(r(2, 3, 4), [0, 2])],
    aten.amin.default: [C(-TIES, [1], id="ties"), C(r(2, 3), [0], True)],
    aten.max.dim: [C(r(3, 4), 1), C(r(2, 3, 4), 0, True, id="keepdim")],
    aten.min.dim: [C(r(3, 4), -1)],
    aten.mm.default: [C(r(3, 4), r(4, 2))],
    aten.bmm.default: [C(r(2, 3, 4), r(2, 4, 5))],
    aten.addmm.default: [C(r(2), r(3, 4), r(4, 2), id="broadcast-bias"),
                         C(r(3, 2), r(3, 4), r(4, 2), beta=0.5, alpha=2.0, id="alpha-beta")],
    aten.baddbmm.default: [C(r(2, 3, 5), r(2, 3, 4), r(2, 4, 5)),
                           C(r(5), r(2, 3, 4), r(2, 4, 5), beta=2.0, alpha=-1.5, id="alpha-beta")],
    aten.convolution.default: [
        C(r(2, 4, 6, 7), r(6, 2, 3, 2), r(6), [2, 1], [1, 2], [1, 2], False, [0, 0], 2,
          id="2d-strided-grouped-dilated"),
        C(r(1, 2, 5, 5), r(3, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, id="2d-nobias"),
        C(r(2, 3, 9), r(4, 3, 3), r(4), [2], [1], [2], False, [0], 1, id="1d"),
        C(r(1, 2, 3, 3), r(2, 3, 2, 2), r(3), [2, 2], [0, 0], [1, 1], True, [1, 1], 1, id="transposed"),
        C(r(2, 4, 3, 4), r(4, 1, 3, 2), r(2), [2, 1], [1, 0], [1, 2], True, [1, 0], 2,
          id="transposed-2d-grouped-dilated-padded"),
        C(r(2, 3, 5), r(3, 2, 3), r(2), [3], [1], [1], True, [2], 1, id="transposed-1d"),
        C(r(1, 2, 2, 3, 2), r(2, 2, 2, 2, 3), None, [2, 1, 2], [0, 1, 1], [1, 1, 1], True, [1, 0, 0], 1,
          id="transposed-3d"),
        C(r(2, 2, 4, 5, 3), r(4, 1, 2, 3, 2), r(4), [1, 2, 1], [1, 0, 1], [2, 1, 1], False, [0, 0, 0], 2,
          id="3d-grouped-strided-dilated"),
    ],
    aten.avg_pool2d.default: [
        C(r(2, 3, 6, 6), [2, 2], id="plain"),
        C(r(1, 2, 5, 6), [3, 3], [2, 2], [1, 1], False, True, id="padded-include"),
        C(r(1, 2, 5, 6), [3, 2], [2, 1], [1, 1], False, False, id="padded-exclude"),
        C(r(1, 2, 5, 6), [3, 3], [2, 2], [1, 0], True, False, id="ceil"),
        C(r(1, 2, 4, 4), [2, 2], [1, 1], [0, 0], False, True, 3, id="divisor"),
        C(r(2, 5, 5), [2, 2], [2, 2], [1, 1], False, False, id="3d"),
    ],
    aten._adaptive_avg_pool2d.default: [C(r(2, 3, 4, 6), [2, 3], id="divisible"),
                                        C(r(1, 2, 5, 7), [3, 4], id="uneven"), C(r(3, 5, 5), [2, 2], id="3d")],
    aten.max_pool2d_with_indices.default: [C(r(2, 3, 6, 6), [2, 2], [2, 2]),
                                           C(r(1, 2, 5, 5), [3, 3], [2, 2], [1, 1], [1, 1], True, id="ceil-pad")],
    aten.adaptive_max_pool2d.default: [C(r(2, 3, 5, 6), [2, 3]), C(r(2, 4, 4), [3, 2], id="3d-overlapping")],
    aten.topk.default: [C(r(3, 5), 2), C(r(4, 3, 2), 3, 0, False, id="dim0-smallest")],
    aten._softmax.default: [C(r(3, 5), -1, False), C(r(2, 4, 3), 1, False, id="middle-dim"),
                            C(r(4, 3), 0, False, id="first-dim")],
    aten.softmax.int: [C(r(2, 3, 4), 1)],
    aten._log_softmax.default: [C(r(3, 5), -1, False), C(r(2, 4, 3), 1, False, id="middle-dim")],
    aten.log_softmax.int: [C(r(4, 3), 0)],
    aten.native_layer_norm.default: [
        C(r(3, 5), [5], r(5), r(5), 1e-5, ref=_ln_stats),
        C(r(2, 3, 4), [3, 4], r(3, 4), r(3, 4), 1e-3, ref=_ln_stats, id="2d-normalized"),
        C(r(2, 4), [4], None, None, 1e-5, ref=_ln_stats, id="no-affine"),
    ],
    aten.var.correction: [C(r(3, 4), [1]), C(r(2, 3, 4), [0, 2], correction=0, keepdim=True, id="keepdim")],
    aten.var_mean.correction: [C(r(3, 4), [1]), C(r(2, 3, 4), None, correction=0, id="all"),
                               C(r(2, 3, 4), [-1], correction=1, keepdim=True, id="keepdim")],
    aten.prod.default: [C(r(2, 3)), C(ZEROS[1], id="one-zero"), C(ZEROS[2], id="two-zeros")],
    aten.prod.dim_int: [C(ZEROS, 1, id="zeros-per-row"), C(r(2, 3, 4), 1, True, id="keepdim"),
                        C(ZEROS, 0, id="dim0")],
    aten.cumsum.default: [C(r(3, 4), 1), C(r(2, 3, 4), 0, id="dim0"), C(r(5), -1, id="1d")],
    # --- in-place writes (as torch.export makes them functional)
    aten.index_put.default: [
        C(r(3, 4), [MASK], r(()), id="mask-scalar"),
        C(r(4, 3), [torch.tensor([2, 0])], r(2, 3), id="rows"),
        C(r(4, 3), [torch.tensor([2, 0, 2]), torch.tensor([1, 1, 1])], r(3), True, id="accumulate-duplicates"),
        C(r(2, 4, 3), [None, torch.tensor([3, 1])], r(3), True, id="accumulate-broadcast"),
        C(r(3, 4), [MASK], r(()), True, id="accumulate-mask")],
    aten.scatter.src: [C(r(3, 4), 1, torch.tensor([[2, 0], [1, 3], [0, 1]]), r(3, 2)),
                       C(r(3, 4), 1, torch.tensor([[2, 0], [1, 3], [0, 1]]), r(3, 3), ref=_used_src(aten.scatter.src),
                         id="src-larger-than-index")],
    aten.scatter.value: [C(r(3, 4), 0, torch.tensor([[1, 0, 2, 1]]), 2.5)],
    aten.scatter_add.default: [C(r(3, 4), 1, SCATTER_IDX, r(3, 3)),
                               C(r(3, 4), 1, SCATTER_IDX, r(4, 5), ref=_used_src(aten.scatter_add.default),
                                 id="src-larger-than-index")],
    aten.scatter_reduce.two: [C(r(3, 4), 1, SCATTER_IDX, r(3, 3), "sum"),
                              C(r(3, 4), 1, SCATTER_IDX, r(3, 3), "sum", include_self=False, id="exclude-self"),
                              C(r(3, 4), 1, SCATTER_IDX, r(3, 5), "sum", ref=_used_src(aten.scatter_reduce.two),
                                id="src-larger-than-index"),
                              C(pos(3, 4), 1, SCATTER_IDX, pos(3, 3), "prod", id="prod-dense")],
    aten.index_add.default: [C(r(4, 3), 0, torch.tensor([1, 3, 1]), r(3, 3), alpha=0.5),
                             C(r(2, 5), 1, torch.tensor([4, 0]), r(2, 2), id="dim1")],
    aten.index_copy.default: [C(r(4, 3), 0, torch.tensor([2, 0]), r(2, 3))],
    aten.copy.default: [C(r(2, 3), r(3), ref=_copy, id="broadcast"), C(r(2, 3), r(2, 3), ref=_copy)],
    aten.slice_scatter.default: [C(r(4, 5), r(4, 2), 1, 1, 2**63 - 1, 2, id="end-max"),
                                 C(r(5, 3), r(2, 3), 0, 1, 3, id="dim0")],
    aten.select_scatter.default: [C(r(3, 4), r(3), 1, 2)],
    aten.diagonal_scatter.default: [C(r(3, 3), r(3)), C(r(3, 4), r(3), 1, id="offset")],
    aten.masked_fill.Scalar: [C(r(3, 4), MASK, -1.5)],
    aten.masked_fill.Tensor: [C(r(3, 4), MASK, r(()))],
    aten.masked_scatter.default: [C(r(3, 4), MASK, r(3, 4))],
    aten.index_fill.int_Scalar: [C(r(3, 4), 1, torch.tensor([0, 2]), 2.0)],
    aten.index_fill.int_Tensor: [C(r(3, 4), 1, torch.tensor([1]), r(()))],
    aten.fill.Scalar: [C(r(2, 3), 1.5)],
    aten.fill.Tensor: [C(r(2, 3), r(()))],
    # --- generic: pointwise (by the ATen pointwise tag)
    aten.add.Tensor: [C(r(2, 3), r(3), id="broadcast"), C(r(2, 1, 3), r(4, 1), alpha=2.5, id="alpha-both")],
    aten.sub.Tensor: [C(r(2, 3), r(2, 1), alpha=0.5)],
    aten.mul.Tensor: [C(r(2, 3), r(1, 3)), C(r(3), r(2, 1), id="outer"), C(r(2, 3), r(2, 3), id="same-shape"),
                      C(r(2, 3), 0.5, id="constant")],
    aten.mul.Scalar: [C(r(2, 3), 1.5)],
    aten.div.Tensor: [C(r(2, 3), pos(3))],
    aten.where.self: [C(torch.tensor([[True, False, True]]), r(2, 3), r(3))],
    aten.tanh.default: [C(r(3, 4))],
    aten.exp.default: [C(r(3, 4))],
    aten.rsqrt.default: [C(pos(3, 4))],
    aten.pow.Tensor_Scalar: [C(pos(3, 4), 1.7)],
    aten.pow.Tensor_Tensor: [C(pos(2, 3), r(3))],
    aten.relu.default: [C(r(3, 4))],
    aten.gelu.default: [C(r(3, 4)), C(r(3, 4), approximate="tanh", id="tanh")],
    aten.erf.default: [C(r(3, 4))],
    aten.sigmoid.default: [C(r(3, 4))],
    aten.clamp.default: [C(r(3, 4), -0.5, 0.5)],
    aten.maximum.default: [C(r(3, 4), r(4))],
    aten.leaky_relu.default: [C(r(3, 4), 0.2)],
    aten._native_batch_norm_legit_no_training.default: [
        C(r(2, 3, 4, 4), r(3), r(3), r(3), pos(3), 0.1, 1e-5, ref=_bn_eval),
        C(r(2, 3, 5), None, None, r(3), pos(3), 0.1, 1e-3, ref=_bn_eval, id="no-affine-1d")],
    # --- generic: data movement
    aten.view.default: [C(r(2, 6), [3, 4])],
    aten.permute.default: [C(r(2, 3, 4), [2, 0, 1])],
    aten.expand.default: [C(r(3, 1), [2, 3, 4])],
    aten.slice.Tensor: [C(r(5, 4), 0, 1, 5, 2), C(r(3, 6), 1, -4, None, 1, id="negative")],
    aten.select.int: [C(r(3, 4, 2), 1, 2)],
    aten.unsqueeze.default: [C(r(3, 4), 1)],
    aten.squeeze.dims: [C(r(3, 1, 4, 1), [1, 3])],
    aten.transpose.int: [C(r(2, 3, 4), 0, 2)],
    aten.clone.default: [C(r(3, 4))],
    aten.alias.default: [C(r(3, 4))],
    aten.cat.default: [C([r(2, 3), r(1, 3), r(4, 3)], 0), C([r(2, 3), r(2, 1)], 1, id="dim1")],
    aten.stack.default: [C([r(2, 3), r(2, 3)], 1)],
    aten.index.Tensor: [C(r(4, 3), [IDX]), C(r(2, 4, 3), [None, IDX], id="second-dim")],
    aten._unsafe_index.Tensor: [C(r(2, 3, 4), [None, torch.tensor([[0], [0], [2]]), torch.tensor([1, 1, 3])])],
    aten.index_select.default: [C(r(4, 3), 0, IDX)],
    aten.gather.default: [C(r(3, 4), 1, torch.tensor([[0, 0, 3], [1, 2, 2], [3, 3, 3]]))],
    aten.constant_pad_nd.default: [C(r(2, 3), [1, 2, 0, 1]), C(r(2, 3), [1, 1], 2.5, id="value")],
    aten.split_with_sizes.default: [C(r(5, 3), [2, 3], 0)],
    aten.repeat.default: [C(r(2, 3), [2, 1, 2])],
    aten.flip.default: [C(r(2, 3, 4), [0, 2])],
    # --- generic: constant-like (shape only; no edges)
    aten.full_like.default: [C(r(2, 3), 7.0)],
    aten.zeros_like.default: [C(r(2, 3))],
}




def _float_keys(args):
    keys = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
            keys.append(i)
        elif isinstance(a, (list, tuple)):
            keys += [(i, k) for k, t in enumerate(a) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
    return keys


def _arg(args, key):
    return args[key] if isinstance(key, int) else args[key[0]][key[1]]


# ----------------------------------------------------------------------------- layouts
# Every sample is also run with its floating-point tensor arguments in other memory layouts: the
# rules must not depend on strides. Values may change (an expanded tensor repeats a slice), the
# shapes do not; the reference Jacobian is taken on a contiguous copy.
def _strided(x):
    """Same values, every element at stride 2 (a non-contiguous view)."""
    return torch.stack([x, torch.zeros_like(x)], -1)[..., 0] if x.dim() else x


def _transposed(x):
    """Same values, the last two dims swapped in memory (a transposed view)."""
    return x.mT.contiguous().mT if x.dim() >= 2 else _strided(x)


def _expanded(x):
    """The first dim of size > 1 is a stride-0 expansion of its first slice."""
    for d, n in enumerate(x.shape):
        if n > 1:
            return x.narrow(d, 0, 1).expand(x.shape)
    return x


def _overlapping(x):
    """as_strided over a 1-d buffer with stride 1 in every dim: element (i, j, ..) = base[i + j + ..]."""
    if x.numel() <= 1 or x.dim() < 2:
        return _expanded(x)
    base = x.reshape(-1)[:sum(n - 1 for n in x.shape) + 1].clone()
    return base.as_strided(x.shape, (1,) * x.dim())


LAYOUTS = {"transposed": _transposed, "strided": _strided, "expanded": _expanded, "overlapping": _overlapping}


def _relayout(args, fn):
    def one(a):
        return fn(a) if isinstance(a, torch.Tensor) and a.dtype.is_floating_point else a
    return tuple([one(t) for t in a] if isinstance(a, (list, tuple)) else one(a) for a in args)


def _zero_size(case):
    """The sample with dim 0 of its first floating tensor argument cut to size 0 (None for a 0-d one)."""
    key = _float_keys(case.args)[0]
    first = _arg(case.args, key)
    if first.dim() == 0:
        return None
    return Case(tuple(substitute(case.args, key, first[:0])), case.kwargs, case.ref, case.id)


def _params():
    out = []
    for op, cases in SAMPLES.items():
        for n, case in enumerate(cases):
            name = f"{op}-{case.id or n}"
            out.append(pytest.param(op, case, id=name))
            # every layout on an op's first sample, one in turn on the others (run time)
            names = list(LAYOUTS) if n == 0 else [list(LAYOUTS)[n % len(LAYOUTS)]]
            for layout, fn in ((k, LAYOUTS[k]) for k in names):
                variant = Case(_relayout(case.args, fn), case.kwargs, case.ref, case.id)
                if _accepts(op, variant):      # (view refuses strides it cannot view)
                    out.append(pytest.param(op, variant, id=f"{name}-{layout}"))
    return out


def _accepts(op, case):
    try:
        op(*case.args, **case.kwargs)
        return True
    except (RuntimeError, IndexError, ValueError):
        return False


def _zero_size_params():
    out = []
    for op, cases in SAMPLES.items():
        for n, case in enumerate(cases):
            out.append(pytest.param(op, case, id=f"{op}-{case.id or n}-zero-size"))
    return out


def test_every_registered_op_has_a_sample():
    missing = [str(op) for op in registered_ops() if op not in SAMPLES]
    assert not missing, f"registered rules without a sample in tests/test_rules.py SAMPLES: {missing}"


def test_every_generic_family_has_a_representative():
    covered = {get_rule(op) for op in SAMPLES}
    missing = [fn.__name__ for _, fn in generic_rules() if fn not in covered]
    assert not missing, f"generic rules without a representative op in SAMPLES: {missing}"


def _reference(f, x):
    """d f / d x by jacrev, by reverse-mode autograd where jacrev cannot batch the op's backward."""
    try:
        return torch.func.jacrev(f)(x)
    except RuntimeError:
        return torch.autograd.functional.jacobian(f, x)


@pytest.mark.parametrize("op, case", _params())
def test_rule_matches_jacrev(op, case):
    _check_rule(op, case)


@pytest.mark.parametrize("op, case", _zero_size_params())
def test_rule_on_zero_size_inputs(op, case):
    """The sample with its leading dim cut to 0 (where the op accepts that): the rule returns
    Jacobians of the right (empty) shapes, equal to jacrev's."""
    cut = _zero_size(case)
    try:
        op(*cut.args, **cut.kwargs) if cut is not None else None
    except (RuntimeError, IndexError, ValueError):
        cut = None
    if cut is None:
        ZERO_SIZE_REFUSED.add(op)
        return
    _check_rule(op, cut, empty_outputs=True)


#: ops whose samples all refuse a zero-size leading dim (the op itself raises)
ZERO_SIZE_REFUSED = set()


def _check_rule(op, case, empty_outputs=False):
    rule = get_rule(op)
    assert rule is not None, f"{op} has no rule (it would fall to the dense fallback)"
    fn = case.ref or (lambda *a, **k: op(*a, **k))
    outs = op(*case.args, **case.kwargs)
    multi = isinstance(outs, (tuple, list))
    outs = list(outs) if multi else [outs]
    keys = _float_keys(case.args)
    assert keys
    checked = 0
    for i, out in enumerate(outs):
        if not (out.dtype.is_floating_point and (out.numel() or empty_outputs)):
            continue
        ctx = RuleContext(op, case.args, case.kwargs, out, i if multi else None, set(keys))
        jacs = rule(ctx)
        for key in keys:
            x = _arg(case.args, key)

            def f(t, key=key, i=i):
                o = fn(*substitute(case.args, key, t), **case.kwargs)
                return o[i] if multi else o
            if out.numel() * x.numel():
                expected = _reference(f, x.contiguous()).reshape(out.numel(), x.numel()).numpy()
            else:   # an empty matrix (autograd refuses some empty backward passes)
                expected = np.zeros((out.numel(), x.numel()))
            assert key in jacs, f"{op}: no Jacobian for argument {key}"
            jac = jacs[key]
            assert jac.out_shape == tuple(out.shape) and jac.in_shape == tuple(x.shape)
            np.testing.assert_allclose(jac.to_dense(), expected, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{op} output {i} argument {key}")
            checked += 1
    assert checked
