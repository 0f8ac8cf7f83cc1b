"""Jacobian rules for core ATen ops, one per ``OpOverload`` (find an op by its ATen name here).

Generic rules cover whole families exactly:

* pointwise ops (ATen ``pointwise`` tag): the derivative of each output element by forward-mode
  AD with a tangent of ones -- each output element depends on one element of each (broadcast)
  input, so this is the Jacobian's diagonal;
* data movement (views, slicing, cat, gather, padding, ...): the op itself is run on the flat
  indices ``1..n`` of the input, so the output says which input element each output element copies;
* constant-like ops (``full_like``, ``zeros_like``, ...): the output takes only the input's shape,
  so the Jacobian has no entries.

No rule loops over elements in Python: every Jacobian is built by whole-tensor operations.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..graph import VIEW_OPS
from ..jacobians import ConvJacobian, MatmulJacobian, RowBlockJacobian, SparseJacobian
from .registry import RuleContext, dense_jacobian, register_generic, register_rule, substitute

aten = torch.ops.aten


def _np(t):
    return t.detach().cpu().contiguous().numpy()


def _own_memory(t):
    """``t`` detached, copied to contiguous memory when several of its elements share one memory
    location (``expand``'s stride 0, an overlapping ``as_strided``) or it has no dense layout.

    Forward-mode AD and jacrev write tangents with the primal's strides, which is impossible when
    elements alias; numpy views of such tensors would alias too. A tensor that is merely permuted
    (a transposed weight) keeps its memory: rules store it by reference."""
    t = t.detach()
    return t if _is_dense(t) else t.contiguous()


def _is_dense(t):
    """True when ``t``'s elements fill a block of memory once each, in some order of dimensions."""
    expected = 1
    for stride, size in sorted((st, s) for st, s in zip(t.stride(), t.shape) if s != 1):
        if size == 0:
            return True
        if stride != expected:
            return False
        expected *= size
    return True


def _broadcast_cols(in_shape, out_shape):
    """Flat input index of the element each output element reads under broadcasting."""
    idx = torch.arange(math.prod(in_shape), dtype=torch.int64).reshape(in_shape)
    return _np(torch.broadcast_to(idx, out_shape).reshape(-1))


def _elementwise(out, x, deriv):
    """Output element i depends on the broadcast element of x with derivative deriv[i]."""
    d = torch.broadcast_to(torch.as_tensor(deriv, dtype=out.dtype), out.shape)
    # no broadcast: element i of x (no index array to build, store and check)
    cols = None if tuple(x.shape) == tuple(out.shape) else _broadcast_cols(tuple(x.shape), tuple(out.shape))
    return SparseJacobian(out.shape, x.shape, None, cols, _np(d.reshape(-1)))


# ----------------------------------------------------------------------------- pointwise
def _is_pointwise(op):
    return torch.Tag.pointwise in op.tags


@register_generic(_is_pointwise)
def pointwise(ctx):
    """Elementwise (with broadcasting): derivative per output element by jvp with ones."""
    jacs = {}
    for key in ctx.wants:
        x = ctx.arg(key)

        def f(t, key=key):
            return ctx.call_with(key, t)

        x = _own_memory(x)
        _, d = torch.func.jvp(f, (x,), (torch.ones_like(x),))
        jacs[key] = _elementwise(ctx.out, x, d)
    return jacs


# The commonest pointwise ops (residual and mask adds, scalings) have their derivative at hand: no
# forward-mode AD call per op and argument, which is most of the pointwise family's capture time.
@register_rule(aten.add.Tensor)
@register_rule(aten.sub.Tensor)
def add_sub(ctx):
    """out = a + alpha b (sub: a - alpha b): d/da = 1, d/db = alpha (sub: -alpha)."""
    alpha = ctx.kwargs.get("alpha", 1)
    scale = -alpha if ctx.op is aten.sub.Tensor else alpha
    return {key: _elementwise(ctx.out, ctx.arg(key), 1 if key == 0 else scale) for key in ctx.wants}


@register_rule(aten.mul.Tensor)
def mul(ctx):
    """out = a b: d/da = b, d/db = a (broadcast to the output's shape)."""
    a, b = ctx.args[:2]
    return {key: _elementwise(ctx.out, ctx.arg(key), (b if key == 0 else a)) for key in ctx.wants}


def _zero(out, x):
    """A Jacobian with no scalar edges: ``out`` does not depend on the values of ``x``."""
    none = np.zeros(0, dtype=np.int64)
    return SparseJacobian(out.shape, x.shape, none, none, np.zeros(0))


@register_rule(aten._native_batch_norm_legit_no_training.default)
def batch_norm_eval(ctx):
    """Eval-mode batch norm, y = (x - m) r w + b with r = (v + eps)^(-1/2) per channel (dim 1):
    dy/dx = r w, dy/dw = (x - m) r, dy/db = 1, dy/dm = -r w, dy/dv = -(x - m) w r^3 / 2; each
    output element depends on one element of each argument. The saved statistics (outputs 1, 2)
    are empty in eval mode."""
    x, w, b, m, v = ctx.args[:5]
    eps = ctx.args[6] if len(ctx.args) > 6 else ctx.kwargs.get("eps", 1e-5)
    if ctx.output_index:
        return {key: _zero(ctx.out, ctx.arg(key)) for key in ctx.wants}
    C = x.shape[1] if x.dim() > 1 else 1
    shape = (1, C) + (1,) * (x.dim() - 2)
    per_channel = {a: t.detach().double().reshape(shape) for a, t in ((1, w), (2, b), (3, m), (4, v))
                   if t is not None}
    xd = x.detach().double()
    r = torch.rsqrt(per_channel[4] + eps)
    wt = per_channel.get(1, torch.ones(shape, dtype=torch.float64))
    deriv = {0: r * wt, 1: (xd - per_channel[3]) * r, 2: torch.ones(()), 3: -r * wt,
             4: -0.5 * (xd - per_channel[3]) * wt * r ** 3}
    channel_cols = _broadcast_cols(shape, tuple(x.shape))
    jacs = {}
    for key in ctx.wants:
        d = torch.broadcast_to(deriv[key], x.shape).to(ctx.out.dtype)
        cols = None if key == 0 else channel_cols
        jacs[key] = SparseJacobian(ctx.out.shape, ctx.arg(key).shape, None, cols, _np(d.reshape(-1)))
    return jacs


# ----------------------------------------------------------------------------- data movement
#: Ops whose Jacobian is a weight-1 index map: the views (:data:`gradgraph.graph.VIEW_OPS`,
#: registered below as pure data movement, so their nodes are transparent in paths) and the ops
#: that rearrange, select or copy elements without being views.
REARRANGING_OPS = frozenset({
    "cat", "stack", "index", "gather", "index_select", "constant_pad_nd", "repeat", "flip", "roll",
    "split", "split_with_sizes", "unbind", "narrow", "diagonal", "unfold", "pixel_shuffle",
    "pixel_unshuffle", "movedim", "tile", "_unsafe_index",
    # in-place writes as torch.export makes them functional (out[:, i] = y, out[1:] = y,
    # h[mask] = v, ...): each output element is one element of the written tensor or of the values
    "copy", "slice_scatter", "select_scatter", "diagonal_scatter", "index_copy",
    "masked_fill", "masked_scatter", "index_fill", "fill",
})
DATA_MOVEMENT = VIEW_OPS | REARRANGING_OPS


#: Ops whose output is its one input, element for element (a copy, perhaps in another layout or
#: dtype): the identity map when the shapes agree.
_ELEMENTWISE_COPIES = frozenset({"clone", "contiguous", "alias", "alias_copy", "detach", "lift_fresh_copy"})


def _strided_index_map(ctx, key, x):
    """The index map of a view or copy read from the tensors' geometry, without running the op:
    None (the identity) for a copy of the same shape or a view laying out x's memory unchanged;
    the flat input index per output element for another view of a contiguous x; False when the
    geometry does not say (the op is run on indices instead). Linear in the output's size, and
    without the op's run, the shift, the search for unwritten elements and the identity check
    of the generic map (several passes over tensors the size of attention scores)."""
    out, name = ctx.out, ctx.op._opname
    if key != 0 or not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor):
        return False
    if name in _ELEMENTWISE_COPIES:
        return None if tuple(out.shape) == tuple(x.shape) else False
    if name not in VIEW_OPS or not x.is_contiguous() or out.numel() == 0 or \
            out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
        return False
    offset = out.storage_offset() - x.storage_offset()
    last = offset + sum((n - 1) * st for n, st in zip(out.shape, out.stride()))
    if offset < 0 or last >= x.numel() or min(out.stride(), default=0) < 0:
        return False                  # reaches beyond x (an as_strided view of its storage)
    if offset == 0 and out.numel() == x.numel() and out.is_contiguous():
        return None
    # offset + sum_d i_d stride_d over the output's index grid: the cost follows the output (one
    # element selected from a vocabulary-sized tensor costs nothing)
    cols = torch.tensor(offset, dtype=torch.int64)
    for d, (n, st) in enumerate(zip(out.shape, out.stride())):
        if n > 1:
            cols = cols + (torch.arange(n, dtype=torch.int64) * st).reshape((n,) + (1,) * (out.dim() - d - 1))
    return _np(torch.broadcast_to(cols, out.shape).reshape(-1))


