"""The rule registry: one rule per ATen ``OpOverload`` giving structured local Jacobians.

A rule is a function ``rule(ctx) -> {key: Jacobian}`` where ``ctx`` is a :class:`RuleContext` and
``key`` names a differentiable tensor argument: its position ``i`` in the call, or ``(i, k)`` for
element ``k`` of a tensor-list argument (``cat``). Rules need only return Jacobians for the keys in
``ctx.wants`` (the arguments that lie on a source-to-sink path).

Lookup order for an op (:func:`get_rule`):

1. a rule registered for the op itself (:func:`register_rule`; a user's rule replaces the library's);
2. a generic rule by the op's nature, in registration order: pointwise ops by their ATen
   ``pointwise`` tag, data movement ops, constant-like ops (see :mod:`gradgraph.capture.rules`);
3. the dense fallback (:func:`dense_jacobian`): ``torch.func.jacrev`` of the op when d(out)/d(in)
   has at most :data:`DENSE_FALLBACK_MAX_ENTRIES` entries, else
   :class:`~gradgraph.errors.UnsupportedOpError` naming the op, module path and source line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UnsupportedOpError
from ..jacobians import SparseJacobian

__all__ = ["RuleContext", "register_rule", "unregister_rule", "rule", "get_rule", "is_data_movement",
           "registered_ops", "generic_rules", "DENSE_FALLBACK_MAX_ENTRIES", "dense_jacobian"]

#: Largest dense Jacobian (out_numel * in_numel entries) the jacrev fallback will build.
DENSE_FALLBACK_MAX_ENTRIES = 4_000_000

_RULES: dict = {}
_DATA_MOVEMENT: dict = {} # op -> the flag its registered rule was declared with
_SHADOWED: dict = {}      # op -> the (rule, flag) pairs a later registration replaced, oldest first
_GENERIC: list = []       # (predicate(op) -> bool, rule, data movement flag), consulted in order


@dataclass
class RuleContext:
    """What a rule sees about one call: ``op(*args, **kwargs) -> out``.

    Attributes
    ----------
    op : torch._ops.OpOverload
        The ATen op, e.g. ``torch.ops.aten.addmm.default``.
    args, kwargs
        The call's argument values, tensors as recorded in the forward pass.
    out : torch.Tensor
        The output this rule explains (one element of a tuple output, see ``output_index``).
    output_index : int or None
        For ops returning several tensors (``var_mean``, ``native_layer_norm``): which one ``out`` is.
    wants : set
        Keys of the arguments that lie on a source-to-sink path: ``i`` for argument ``i``, ``(i, k)``
        for element ``k`` of a tensor-list argument. A rule needs only return these.
    """

    op: object                      # the torch._ops.OpOverload
    args: tuple                     # argument values (tensors as torch tensors)
    kwargs: dict
    out: torch.Tensor               # the output tensor this rule explains
    output_index: int | None = None  # for ops returning tuples: which element ``out`` is
    wants: set = field(default_factory=set)

    def arg(self, key):
        return self.args[key] if isinstance(key, int) else self.args[key[0]][key[1]]

    def call(self, *args, **kwargs):
        """Run the op on other arguments, picking this rule's output element."""
        r = self.op(*args, **kwargs)
        return r[self.output_index] if self.output_index is not None else r

    def call_with(self, key, value, args=None):
        """Run the op with argument ``key`` replaced by ``value`` (in ``args``, default ours)."""
        return self.call(*substitute(self.args if args is None else args, key, value), **self.kwargs)


def substitute(args, key, value):
    """A copy of the argument list ``args`` with argument ``key`` (i or (i, k)) set to ``value``."""
    args = list(args)
    if isinstance(key, int):
        args[key] = value
    else:
        lst = list(args[key[0]])
        lst[key[1]] = value
        args[key[0]] = lst
    return args


