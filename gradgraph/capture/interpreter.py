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
    """

    nodes: list
    env: dict
    placeholders: list
    user_inputs: set
    out_node: object


def record(ep, args, kwargs):
    """Run ``ep`` (an ``ExportedProgram``) on these inputs with a ``torch.fx.Interpreter`` that keeps
    every value, without autograd."""
    gm = ep.graph_module
    flat = ep._graph_module_flat_inputs(tuple(args), kwargs)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*flat, enable_io_processing=False)
    nodes = list(gm.graph.nodes)
    return Recording(nodes, interp.env, [n for n in nodes if n.op == "placeholder"],
                     set(ep.graph_signature.user_inputs), next(n for n in nodes if n.op == "output"))