@register_generic(lambda op: op._opname in VIEW_OPS, data_movement=True)
@register_generic(lambda op: op._opname in REARRANGING_OPS)
def data_movement(ctx):
    """Weight-1 index map: run the op on the input's flat indices 1..n (0 marks 'no input')."""
    jacs = {}
    for key in ctx.wants:
        x = ctx.arg(key)
        cols = _strided_index_map(ctx, key, x)
        if cols is not False:
            jacs[key] = SparseJacobian(ctx.out.shape, x.shape, None, cols, None)
            continue
        args = list(ctx.args)
        # every other floating tensor argument becomes zeros, so only this input's indices show
        for i, a in enumerate(args):
            if i == key:
                continue        # replaced by the indices below
            if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
                args[i] = torch.zeros(a.shape, dtype=torch.int64)
            elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
                args[i] = [torch.zeros(t.shape, dtype=torch.int64) if t.dtype.is_floating_point else t
                           for t in a]
        idx = torch.arange(1, x.numel() + 1, dtype=torch.int64).reshape(x.shape)
        # a float scalar is a written value (a pad or fill value): 0 too, and int64 can hold it
        args = [0 if isinstance(a, float) else a for a in args]
        kwargs = {k: 0 if isinstance(v, float) else v for k, v in ctx.kwargs.items()}
        o = ctx.call(*substitute(args, key, idx), **kwargs)
        cols = _np(o.reshape(-1)) - 1
        rows = np.nonzero(cols >= 0)[0]
        jacs[key] = SparseJacobian(ctx.out.shape, x.shape, rows, cols[rows], None)
    return jacs