def register_rule(op, fn=None, *, data_movement=False):
    """Register ``fn`` as the Jacobian rule of ATen op ``op`` (an ``OpOverload``).

    Usable as a decorator: ``@register_rule(torch.ops.aten.foo.default)``. A user rule replaces
    the library's rule for that op.

    Parameters
    ----------
    op : torch._ops.OpOverload
        The ATen op, e.g. ``torch.ops.aten.neg.default`` or a custom ``torch.library`` op.
    fn : callable, optional
        ``fn(ctx: RuleContext) -> {key: Jacobian}`` with one Jacobian d(ctx.out)/d(argument key)
        for each key in ``ctx.wants``. Omitted: return a decorator.
    data_movement : bool
        The op is pure data movement (a view, reshape, transpose, copy): every Jacobian it gives
        is a weight-1 map of elements. Its nodes get ``Node.is_view`` set: they are transparent in
        reported paths and not counted in path lengths. Recorded on each node at capture and
        stored in graph files.

    Returns
    -------
    callable
        ``fn`` (or the decorator). :func:`unregister_rule` undoes the registration; the context
        manager :class:`rule` registers for the duration of a ``with`` block.

    Examples
    --------
    >>> import numpy as np, torch, gradgraph as gg
    >>> from gradgraph.jacobians import SparseJacobian
    >>> @gg.register_rule(torch.ops.aten.neg.default)
    ... def neg_rule(ctx):
    ...     x = ctx.args[0]     # d(-x_i)/dx_i = -1: one entry per element, on the diagonal
    ...     return {0: SparseJacobian(ctx.out.shape, x.shape, vals=-np.ones(x.numel()))}
    """
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"register_rule needs an ATen OpOverload such as torch.ops.aten.mm.default, got {op!r}")
    if fn is None:
        return lambda f: register_rule(op, f, data_movement=data_movement)
    if op in _RULES:
        _SHADOWED.setdefault(op, []).append((_RULES[op], _DATA_MOVEMENT[op]))
    _RULES[op], _DATA_MOVEMENT[op] = fn, bool(data_movement)
    return fn


def unregister_rule(op, fn):
    """Undo :func:`register_rule` of ``fn`` for ``op``: the rule it replaced (the library's, or an
    earlier user rule) applies again.

    Raises
    ------
    KeyError
        ``fn`` is not registered for ``op``.
    """
    shadowed = _SHADOWED.get(op, [])
    older = [pair for pair in shadowed if pair[0] is fn]
    if _RULES.get(op) is fn:
        if shadowed:
            _RULES[op], _DATA_MOVEMENT[op] = shadowed.pop()
        else:
            del _RULES[op], _DATA_MOVEMENT[op]
    elif older:                          # replaced since: forget it, keep the newer rule
        shadowed.remove(older[-1])
    else:
        raise KeyError(f"{fn!r} is not a registered rule of {op}")
    if op in _SHADOWED and not _SHADOWED[op]:
        del _SHADOWED[op]


class rule:
    """Context manager: ``fn`` is the rule of ``op`` inside the ``with`` block only.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from gradgraph.capture.registry import get_rule, rule
    >>> from gradgraph.jacobians import SparseJacobian
    >>> def neg(ctx):
    ...     return {0: SparseJacobian(ctx.out.shape, ctx.args[0].shape, vals=-np.ones(ctx.out.numel()))}
    >>> with rule(torch.ops.aten.neg.default, neg):
    ...     get_rule(torch.ops.aten.neg.default) is neg
    True
    >>> get_rule(torch.ops.aten.neg.default) is neg
    False
    """

    def __init__(self, op, fn, *, data_movement=False):
        self.op, self.fn, self.data_movement = op, fn, data_movement

    def __enter__(self):
        register_rule(self.op, self.fn, data_movement=self.data_movement)
        return self.fn

    def __exit__(self, *exc):
        unregister_rule(self.op, self.fn)


