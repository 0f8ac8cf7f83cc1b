"""Small readers of ``torch.fx`` nodes shared by the parts of capture."""
from __future__ import annotations

import operator
import os
import re

import torch
import torch.fx

from .autograd_ops import AUTOGRAD_FUNCTION, function_name

__all__ = ["module_of", "tensor_args", "is_float_tensor", "user_line", "producer", "op_name"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # gradgraph/
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s*(?P<code>[^\n]*)')


def user_line(stack_trace):
    """The innermost frame of the stack trace outside torch itself: "file:line in fn: code"."""
    if not stack_trace:
        return ""
    frames = list(_FRAME.finditer(stack_trace))
    for m in reversed(frames):
        if not m.group("file").startswith((_TORCH_DIR, _OWN_DIR)):
            return f'{m.group("file")}:{m.group("line")} in {m.group("fn")}: {m.group("code").strip()}'
    return ""


def module_of(fx_node):
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    if path == "":
        return "<output>", typ
    path = path[len("model."):] if path.startswith("model.") else ("" if path == "model" else path)
    return path, typ


def tensor_args(node):
    """(key, fx.Node) for each fx-node argument: key i, or (i, k) inside a list argument."""
    out = []
    for i, a in enumerate(node.args):
        if isinstance(a, torch.fx.Node):
            out.append((i, a))
        elif isinstance(a, (list, tuple)):
            for k, b in enumerate(a):
                if isinstance(b, torch.fx.Node):
                    out.append(((i, k), b))
    return out


def is_float_tensor(v):
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def producer(n):
    """For ``getitem(multi_output_op, i)``: (the op's fx node, i); else (n, None)."""
    if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
        return n.args[0], n.args[1]
    return n, None


def op_name(n):
    """The ATen op computing fx node ``n`` (through ``getitem``), as a string."""
    p, _ = producer(n)
    if p.op == "call_function" and p.target is AUTOGRAD_FUNCTION:
        return f"{function_name(p.args[1], qualified=False)}.apply"
    return str(p.target) if p.op == "call_function" else p.op
