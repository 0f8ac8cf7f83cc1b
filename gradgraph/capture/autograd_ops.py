"""What ``torch.export`` loses about autograd, kept as two ops of gradgraph's own.

``run_decompositions`` lowers the exported program to ATen ops that say nothing about autograd:
``x.detach()`` becomes ``aten.alias`` (a view), a ``torch.no_grad()`` block inside ``forward``
becomes plain ops (an ``inference_mode`` block leaves no mark at all), and a custom
``torch.autograd.Function`` is inlined as the ops of its ``forward`` with its ``backward`` dropped
(torch 2.13's non-strict export leaves no mark of it in the graph or in ``node.meta``).
Differentiating those ops would give gradients autograd does not (a straight-through ``round``
would get gradient 0). So:

* :func:`routed_autograd_functions`, active while ``torch.export`` traces the model, turns each
  application of a user-defined ``torch.autograd.Function`` into one :data:`AUTOGRAD_FUNCTION` op
  (``gradgraph::autograd_function``) whose local Jacobian, :func:`autograd_function_jacobians`,
  is computed by autograd through the Function's own ``backward``; and it traces
  ``inference_mode`` blocks as ``no_grad`` blocks;
* :func:`cut_gradients`, before the decomposition, replaces every ``detach`` and the outputs of
  every ``no_grad`` block by :data:`STOP_GRADIENT` (``gradgraph::stop_gradient``, a copy): the
  capture does not differentiate through it, exactly as autograd does not.
"""
from __future__ import annotations

import contextlib
import itertools
import threading

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..errors import UnsupportedOpError
from ..jacobians import SparseJacobian
from . import registry

__all__ = ["STOP_GRADIENT", "AUTOGRAD_FUNCTION", "cut_gradients", "routed_autograd_functions",
           "autograd_function_jacobians", "function_name"]


# ----------------------------------------------------------------------------- stop_gradient
@torch.library.custom_op("gradgraph::stop_gradient", mutates_args=())
def _stop_gradient(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_stop_gradient.register_fake
def _(x):
    return torch.empty_like(x)


STOP_GRADIENT = torch.ops.gradgraph.stop_gradient.default


def cut_gradients(ep):
    """Mark, in place, where autograd stops in a (not yet decomposed) exported program: each
    ``aten.detach`` becomes :data:`STOP_GRADIENT`, and so does each output of a
    ``wrap_with_set_grad_enabled(False, ...)`` block (``torch.no_grad()`` inside ``forward``).
    Returns the number of cuts."""
    graph = ep.graph_module.graph
    aten = torch.ops.aten
    grad_mode_block = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    cuts = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.detach.default, aten.detach_.default):
            node.target = STOP_GRADIENT
            cuts += 1
        elif grad_mode_block is not None and node.target is grad_mode_block and node.args[0] is False:
            for user in list(node.users):      # the block's outputs are getitem nodes
                with graph.inserting_after(user):
                    cut = graph.call_function(STOP_GRADIENT, (user,))
                cut.meta = dict(user.meta)
                user.replace_all_uses_with(cut, delete_user_cb=lambda u: u is not cut)
                cuts += 1
    if cuts:
        ep.graph_module.recompile()
    return cuts


# ----------------------------------------------------------------------------- autograd.Function
class _Application:
    """One traced ``Function.apply(*args, **kwargs)``: the class and the non-tensor arguments
    (baked into the program, as ``torch.export`` bakes them), the tensor arguments are the op's."""

    def __init__(self, cls, leaves, spec):
        self.cls, self.leaves, self.spec = cls, leaves, spec
        self.tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        self.out_leaves = self.out_spec = None

    def apply(self, tensors):
        """The Function's outputs (a flat list of tensors) on these tensor arguments, by its
        original ``apply`` (so under grad mode autograd records its ``backward``)."""
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_at, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        with _bypass():
            out = _ORIGINAL_APPLY.__get__(None, self.cls)(*args, **kwargs)
        out_leaves, self.out_spec = pytree.tree_flatten(out)
        self.out_leaves = out_leaves
        return [v for v in out_leaves if isinstance(v, torch.Tensor)]


_APPLICATIONS: dict = {}
_IDS = itertools.count()
_ORIGINAL_APPLY = torch.autograd.Function.__dict__["apply"]
_STATE = threading.local()