def register_generic(predicate, *, data_movement=False):
    """Decorator: a rule used for every op satisfying ``predicate(op)`` that has no rule of its own;
    ``data_movement`` as for :func:`register_rule`."""
    def deco(fn):
        _GENERIC.append((predicate, fn, bool(data_movement)))
        return fn
    return deco


def _lookup(op):
    """(rule, data movement flag) for ``op`` by the lookup order of this module; (None, False)
    when only the dense fallback is left."""
    if op in _RULES:
        return _RULES[op], _DATA_MOVEMENT[op]
    for pred, fn, flag in _GENERIC:
        if pred(op):
            return fn, flag
    return None, False


def get_rule(op):
    """The rule for ``op`` by the lookup order of this module, or None when only the dense
    fallback is left.

    Examples
    --------
    >>> import torch
    >>> from gradgraph.capture.registry import get_rule
    >>> get_rule(torch.ops.aten.tanh.default).__name__          # by the pointwise tag
    'pointwise'
    >>> get_rule(torch.ops.aten.logcumsumexp.default) is None
    True
    """
    return _lookup(op)[0]


def is_data_movement(op):
    """Whether the rule :func:`get_rule` gives for ``op`` was registered as pure data movement
    (False for ops left to the dense fallback).

    Examples
    --------
    >>> import torch
    >>> from gradgraph.capture.registry import is_data_movement
    >>> is_data_movement(torch.ops.aten.view.default), is_data_movement(torch.ops.aten.cat.default)
    (True, False)
    """
    return _lookup(op)[1]


def registered_ops():
    """Every op with a rule of its own (generic rules are listed by :func:`generic_rules`).

    ``tests/test_rules.py`` checks each of them against ``torch.func.jacrev``."""
    return list(_RULES)


def generic_rules():
    """The generic rules as (predicate(op) -> bool, rule) pairs, in lookup order."""
    return [(pred, fn) for pred, fn, _ in _GENERIC]


def dense_jacobian(ctx, key, max_entries=None):
    """d(out)/d(arg key) by ``torch.func.jacrev`` of the op, as a sparse Jacobian of its non-zeros.

    Raises :class:`~gradgraph.errors.UnsupportedOpError` when the dense matrix would have more than
    ``max_entries`` (default :data:`DENSE_FALLBACK_MAX_ENTRIES`) entries."""
    x = ctx.arg(key)
    n_entries = ctx.out.numel() * x.numel()
    cap = DENSE_FALLBACK_MAX_ENTRIES if max_entries is None else max_entries
    if n_entries > cap:
        raise UnsupportedOpError(
            f"no Jacobian rule for {ctx.op} and its dense Jacobian would have {n_entries:,} entries "
            f"(cap {cap:,}); register one with gradgraph.register_rule({ctx.op})")

    # a tensor whose elements share memory (expand, overlapping as_strided) gets its own: jacrev
    # cannot write a gradient with aliasing strides
    xd = x.detach().contiguous()
    if not xd.dtype.is_floating_point:
        raise UnsupportedOpError(f"{ctx.op}: argument {key} is not a floating-point tensor")
    if n_entries == 0:          # an empty tensor on either side: no entries (jacrev cannot batch 0)
        none = np.zeros(0, dtype=np.int64)
        return SparseJacobian(ctx.out.shape, x.shape, none, none, np.zeros(0))
    try:
        J = torch.func.jacrev(lambda t: ctx.call_with(key, t))(xd)
    except RuntimeError:
        # ops whose derivative is an autograd.Function functorch cannot transform (a custom op's
        # ``register_autograd``): plain autograd, one backward per output element
        with torch.enable_grad():
            J = torch.autograd.functional.jacobian(lambda t: ctx.call_with(key, t), xd)
    J = J.reshape(ctx.out.numel(), x.numel())
    J = J.detach().cpu().numpy()
    rows, cols = np.nonzero(J)
    return SparseJacobian(ctx.out.shape, x.shape, rows, cols, J[rows, cols])