# ----------------------------------------------------------------------------- scatters
# Writes that either replace (scatter, index_put) or add (scatter_add, index_put with accumulate,
# index_add, scatter_reduce "sum"): the written tensor's elements map to the output like data
# movement (added-to elements keep their edge, replaced ones lose it); an added value element goes
# to the output element its index names, found by indexing the output's flat indices the way the
# op indexes its destination.
def _written_only(ctx):
    """data_movement's index map for argument 0 (the written tensor) alone."""
    return data_movement(RuleContext(ctx.op, ctx.args, ctx.kwargs, ctx.out, ctx.output_index, {0}))[0]


def _out_indices(ctx):
    return torch.arange(ctx.out.numel(), dtype=torch.int64).reshape(ctx.out.shape)


def _scatter_values(ctx, src, dim, index):
    """scatter's value element at position p (within index's shape) goes to output element
    out[p with dim replaced by index[p]] (the gather of the output's flat indices)."""
    rows = torch.gather(_out_indices(ctx), dim, index)
    src_idx = torch.arange(src.numel(), dtype=torch.int64).reshape(src.shape)
    cols = src_idx[tuple(slice(0, n) for n in index.shape)] if index.dim() else src_idx
    return SparseJacobian(ctx.out.shape, src.shape, _np(rows.reshape(-1)), _np(cols.reshape(-1)), None)


def _adding(ctx, values_key, values_jacobian):
    jacs = {}
    if 0 in ctx.wants:
        jacs[0] = _written_only(ctx)
    if values_key in ctx.wants:
        jacs[values_key] = values_jacobian()
    return jacs


@register_rule(aten.scatter.src)
@register_rule(aten.scatter.value)
@register_rule(aten.index_copy.default)
def replacing_scatter(ctx):
    """Each output element is the written tensor's or one value element: an index map."""
    return data_movement(ctx)


@register_rule(aten.index_put.default)
def index_put(ctx):
    """``x[indices] = values`` (an index map) or, with ``accumulate``, ``x[indices] += values``:
    values (broadcast to the indexed shape) go to the output elements ``out_indices[indices]``."""
    accumulate = ctx.args[3] if len(ctx.args) > 3 else ctx.kwargs.get("accumulate", False)
    if not accumulate:
        return data_movement(ctx)
    values = ctx.args[2]

    def values_jacobian():
        rows = aten.index.Tensor(_out_indices(ctx), ctx.args[1])
        rows, cols = _np(rows.reshape(-1)), _broadcast_cols(tuple(values.shape), tuple(rows.shape))
        # a broadcast value element added twice to one output (a repeated index) is one edge of
        # weight 2: a Jacobian entry is one edge
        pairs, count = np.unique(np.stack([rows, cols]), axis=1, return_counts=True)
        return SparseJacobian(ctx.out.shape, values.shape, pairs[0], pairs[1], count.astype(np.float64))
    return _adding(ctx, 2, values_jacobian)


@register_rule(aten.scatter_add.default)
def scatter_add(ctx):
    x, dim, index, src = ctx.args[:4]
    return _adding(ctx, 3, lambda: _scatter_values(ctx, src, dim, index))