@contextlib.contextmanager
def _bypass():
    old = getattr(_STATE, "bypass", False)
    _STATE.bypass = True
    try:
        yield
    finally:
        _STATE.bypass = old


@torch.library.custom_op("gradgraph::autograd_function", mutates_args=())
def _autograd_function(tensors: list[torch.Tensor], application: int) -> list[torch.Tensor]:
    with torch.no_grad():
        # outputs may not alias inputs (a custom op's contract); a copy is what the graph records
        return [t.clone() for t in _APPLICATIONS[application].apply(tensors)]


@_autograd_function.register_fake
def _(tensors, application):
    return [t.clone() for t in _APPLICATIONS[application].apply(tensors)]


AUTOGRAD_FUNCTION = torch.ops.gradgraph.autograd_function.default


def function_name(application_id, qualified=True):
    """``module.QualName`` (or ``QualName``) of the Function of an :data:`AUTOGRAD_FUNCTION` call."""
    cls = _APPLICATIONS[application_id].cls
    return f"{cls.__module__}.{cls.__qualname__}" if qualified else cls.__qualname__


def _routed(cls, *args, **kwargs):
    if getattr(_STATE, "bypass", False) or cls.__module__.split(".")[0] == "torch":
        # torch's own Functions (checkpointing, ...) are traced: their backward is the derivative
        return _ORIGINAL_APPLY.__get__(None, cls)(*args, **kwargs)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    app = _Application(cls, leaves, spec)
    app_id = next(_IDS)
    _APPLICATIONS[app_id] = app
    outs = iter(torch.ops.gradgraph.autograd_function(
        [leaves[i] for i in app.tensor_at], app_id))
    # the fake run inside the op recorded the output structure; fill its tensors from the op
    out = [next(outs) if isinstance(v, torch.Tensor) else v for v in app.out_leaves]
    return pytree.tree_unflatten(out, app.out_spec)


def _inference_mode_as_no_grad(self):
    # export leaves no mark of inference mode at all; for gradients it means no_grad, which
    # export does record (and cut_gradients cuts)
    self._inference_mode_context = torch.no_grad() if self.mode else contextlib.nullcontext()
    self._inference_mode_context.__enter__()


_INFERENCE_MODE_ENTER = torch.inference_mode.__enter__


@contextlib.contextmanager
def routed_autograd_functions():
    """While active (around ``torch.export``), ``SomeFunction.apply(...)`` of a
    ``torch.autograd.Function`` not defined in torch itself records one :data:`AUTOGRAD_FUNCTION`
    op, and ``torch.inference_mode()`` blocks are traced as ``torch.no_grad()`` blocks."""
    torch.autograd.Function.apply = classmethod(_routed)
    torch.inference_mode.__enter__ = _inference_mode_as_no_grad
    try:
        yield
    finally:
        torch.autograd.Function.apply = _ORIGINAL_APPLY
        torch.inference_mode.__enter__ = _INFERENCE_MODE_ENTER


#: Relative tolerance, in units of roundoff of the Function's dtype, of the elementwise check
#: (:func:`_elementwise_diagonals`): a backward that computes ``g * a + g * b`` instead of
#: ``g * (a + b)`` rounds differently on the probes, but only by a few units.
ELEMENTWISE_ROUNDOFF = 16


