"""Source and sink resolution: which recorded values are the explained scalar and where paths end."""
from __future__ import annotations

import inspect
import re

import torch
import torch.fx

from ..errors import CaptureError
from .fxnodes import is_float_tensor, module_of, tensor_args

__all__ = ["find_sink", "resolve_sources"]

aten = torch.ops.aten


def resolve_sources(model, requested, rec):
    """{source name: fx node} for a :class:`.interpreter.Recording`: the defaults (floating-point
    inputs, embedding lookups of integer inputs) or the ``requested`` names."""
    defaults = _default_sources(model, rec.nodes, rec.env, rec.user_inputs, rec.packed)
    sources = defaults if requested is None else _named_sources(requested, rec.nodes, rec.env, defaults)
    if not sources:
        raise CaptureError("no sources: the model has no floating-point inputs and no embedding lookups "
                           "of integer inputs; name them with sources=[...]")
    return sources


def find_sink(outs, env):
    """The fx node of the explained scalar (checked: one floating-point scalar) among the
    program's user outputs ``outs`` (:attr:`.interpreter.Recording.outs`)."""
    tensors = [o for o in outs if isinstance(o, torch.fx.Node)]
    if len(outs) != 1 or len(tensors) != 1:
        raise CaptureError(
            f"the explained output must be one scalar tensor but the model (with output=) returns "
            f"{len(outs)} values; pass output=lambda out: <scalar>, e.g. lambda out: out.logits[0, -1, 42]")
    sink = tensors[0]
    v = env[sink]
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise CaptureError(f"the explained output must be a scalar, got shape {shape}; pass "
                           f"output=lambda out: <scalar>, e.g. out[0, 3] or a logit difference")
    if not v.dtype.is_floating_point:
        raise CaptureError(f"the explained output must be floating point, got {v.dtype}")
    return sink


def _default_sources(model, nodes, env, user_inputs, packed=False):
    found = {}
    int_from_input = set()
    for n in nodes:
        if n.op == "placeholder" and n.name in user_inputs:
            v = env.get(n)
            if is_float_tensor(v):
                found[_input_name(model, n.name, packed)] = n
            elif isinstance(v, torch.Tensor):
                int_from_input.add(n)
        elif n.op == "call_function":
            v = env.get(n)
            deps = [a for _, a in tensor_args(n)]
            if n.target is aten.embedding.default and n.args[1] in int_from_input:
                found[_unique(found, module_of(n)[0] or n.name)] = n
            elif isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and \
                    any(a in int_from_input for a in deps):
                int_from_input.add(n)
    return found


def _input_name(model, name, packed=False):
    """``args_0`` -> the name of the model's first positional parameter (``x``, ``input``)."""
    if packed and name.startswith("kwargs_"):
        return name[len("kwargs_"):]     # a keyword input of a program with variable sizes
    m = re.fullmatch(r"args_(\d+)", name)
    if m:
        try:
            params = [p.name for p in inspect.signature(model.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        i = int(m.group(1))
        if i < len(params):
            return params[i]
    return name


def _unique(found, name):
    if name not in found:
        return name
    k = 1
    while f"{name}#{k}" in found:
        k += 1
    return f"{name}#{k}"


def _named_sources(names, nodes, env, defaults):
    by_name = {n.name: n for n in nodes if n.op != "output"}
    modules = {}
    for n in nodes:
        if n.op != "call_function":
            continue
        stack = n.meta.get("nn_module_stack") or {}
        for path, _ in stack.values():
            p = path[len("model."):] if path.startswith("model.") else path
            if p and p != "model":
                # a module's output: the last node inside it used outside it
                outside = [u for u in n.users if u.op == "output" or not any(
                    (q[0][len("model."):] if q[0].startswith("model.") else q[0]) == p
                    for q in (u.meta.get("nn_module_stack") or {}).values())]
                if outside and is_float_tensor(env.get(n)):
                    modules[p] = n
    found = {}
    for name in names:
        if name in defaults:
            found[name] = defaults[name]
        elif name in modules:
            found[name] = modules[name]
        elif name in by_name and is_float_tensor(env.get(by_name[name])):
            found[name] = by_name[name]
        else:
            valid = sorted(defaults) + sorted(modules)
            raise CaptureError(f"unknown source {name!r}; valid sources include input names, fx node "
                               f"names and module paths: {', '.join(valid[:40])}"
                               + (" ..." if len(valid) > 40 else ""))
    return found