@register_rule(aten.scatter_reduce.two)
def scatter_reduce(ctx):
    """The "sum" reduction is scatter_add (without the written tensor's elements where
    ``include_self=False``); other reductions use the dense fallback."""
    x, dim, index, src, reduce = ctx.args[:5]
    if reduce != "sum":
        return {key: dense_jacobian(ctx, key) for key in ctx.wants}
    return _adding(ctx, 3, lambda: _scatter_values(ctx, src, dim, index))


@register_rule(aten.index_add.default)
def index_add(ctx):
    """out = x with ``alpha * source`` added along ``dim`` at ``index``: source slice i goes to
    output slice index[i]."""
    x, dim, index, source = ctx.args[:4]
    alpha = ctx.args[4] if len(ctx.args) > 4 else ctx.kwargs.get("alpha", 1)

    def values_jacobian():
        if not ctx.out.numel():
            return _zero(ctx.out, source)
        rows = torch.index_select(_out_indices(ctx), dim, index) if x.dim() else _out_indices(ctx)
        vals = None if alpha == 1 else np.full(rows.numel(), float(alpha))
        return SparseJacobian(ctx.out.shape, source.shape, _np(rows.reshape(-1)), None, vals)
    return _adding(ctx, 3, values_jacobian)


@register_rule(aten._to_copy.default, data_movement=True)
@register_rule(aten.clone.default, data_movement=True)
def to_copy(ctx):
    """A dtype / device copy, or a copy of the memory: identity."""
    return {0: SparseJacobian(ctx.out.shape, ctx.args[0].shape)}


# ----------------------------------------------------------------------------- reductions
def _reduce_rows(x, dims, keepdim_shape):
    """For each input element, the flat index of the output element it is reduced into."""
    n_out = math.prod(keepdim_shape)
    o = torch.arange(n_out, dtype=torch.int64).reshape(keepdim_shape)
    return _np(torch.broadcast_to(o, x.shape).reshape(-1))


def _keepdim_shape(x, dims):
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(x.dim()))
    if isinstance(dims, int):
        dims = [dims]
    dims = {d % max(x.dim(), 1) for d in dims}
    return tuple(1 if i in dims else s for i, s in enumerate(x.shape)), dims


def _reduction_args(ctx):
    name = ctx.op._overloadname
    x = ctx.args[0]
    if name == "default":
        return x, None
    dims = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim")
    return x, dims


@register_rule(aten.sum.dim_IntList)
@register_rule(aten.sum.default)
@register_rule(aten.mean.dim)
@register_rule(aten.mean.default)
def sum_mean(ctx):
    x, dims = _reduction_args(ctx)
    ks, dims_set = _keepdim_shape(x, dims)
    rows = _reduce_rows(x, dims, ks)
    vals = None
    if ctx.op._opname == "mean":
        count = math.prod(x.shape[d] for d in dims_set) if x.dim() else 1
        vals = np.full(x.numel(), 1.0 / max(count, 1))     # (no entries when count is 0)
    return {0: SparseJacobian(ctx.out.shape, x.shape, rows, None, vals)}


@register_rule(aten.prod.default)
@register_rule(aten.prod.dim_int)
def prod(ctx):
    """d prod / d x_j is the product of the other elements of x_j's line: the product of those
    before it times the product of those after it -- exact with zeros (one zero in a line leaves
    only its own derivative non-zero, two zeros leave none), no division."""
    x = ctx.args[0]
    if ctx.op is aten.prod.default or x.dim() == 0:
        outer, n, inner = 1, x.numel(), 1
    else:
        outer, n, inner = _rows_layout(tuple(x.shape), ctx.args[1])
    line = x.detach().double().reshape(outer, n, inner)
    ones = torch.ones(outer, 1, inner, dtype=torch.float64)
    before = torch.cumprod(torch.cat([ones, line[:, :-1]], 1), 1)[:, :n]
    after = torch.cumprod(torch.cat([ones, line.flip(1)[:, :-1]], 1), 1)[:, :n].flip(1)
    rows = torch.broadcast_to(torch.arange(outer * inner).reshape(outer, 1, inner), (outer, n, inner))
    return {0: SparseJacobian(ctx.out.shape, x.shape, _np(rows.reshape(-1)), None,
                              _np((before * after).reshape(-1)))}