def _elementwise_diagonals(out, inputs, keys):
    """For each input whose backward is elementwise, the diagonal of d(out)/d(input).

    gradgraph, like autograd, takes a Function's local Jacobian to be the linear map its backward
    applies to the incoming gradient (the dense path reads its rows off unit vectors). That map
    ``B`` is diagonal iff ``B(v) = B(1) * v`` for every ``v``; it is tested on two random probes
    ``v`` (entries of magnitude 1 to 2, random signs, a fixed seed). For a linear ``B`` that is
    not diagonal, ``B(v) - B(1) * v = M v`` with ``M != 0``, which vanishes only on a proper
    subspace: a random probe finds it with probability one. Equality is required per element up to
    :data:`ELEMENTWISE_ROUNDOFF` units of roundoff of ``|B(1) * v|`` (zero where the diagonal is
    zero), so an off-diagonal term that moves any element by more than rounding is caught, and the
    input takes the dense path. A backward that is not linear in the gradient (clipping) fails the
    check on the probes that show it, and is dense as before.

    Parameters
    ----------
    out : torch.Tensor
        The output (flattened), attached to the Function's autograd graph.
    inputs : list[torch.Tensor]
        The inputs, of the output's shape, requiring grad.
    keys : list
        Their argument keys.

    Returns
    -------
    dict
        key -> diagonal (a flat tensor) for the inputs whose backward is elementwise.
    """
    if not inputs or not out.requires_grad:
        return {}
    gen = torch.Generator().manual_seed(20230706)

    def backward(v):
        rows = torch.autograd.grad(out, inputs, v, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(x).reshape(-1) if r is None else r.detach().reshape(-1)
                for x, r in zip(inputs, rows)]
    diag = backward(torch.ones_like(out))
    ok = [True] * len(inputs)
    for _ in range(2):
        v = (1 + torch.rand(out.shape, generator=gen, dtype=torch.float64)) * \
            torch.where(torch.rand(out.shape, generator=gen) < 0.5, -1.0, 1.0).double()
        v = v.to(out.dtype)
        for i, (d, r) in enumerate(zip(diag, backward(v))):
            expected = d * v
            tol = ELEMENTWISE_ROUNDOFF * torch.finfo(r.dtype).eps * expected.abs()
            ok[i] = ok[i] and bool(((r - expected).abs() <= tol).all())
    return {k: d for k, d, good in zip(keys, diag, ok) if good}


def autograd_function_jacobians(ctx):
    """The rule of :data:`AUTOGRAD_FUNCTION`: d(output ``ctx.output_index``)/d(tensor argument)
    for each wanted key ``(0, k)``, through the Function's own ``backward``. Where the backward
    is elementwise (an input of the output's shape, checked by :func:`_elementwise_diagonals`)
    the Jacobian is the diagonal; otherwise it is computed row by row (one backward call per
    output element) and dense, so capped like the dense fallback
    (:data:`~gradgraph.capture.registry.DENSE_FALLBACK_MAX_ENTRIES`). Sets ``ctx.dense_keys`` to
    the keys whose Jacobian is dense."""
    max_entries = registry.DENSE_FALLBACK_MAX_ENTRIES
    app_id = ctx.args[1]
    app = _APPLICATIONS[app_id]
    wants = sorted(k for k in ctx.wants if isinstance(k, tuple) and k[0] == 0)
    tensors = [t.detach().clone().requires_grad_(t.dtype.is_floating_point or t.dtype.is_complex)
               for t in ctx.args[0]]
    n_out = ctx.out.numel()
    with torch.enable_grad():
        out = app.apply(tensors)[ctx.output_index].reshape(-1)
    same_shape = [k for k in wants if tuple(tensors[k[1]].shape) == tuple(ctx.out.shape)]
    diagonals = _elementwise_diagonals(out, [tensors[k[1]] for k in same_shape], same_shape)
    jacs = {k: SparseJacobian(tuple(ctx.out.shape), tuple(ctx.out.shape), vals=d.cpu().numpy())
            for k, d in diagonals.items()}
    dense_keys = [k for k in wants if k not in diagonals]
    ctx.dense_keys = dense_keys
    for key in dense_keys:
        if n_out * tensors[key[1]].numel() > max_entries:
            raise UnsupportedOpError(
                f"the Jacobian of torch.autograd.Function {function_name(app_id)} would have "
                f"{n_out * tensors[key[1]].numel():,} entries (cap {max_entries:,}); gradgraph "
                f"computes it densely from the Function's backward (its backward is not elementwise)")
    inputs = [tensors[k[1]] for k in dense_keys]
    dense = [torch.zeros(n_out, t.numel(), dtype=t.dtype) for t in inputs]
    if out.requires_grad and inputs:
        for i in range(n_out):
            seed = torch.zeros_like(out)
            seed[i] = 1
            rows = torch.autograd.grad(out, inputs, seed, retain_graph=i + 1 < n_out, allow_unused=True)
            for d, r in zip(dense, rows):
                if r is not None:
                    d[i] = r.detach().reshape(-1)
    for key, x, d in zip(dense_keys, inputs, dense):
        d = d.numpy()
        r, c = np.nonzero(d)
        jacs[key] = SparseJacobian(tuple(ctx.out.shape), tuple(x.shape), r, c, d[r, c])
    return jacs
