"""The second capture path: record the ATen ops one input actually runs.

``torch.export`` traces a program valid for every input of a signature, so it fails where the
model's Python branches on tensor values (mixture-of-experts routing: ``for expert_idx in
expert_hit``; Longformer's ``if is_global_attn:``). A gradient graph is the graph of *one* input,
so gradgraph can instead run the model on that input and record the ops it runs: data-dependent
control flow is then resolved by the input itself, exactly as an eager run resolves it.

:func:`record_program` does this with ``make_fx(tracing_mode="real")`` over the same
functionalisation and the same decomposition table as the export path
(:func:`~gradgraph.capture.programs.decomposition_table`), with the module stack and source lines
of every op, and gives a :class:`RecordedProgram` that the same interpreter and builder consume.
What the export path reads from autograd is kept too: ``torch.autograd.Function``\\ s become one
:data:`~gradgraph.capture.autograd_ops.AUTOGRAD_FUNCTION` op (the same routing), and ``detach()``
or an op run with grad mode off (``torch.no_grad()`` / ``inference_mode`` inside ``forward``) is
cut with :data:`~gradgraph.capture.autograd_ops.STOP_GRADIENT`.

A recorded program is specialised to its input (the experts its router picked, the sizes its
``nonzero`` gave): it is never reused for another input.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode

from .autograd_ops import STOP_GRADIENT, routed_autograd_functions

__all__ = ["RecordedProgram", "record_program", "is_data_dependent_failure"]

_DETACH = (torch.Tensor.detach, torch.Tensor.detach_, torch.detach)
_CUT = "gradgraph_no_grad"      # node.meta key: computed with grad mode off, or a detach


class RecordedProgram:
    """The ATen graph of one recorded run, in the form :func:`.interpreter.record` consumes.

    Attributes
    ----------
    graph_module : torch.fx.GraphModule
        Placeholders are the tensor inputs, named like the export path's (``args_<i>`` for
        positional inputs, the keyword for keyword inputs); parameters and buffers are constants.
    user_inputs : list[str]
        The placeholder names.
    """

    def __init__(self, graph_module, user_inputs, args, kwargs):
        self.graph_module, self.user_inputs = graph_module, user_inputs
        self._input_ids = [id(t) for t in _tensor_leaves(args, kwargs)]

    def flat_inputs(self, args, kwargs):
        """The graph module's inputs for ``(args, kwargs)``; only the very inputs it was recorded
        on are accepted (a recorded program is specialised to its input)."""
        leaves = _tensor_leaves(args, kwargs)
        if [id(t) for t in leaves] != self._input_ids:
            raise ValueError("a recorded program runs only on the inputs it was recorded on")
        return leaves


def _tensor_leaves(args, kwargs):
    return [v for v in pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(v, torch.Tensor)]


class _MarkNoGrad(TorchFunctionMode):
    """Marks the fx nodes the tracer records for a torch function the model calls with grad mode
    off (inside ``torch.no_grad()`` / ``inference_mode``), or for a ``detach``, so the capture does
    not differentiate through them, as autograd does not.

    A torch-function mode sees the model's own calls with the model's own grad mode; a dispatch
    mode would not (an op whose autograd kernel is an ``autograd.Function``, such as a custom op
    with ``register_autograd``, runs its forward below autograd with grad mode off)."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled() and func not in _DETACH:
            return func(*args, **kwargs)
        before = len(self.graph.nodes)
        out = func(*args, **kwargs)
        new = len(self.graph.nodes) - before
        for node in reversed(self.graph.nodes):
            if new <= 0:
                break
            node.meta[_CUT] = True
            new -= 1
        return out


def _cut_no_grad(gm):
    """Insert :data:`STOP_GRADIENT` where a value computed without gradient (``_CUT``) is used by
    an op that has one, or is returned. Returns the number of cuts."""
    graph, cuts = gm.graph, 0
    for node in list(graph.nodes):
        if not node.meta.get(_CUT) or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        outside = [u for u in node.users if not u.meta.get(_CUT)]
        if not outside:
            continue
        with graph.inserting_after(node):
            cut = graph.call_function(STOP_GRADIENT, (node,))
        cut.meta = {k: v for k, v in node.meta.items() if k != _CUT}
        for u in outside:
            u.replace_input_with(node, cut)
        cuts += 1
    if cuts:
        gm.recompile()
    return cuts


def _placeholder_names(args, kwargs):
    """Names of the tensor leaves of ``(args, kwargs)``, as the export path names its placeholders:
    ``args_<i>`` and the keyword (with ``_<j>`` for the j-th tensor inside a container)."""
    names = []
    for prefix, value in [(f"args_{i}", a) for i, a in enumerate(args)] + list(kwargs.items()):
        leaves = [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
        if isinstance(value, torch.Tensor):
            names.append(prefix)
        else:
            names.extend(f"{prefix}_{j}" for j in range(len(leaves)))
    return names


def record_program(wrapper, args, kwargs, decompositions):
    """Record the ATen ops ``wrapper(*args, **kwargs)`` runs on these very inputs.

    Parameters
    ----------
    wrapper : torch.nn.Module
        The model followed by its ``output`` callable (``programs._Explained``).
    args, kwargs
        The inputs.
    decompositions : dict
        The decomposition table (the export path's, for the same ops and rules).

    Returns
    -------
    RecordedProgram
    """
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]

    def run(*tensors):
        full = list(leaves)
        for i, t in zip(tensor_at, tensors):
            full[i] = t
        a, k = pytree.tree_unflatten(full, spec)
        with _MarkNoGrad(get_proxy_mode().tracer.graph):
            return wrapper(*a, **k)

    functional = torch.func.functionalize(run, remove="mutations")
    functional._orig_mod = wrapper     # make_fx records nn_module_stack relative to this module
    with warnings.catch_warnings(), routed_autograd_functions(), torch.enable_grad():
        warnings.simplefilter("ignore", FutureWarning)
        gm = make_fx(functional, decomposition_table=decompositions, tracing_mode="real",
                     record_module_stack=True, record_stack_traces=True,
                     _error_on_data_dependent_ops=False)(*[leaves[i] for i in tensor_at])
    names = _placeholder_names(args, kwargs)
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], names):
        node._rename(name)
        node.target = node.name
    _cut_no_grad(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return RecordedProgram(gm, [n.name for n in gm.graph.nodes if n.op == "placeholder"], args, kwargs)


#: Exceptions (by class name, anywhere in the chain) that say an export failed because the model
#: branches on, or sizes a tensor by, the values of its input.
_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "DataDependentOutputException", "DynamicOutputShapeException",
                   "PendingUnbackedSymbolNotFound")


def is_data_dependent_failure(exc):
    """Whether ``torch.export`` failed (``exc``, with its causes) on data-dependent control flow
    or data-dependent sizes -- the failures recording one input resolves."""
    seen, e = [], exc
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        if type(e).__name__ in _DATA_DEPENDENT or "data-dependent" in str(e).lower()[:2000]:
            return True
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False