@register_rule(aten.cumsum.default)
def cumsum(ctx):
    """Output i of a line is the sum of inputs j <= i: n (n + 1) / 2 unit entries per line."""
    x = ctx.args[0]
    if x.dim() == 0:
        return {0: SparseJacobian(ctx.out.shape, x.shape)}
    outer, n, inner = _rows_layout(tuple(x.shape), ctx.args[1])
    i, j = np.tril_indices(n)
    o = np.arange(outer)[:, None, None]
    t = np.arange(inner)[None, None, :]
    rows = (o * n + i[None, :, None]) * inner + t
    cols = (o * n + j[None, :, None]) * inner + t
    return {0: SparseJacobian(ctx.out.shape, x.shape, rows.reshape(-1), cols.reshape(-1), None)}


@register_rule(aten.amax.default)
@register_rule(aten.amin.default)
def amax(ctx):
    """Like autograd: the derivative is shared equally among the elements attaining the max."""
    x = ctx.args[0]
    dims = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim", [])
    ks, dims_set = _keepdim_shape(x, dims)
    rows = _reduce_rows(x, dims, ks)
    hit = (x == ctx.out.reshape(ks)).to(x.dtype)
    count = hit.sum(dim=sorted(dims_set), keepdim=True) if x.dim() else hit
    vals = _np((hit / count).reshape(-1))
    return {0: SparseJacobian(ctx.out.shape, x.shape, rows, None, vals)}


@register_rule(aten.max.dim)
@register_rule(aten.min.dim)
def max_dim(ctx):
    """(values, indices) = max(x, dim): each value comes from the element at its index."""
    x, dim = ctx.args[0], ctx.args[1] % ctx.args[0].dim()
    keepdim = ctx.args[2] if len(ctx.args) > 2 else False
    _, ind = ctx.op(*ctx.args, **ctx.kwargs)
    if not keepdim:
        ind = ind.unsqueeze(dim)
    idx = torch.arange(x.numel(), dtype=torch.int64).reshape(x.shape)
    cols = torch.gather(idx, dim, ind)
    return {0: SparseJacobian(ctx.out.shape, x.shape, None, _np(cols.reshape(-1)), None)}


@register_rule(aten.topk.default)
def topk(ctx):
    """(values, indices) = topk(x, k, dim): value i comes from the element at indices[i]."""
    x = ctx.args[0]
    dim = (ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("dim", -1)) % max(x.dim(), 1)
    _, ind = ctx.op(*ctx.args, **ctx.kwargs)
    idx = torch.arange(x.numel(), dtype=torch.int64).reshape(x.shape)
    cols = torch.gather(idx, dim, ind) if x.dim() else idx.reshape(ind.shape)
    return {0: SparseJacobian(ctx.out.shape, x.shape, None, _np(cols.reshape(-1)), None)}


# ----------------------------------------------------------------------------- contractions
@register_rule(aten.mm.default)
@register_rule(aten.bmm.default)
def mm(ctx):
    a, b = ctx.args[0], ctx.args[1]
    return {0: MatmulJacobian(ctx.out.shape, a.shape, _own_memory(b).numpy(), "left"),
            1: MatmulJacobian(ctx.out.shape, b.shape, _own_memory(a).numpy(), "right")}


def _scaled(t, s):
    return _own_memory(t).numpy() if s == 1 else _np(t * s)


@register_rule(aten.addmm.default)
@register_rule(aten.baddbmm.default)
def addmm(ctx):
    bias, a, b = ctx.args[:3]
    beta = ctx.kwargs.get("beta", 1)
    alpha = ctx.kwargs.get("alpha", 1)
    jacs = {}
    if 0 in ctx.wants:
        jacs[0] = _elementwise(ctx.out, bias, torch.tensor(float(beta)))
    if 1 in ctx.wants:
        jacs[1] = MatmulJacobian(ctx.out.shape, a.shape, _scaled(b, alpha), "left")
    if 2 in ctx.wants:
        jacs[2] = MatmulJacobian(ctx.out.shape, b.shape, _scaled(a, alpha), "right")
    return jacs


@register_rule(aten.convolution.default)
def convolution(ctx):
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = ctx.args[:9]
    jacs = {}
    for key in ctx.wants:
        if key == 0 and not transposed and w.dim() in (3, 4):
            jacs[0] = ConvJacobian(ctx.out.shape, x.shape, _own_memory(w).numpy(), stride, padding,
                                   dilation, groups)
        elif key == 0 and not transposed:
            jacs[0] = SparseJacobian(ctx.out.shape, x.shape, *_conv_entries(
                tuple(x.shape), tuple(ctx.out.shape), w, stride, padding, dilation, groups))
        elif key == 0:
            # a transposed convolution is the adjoint of the convolution from its output's shape
            # to its input's with the same weight: the same entries, rows and columns swapped
            to_x, from_out, vals = _conv_entries(tuple(ctx.out.shape), tuple(x.shape), w, stride,
                                                 padding, dilation, groups)
            jacs[0] = SparseJacobian(ctx.out.shape, x.shape, from_out, to_x, vals)
        elif key == 2:
            shape = (1, bias.shape[0]) + (1,) * (ctx.out.dim() - 2)
            cols = _broadcast_cols(shape, tuple(ctx.out.shape))
            jacs[2] = SparseJacobian(ctx.out.shape, bias.shape, None, cols, None)
        else:
            jacs[key] = dense_jacobian(ctx, key)
    return jacs


