"""The rule registry: one rule per ATen ``OpOverload`` giving structured local Jacobians.

A rule is a function ``rule(ctx) -> {key: Jacobian}`` where ``ctx`` is a :class:`RuleContext` and
``key`` names a differentiable tensor argument: its position ``i`` in the call, or ``(i, k)`` for
element ``k`` of a tensor-list argument (``cat``). Rules need only return Jacobians for the keys in
``ctx.wants`` (the arguments that lie on a source-to-sink path).

Lookup order for an op: a rule registered for the op itself (:func:`register_rule`), then a
generic rule by the op's nature (pointwise ops by their ATen ``pointwise`` tag, data movement ops,
...), then the dense fallback: ``torch.func.jacrev`` of the op when d(out)/d(in) has at most
:data:`DENSE_FALLBACK_MAX_ENTRIES` entries, else :class:`~gradgraph.errors.UnsupportedOpError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UnsupportedOpError
from ..jacobians import SparseJacobian

__all__ = ["RuleContext", "register_rule", "get_rule", "registered_ops", "DENSE_FALLBACK_MAX_ENTRIES",
           "dense_jacobian"]

#: Largest dense Jacobian (out_numel * in_numel entries) the jacrev fallback will build.
DENSE_FALLBACK_MAX_ENTRIES = 4_000_000

_RULES: dict = {}
_GENERIC: list = []       # (predicate(op) -> bool, rule), consulted in order


@dataclass
class RuleContext:
    """What a rule sees about one call: ``op(*args, **kwargs) -> out``."""

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


def register_rule(op, fn=None):
    """Register ``fn`` as the Jacobian rule of ATen op ``op`` (an ``OpOverload``).

    Usable as a decorator: ``@register_rule(torch.ops.aten.foo.default)``. A user rule replaces
    the library's rule for that op.

    Examples
    --------
    >>> import torch, gradgraph as gg
    >>> from gradgraph.jacobians import SparseJacobian
    >>> @gg.register_rule(torch.ops.aten.neg.default)
    ... def neg_rule(ctx):
    ...     x = ctx.args[0]
    ...     return {0: SparseJacobian(ctx.out.shape, x.shape, vals=-np.ones(x.numel()))}
    """
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"register_rule needs an ATen OpOverload such as torch.ops.aten.mm.default, got {op!r}")
    if fn is None:
        return lambda f: register_rule(op, f)
    _RULES[op] = fn
    return fn


def register_generic(predicate):
    """Decorator: a rule used for every op satisfying ``predicate(op)`` that has no rule of its own."""
    def deco(fn):
        _GENERIC.append((predicate, fn))
        return fn
    return deco


def get_rule(op):
    """The rule for ``op``, or None when only the dense fallback is left."""
    if op in _RULES:
        return _RULES[op]
    for pred, fn in _GENERIC:
        if pred(op):
            return fn
    return None


def registered_ops():
    """Every op with a rule of its own (generic rules are listed by :func:`generic_rules`)."""
    return list(_RULES)


def generic_rules():
    return list(_GENERIC)


def dense_jacobian(ctx, key, max_entries=None):
    """d(out)/d(arg key) by ``torch.func.jacrev`` of the op, as a sparse Jacobian of its non-zeros."""
    x = ctx.arg(key)
    n_entries = ctx.out.numel() * x.numel()
    cap = DENSE_FALLBACK_MAX_ENTRIES if max_entries is None else max_entries
    if n_entries > cap:
        raise UnsupportedOpError(
            f"no Jacobian rule for {ctx.op} and its dense Jacobian would have {n_entries:,} entries "
            f"(cap {cap:,}); register one with gradgraph.register_rule({ctx.op})")

    def f(t):
        args = list(ctx.args)
        if isinstance(key, int):
            args[key] = t
        else:
            lst = list(args[key[0]])
            lst[key[1]] = t
            args[key[0]] = lst
        return ctx.call(*args, **ctx.kwargs)

    xd = x.detach()
    if not xd.dtype.is_floating_point:
        raise UnsupportedOpError(f"{ctx.op}: argument {key} is not a floating-point tensor")
    J = torch.func.jacrev(f)(xd).reshape(ctx.out.numel(), x.numel())
    J = J.detach().cpu().numpy()
    rows, cols = np.nonzero(J)
    return SparseJacobian(ctx.out.shape, x.shape, rows, cols, J[rows, cols])
