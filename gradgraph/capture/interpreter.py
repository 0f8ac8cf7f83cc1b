"""Running an exported program once and recording every value (the forward pass)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

__all__ = ["Recording", "record"]


@dataclass
class Recording:
    """The values of one run of an exported program.

    Attributes
    ----------
    nodes : list[torch.fx.Node]
        The graph's nodes in execution order.
    env : dict
        fx node -> its value.
    placeholders : list[torch.fx.Node]
    user_inputs : set[str]
        Names of the placeholders that are the user's inputs (not parameters or buffers).
    out_node : torch.fx.Node
    outs : list
        The fx nodes or values of the user's outputs (buffer updates such as batch norm
        statistics are left out).
    packed : bool
        The program was exported with one ``(args, kwargs)`` input (variable sizes): its keyword
        placeholders are named ``kwargs_<name>``.
    """

    nodes: list
    env: dict
    placeholders: list
    user_inputs: set
    out_node: object
    outs: list = None
    packed: bool = False

    def output_value(self):
        """The program's one tensor output (None if it has another structure)."""
        outs = self.outs
        return self.env[outs[0]] if len(outs) == 1 and isinstance(outs[0], torch.fx.Node) else None


class _RecordingInterpreter(torch.fx.Interpreter):
    """Keeps every value; a ``clone`` of a tensor already in the layout it asks for is recorded
    as that tensor itself rather than a copy (dropout in eval mode and ``contiguous()`` export as
    clones). The program is functional -- no op writes into its inputs -- so the copy is never
    needed, and the graph holds one array where it would hold two equal ones (for an attention
    layer's dropped-out probabilities, heads x tokens^2 values)."""

    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=False)

    def call_function(self, target, args, kwargs):
        if target is torch.ops.aten.clone.default and isinstance(args[0], torch.Tensor):
            x, fmt = args[0], kwargs.get("memory_format", torch.preserve_format)
            if x.is_contiguous(memory_format=torch.contiguous_format if fmt is torch.preserve_format else fmt):
                return x.detach()         # a new tensor object sharing x's memory
        return super().call_function(target, args, kwargs)


def record(ep, args, kwargs, packed=False):
    """Run ``ep`` (an ``ExportedProgram``, or a :class:`.recorder.RecordedProgram`) on these inputs
    with a ``torch.fx.Interpreter`` that keeps every value, without autograd. ``packed``: the
    program was exported from ``programs._ExplainedPacked`` (one (args, kwargs) input)."""
    from .recorder import RecordedProgram
    gm = ep.graph_module
    if isinstance(ep, RecordedProgram):
        flat, user_inputs = ep.flat_inputs(args, kwargs), set(ep.user_inputs)
    else:
        flat = ep._graph_module_flat_inputs(*(((tuple(args), kwargs), {}) if packed else (tuple(args), kwargs)))
        user_inputs = set(ep.graph_signature.user_inputs)
    interp = _RecordingInterpreter(gm)
    with torch.no_grad():
        interp.run(*flat, enable_io_processing=False)
    nodes = list(gm.graph.nodes)
    out_node = next(n for n in nodes if n.op == "output")
    outs = out_node.args[0]
    outs = outs if isinstance(outs, (list, tuple)) else (outs,)
    if not isinstance(ep, RecordedProgram):
        kinds = [spec.kind for spec in ep.graph_signature.output_specs]
        if len(kinds) == len(outs):
            outs = [o for o, kind in zip(outs, kinds)
                    if kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    return Recording(nodes, interp.env, [n for n in nodes if n.op == "placeholder"],
                     user_inputs, out_node, list(outs), packed)