def _conv_entries(in_shape, out_shape, w, stride, padding, dilation, groups):
    """The entries of a batched N-d convolution's Jacobian wrt its input, as index maps: (rows =
    output flat indices, cols = input flat indices, vals = weights), one per multiply of the
    convolution. Output (n, co, o) reads input (n, ci, o * stride - padding + k * dilation) with
    weight w[co, ci mod (Cin / groups), k] for ci in co's group."""
    N, Ci = in_shape[:2]
    Co = out_shape[1]
    Cig, kernel = w.shape[1], tuple(w.shape[2:])
    # valid (output position, kernel offset, input position) triples, combined over the dims
    out_sp = k_sp = in_sp = np.zeros(1, dtype=np.int64)
    for d, K in enumerate(kernel):
        o = np.arange(out_shape[2 + d])[:, None]
        i = o * stride[d] - padding[d] + np.arange(K)[None, :] * dilation[d]
        oo, kk = np.nonzero((i >= 0) & (i < in_shape[2 + d]))
        out_sp = (out_sp[:, None] * out_shape[2 + d] + oo[None, :]).reshape(-1)
        k_sp = (k_sp[:, None] * K + kk[None, :]).reshape(-1)
        in_sp = (in_sp[:, None] * in_shape[2 + d] + i[oo, kk][None, :]).reshape(-1)
    n_out, n_in = math.prod(out_shape[2:]), math.prod(in_shape[2:])
    co = np.arange(Co)[:, None, None]
    cl = np.arange(Cig)[None, :, None]
    ci = (co // (Co // groups)) * Cig + cl
    n = np.arange(N)[:, None, None, None]
    rows = (n * Co + co[None]) * n_out + out_sp[None, None, None, :]
    cols = (n * Ci + ci[None]) * n_in + in_sp[None, None, None, :]
    vals = _np(w).reshape(Co, Cig, -1)[:, :, k_sp][None]
    shape = (N, Co, Cig, len(out_sp))
    return tuple(np.broadcast_to(a, shape).reshape(-1) for a in (rows, cols, vals))


@register_rule(aten.avg_pool2d.default)
def avg_pool2d(ctx):
    """Average pooling as a depthwise convolution with constant weights, when it is one."""
    x = ctx.args[0]
    kernel = list(ctx.args[1])
    kernel = kernel * 2 if len(kernel) == 1 else kernel
    stride = list(ctx.args[2]) if len(ctx.args) > 2 and ctx.args[2] else kernel
    stride = stride * 2 if len(stride) == 1 else stride
    padding = list(ctx.args[3]) if len(ctx.args) > 3 else [0, 0]
    padding = padding * 2 if len(padding) == 1 else padding
    ceil_mode = ctx.args[4] if len(ctx.args) > 4 else False
    count_include_pad = ctx.args[5] if len(ctx.args) > 5 else True
    divisor = ctx.args[6] if len(ctx.args) > 6 else None
    if x.dim() not in (3, 4) or ceil_mode or (any(padding) and not count_include_pad):
        return {0: _pool_windows(ctx, kernel, stride, padding)}
    C = x.shape[1]
    w = np.full((C, 1) + tuple(kernel), 1.0 / (divisor or kernel[0] * kernel[1]), dtype=_np(x).dtype)
    return {0: ConvJacobian(ctx.out.shape, x.shape, w, stride, padding, [1, 1], C)}


def _pool_windows(ctx, kernel, stride, padding):
    """A linear pooling op whose output o averages the real (non-padding) input elements of its
    window with one weight w_o: the window's elements come from unfolding the flat indices 1..HW
    (0 = padding), and w_o = op(ones)[o] / (number of real elements in window o)."""
    x = ctx.args[0]
    H, W = x.shape[-2:]
    oh, ow = ctx.out.shape[-2:]
    planes = x.numel() // (H * W)
    idx = torch.arange(1, H * W + 1, dtype=torch.float64).reshape(1, 1, H, W)
    # ceil_mode may add windows that overhang the bottom / right: pad enough zeros for them
    extra_h = max(0, (oh - 1) * stride[0] + kernel[0] - (H + 2 * padding[0]))
    extra_w = max(0, (ow - 1) * stride[1] + kernel[1] - (W + 2 * padding[1]))
    idx = torch.nn.functional.pad(idx, (padding[1], padding[1] + extra_w, padding[0], padding[0] + extra_h))
    win = torch.nn.functional.unfold(idx, kernel, stride=stride)[0].long()       # (k*k, L)
    n_h = (idx.shape[-2] - kernel[0]) // stride[0] + 1
    n_w = (idx.shape[-1] - kernel[1]) // stride[1] + 1
    win = win.reshape(-1, n_h, n_w)[:, :oh, :ow].reshape(win.shape[0], oh * ow)
    count = (win > 0).sum(0).to(torch.float64)
    w_o = ctx.call(torch.ones_like(x, dtype=torch.float64), *ctx.args[1:], **ctx.kwargs)
    w_o = w_o.reshape(planes, oh * ow) / count
    k_idx, o_idx = torch.nonzero(win > 0, as_tuple=True)
    cols_plane = win[k_idx, o_idx] - 1
    offs = torch.arange(planes, dtype=torch.int64)[:, None]
    rows = offs * (oh * ow) + o_idx[None, :]
    cols = offs * (H * W) + cols_plane[None, :]
    vals = w_o[:, o_idx]
    return SparseJacobian(ctx.out.shape, x.shape, _np(rows.reshape(-1)), _np(cols.reshape(-1)),
                          _np(vals.reshape(-1)))


@register_rule(aten._adaptive_avg_pool2d.default)
def adaptive_avg_pool2d(ctx):
    """Output (i, j) averages rows floor(i H / oh) .. ceil((i + 1) H / oh) - 1 (columns alike);
    a depthwise convolution when the sizes divide, else explicit windows of varying size."""
    x = ctx.args[0]
    H, W = x.shape[-2:]
    oh, ow = ctx.out.shape[-2:]
    if x.dim() == 4 and H % oh == 0 and W % ow == 0:
        k = [H // oh, W // ow]
        w = np.full((x.shape[1], 1) + tuple(k), 1.0 / (k[0] * k[1]), dtype=_np(x).dtype)
        return {0: ConvJacobian(ctx.out.shape, x.shape, w, k, [0, 0], [1, 1], x.shape[1])}

    def windows(n_in, n_out):
        i = torch.arange(n_out)
        start, end = (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out
        off = torch.arange(int((end - start).max()))
        return start[:, None] + off, start[:, None] + off < end[:, None], (end - start).double()

    hi, hv, hn = windows(H, oh)
    wi, wv, wn = windows(W, ow)
    # (oh, ow, kh, kw) grid of window members
    valid = hv[:, None, :, None] & wv[None, :, None, :]
    col = hi[:, None, :, None] * W + wi[None, :, None, :]
    row = (torch.arange(oh)[:, None] * ow + torch.arange(ow))[:, :, None, None]
    val = 1.0 / (hn[:, None] * wn[None, :])[:, :, None, None]
    row, col, val = (torch.broadcast_to(t, valid.shape)[valid] for t in (row, col, val))
    planes = x.numel() // (H * W)
    p = torch.arange(planes)[:, None]
    return {0: SparseJacobian(ctx.out.shape, x.shape, _np((p * oh * ow + row).reshape(-1)),
                              _np((p * H * W + col).reshape(-1)), _np(val.repeat(planes)))}


@register_rule(aten.max_pool2d_with_indices.default)
@register_rule(aten.adaptive_max_pool2d.default)
def max_pool2d(ctx):
    """Each pooled value comes from the input element at its recorded index (within its plane)."""
    x = ctx.args[0]
    _, ind = ctx.op(*ctx.args, **ctx.kwargs)
    plane = x.shape[-2] * x.shape[-1]
    n_planes = x.numel() // plane
    offsets = (torch.arange(n_planes, dtype=torch.int64) * plane).reshape(ind.shape[:-2] + (1, 1))
    return {0: SparseJacobian(ctx.out.shape, x.shape, None, _np((ind + offsets).reshape(-1)), None)}


# ----------------------------------------------------------------------------- row blocks
def _rows_layout(shape, dim):
    dim = dim % len(shape)
    outer = math.prod(shape[:dim])
    return outer, shape[dim], math.prod(shape[dim + 1:])


def _factor_dtype(t):
    """The dtype a row-block factor of ``t``'s op is kept in: float32 for a float32 (or widened
    half-precision) model, float64 otherwise."""
    return torch.float32 if t.dtype == torch.float32 else torch.float64


def _row_factor(t, outer, d, inner):
    """``t`` as (rows, d) in its own dtype (float32 or float64): rows along the last dimension
    (inner == 1) are ``t``'s own memory, not a copy."""
    return _np(t.reshape(outer, d, inner).transpose(1, 2).reshape(outer * inner, d))


@register_rule(aten._softmax.default)
@register_rule(aten.softmax.int)
def softmax(ctx):
    x, dim = ctx.args[0], ctx.args[1]
    if x.dim() == 0:
        return {0: SparseJacobian(ctx.out.shape, x.shape, vals=np.zeros(1))}
    o, d, i = _rows_layout(tuple(x.shape), dim)
    return {0: RowBlockJacobian(ctx.out.shape, "softmax", o, d, i, _row_factor(ctx.out, o, d, i))}


@register_rule(aten._log_softmax.default)
@register_rule(aten.log_softmax.int)
def log_softmax(ctx):
    x, dim = ctx.args[0], ctx.args[1]
    o, d, i = _rows_layout(tuple(x.shape), dim)
    return {0: RowBlockJacobian(ctx.out.shape, "log_softmax", o, d, i,
                                _row_factor(ctx.out.double().exp(), o, d, i))}


@register_rule(aten.native_layer_norm.default)
def layer_norm(ctx):
    x, normalized_shape, weight, bias = ctx.args[:4]
    eps = ctx.args[4] if len(ctx.args) > 4 else 1e-5
    d = math.prod(normalized_shape)
    outer = x.numel() // d
    xd = x.detach().double().reshape(outer, d)
    mean = xd.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((xd - mean) ** 2).mean(-1, keepdim=True) + eps)
    xhat = (xd - mean) * rstd
    if ctx.output_index in (1, 2):
        # the saved statistics: d mean / d x_j = 1 / d, d rstd / d x_j = -rstd^3 (x_j - mean) / d
        rows = np.repeat(np.arange(outer), d)
        vals = np.full(x.numel(), 1.0 / d) if ctx.output_index == 1 else \
            _np((-rstd ** 3 * (xd - mean) / d).reshape(-1))
        jacs = {key: _zero(ctx.out, ctx.arg(key)) for key in ctx.wants if key != 0}
        if 0 in ctx.wants:
            jacs[0] = SparseJacobian(ctx.out.shape, x.shape, rows, None, vals)
        return jacs
    jacs = {}
    if 0 in ctx.wants:
        # xhat kept in the model's dtype (a float32 model: float32, as torch's own backward
        # uses it), the small per-row and per-column factors in float64
        jacs[0] = RowBlockJacobian(ctx.out.shape, "layer_norm", outer, d, 1, _np(xhat.to(_factor_dtype(x))),
                                   _np(rstd.reshape(-1)),
                                   None if weight is None else _np(weight.double().reshape(-1)),
                                   precision="float64" if x.dtype == torch.float64 else "float32")
    if 2 in ctx.wants:
        jacs[2] = _elementwise(ctx.out, weight, xhat.reshape(x.shape).to(x.dtype))
    if 3 in ctx.wants:
        jacs[3] = _elementwise(ctx.out, bias, torch.ones(()))
    return jacs


# ----------------------------------------------------------------------------- variance
def _var_args(ctx):
    x = ctx.args[0]
    dims = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim")
    correction = ctx.kwargs.get("correction")
    return x, dims, 1 if correction is None else correction


@register_rule(aten.var_mean.correction)
@register_rule(aten.var.correction)
def var_mean(ctx):
    """var = sum((x - mean)^2) / (N - c), mean = sum(x) / N over the reduced dims, so
    d var / d x_j = 2 (x_j - mean) / (N - c) (the mean's own dependence cancels: sum(x - mean) = 0)
    and d mean / d x_j = 1 / N. ``var_mean`` returns (var, mean): ``ctx.output_index`` picks one."""
    x, dims, correction = _var_args(ctx)
    ks, dims_set = _keepdim_shape(x, dims)
    rows = _reduce_rows(x, dims, ks)
    n = math.prod(x.shape[d] for d in dims_set) if x.dim() else 1
    if ctx.op is aten.var_mean.correction and ctx.output_index == 1:
        vals = np.full(x.numel(), 1.0 / max(n, 1))
    else:
        xd = x.detach().double()
        mean = xd.mean(dim=sorted(dims_set), keepdim=True) if x.dim() else xd
        vals = _np((2.0 * (xd - mean) / (n - correction)).reshape(-1))
    return {0: SparseJacobian(ctx.out.shape, x.shape, rows, None, vals)}


# ----------------------------------------------------------------------------- constants
_CONSTANT_LIKE = {"full_like", "zeros_like", "ones_like", "empty_like", "rand_like", "randn_like",
                  "randint_like", "new_zeros", "new_ones", "new_full", "new_empty"}


@register_generic(lambda op: op._opname in _CONSTANT_LIKE)
def constant_like(ctx):
    """Outputs that take only the shape / dtype of their input: no scalar edges at all."""
    return {key: _zero(ctx.out, ctx.arg(key)) for key in ctx.wants}
