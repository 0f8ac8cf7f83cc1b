"""The graph builder: from a recorded forward pass, its sink and its sources to a
:class:`~gradgraph.graph.GradGraph` -- liveness (the values on source-to-sink paths), one node per
live tensor, and one edge per (op, differentiable argument) with the Jacobian its rule gives.
"""
from __future__ import annotations

import sys

import torch
import torch.fx
from torch.utils import _pytree as pytree

from ..errors import CaptureError, GradGraphError, UnsupportedOpError
from ..graph import Edge, GradGraph, Node
from . import rules as _rules  # noqa: F401  (registers the library's rules)
from .autograd_ops import AUTOGRAD_FUNCTION, STOP_GRADIENT, autograd_function_jacobians
from .diagnostics import diagnostics
from .fxnodes import is_float_tensor, module_of, op_name, producer, tensor_args, user_line
from .registry import RuleContext, dense_jacobian, get_rule

__all__ = ["GraphBuilder"]

#: Floating types narrower than float32: held (node values) and differentiated (rule inputs) in
#: float32.
HALF_TYPES = (torch.float16, torch.bfloat16)


def _widened(v):
    """``v`` with half-precision tensors (and dtype arguments) widened to float32."""
    if isinstance(v, torch.Tensor) and v.dtype in HALF_TYPES:
        return v.float()
    if isinstance(v, torch.dtype) and v in HALF_TYPES:
        return torch.float32
    return v


class GraphBuilder:
    """Builds a :class:`~gradgraph.graph.GradGraph` from a :class:`.interpreter.Recording`.

    Parameters
    ----------
    granularity : str
        Recorded in the graph.
    model_name : str
        The model's class path, recorded in ``meta``.
    progress : bool or None
        Show a progress bar (None: when stderr is a terminal and the graph is large).
    """

    def __init__(self, granularity, model_name, progress=None):
        self.granularity, self.model_name, self.progress = granularity, model_name, progress

    def build(self, rec, sink, sources):
        """The graph of ``rec`` (a Recording) explaining fx node ``sink``, with paths ending at
        ``sources`` ({name: fx node})."""
        nodes, env = rec.nodes, rec.env
        source_of = {n: name for name, n in sources.items()}

        # forward liveness from the sources (through floating tensors only), sources and
        # detach / no_grad (STOP_GRADIENT) cut
        live = set(sources.values())
        for n in nodes:
            if n.op == "call_function" and n not in live and n.target is not STOP_GRADIENT:
                if any(a in live for _, a in tensor_args(n)) and self._differentiable_value(env.get(n)):
                    live.add(n)
        for name, n in sources.items():
            ups = self._upstream(n)
            for other, m in sources.items():
                if m is not n and m in ups:
                    raise CaptureError(f"source {other!r} lies upstream of source {name!r}; sources must "
                                       f"not depend on each other")
        if sink not in live:
            raise CaptureError("the explained output does not depend on the sources "
                               f"({', '.join(sources)})")
        # backward: keep what reaches the sink
        keep = {sink}
        for n in reversed(nodes):
            if n in keep and n not in source_of:
                for _, a in tensor_args(n):
                    if a in live:
                        keep.add(a)
        order = [n for n in nodes if n in keep and isinstance(env.get(n), torch.Tensor)]
        index = {n: i for i, n in enumerate(order)}

        gnodes = []
        for n in order:
            v = env[n]
            module, mtype = module_of(n)
            if n in source_of:
                role, op = "source", ("input" if n.op == "placeholder" else op_name(n))
                name = source_of[n]
            else:
                role, op, name = ("sink" if n is sink else "op"), op_name(n), n.name
            gnodes.append(Node(name=name, op=op, shape=tuple(v.shape), dtype=str(v.dtype).replace("torch.", ""),
                               module=module, module_type=mtype,
                               source_line=user_line(n.meta.get("stack_trace")),
                               value=_widened(v.detach()).cpu().numpy(), role=role, fx_name=n.name))

        edges = []
        self._dense = set()       # nodes whose Jacobian came out a dense matrix
        todo = [n for n in order if n not in source_of]
        bar = self._bar(len(todo))
        for n in todo:
            op_node, _ = producer(n)
            wants = {key: a for key, a in tensor_args(op_node) if a in index}
            for key, jac in self._jacobians(n, env, set(wants)).items():
                src = wants[key]
                if tuple(jac.out_shape) != tuple(env[n].shape) or tuple(jac.in_shape) != tuple(env[src].shape):
                    raise CaptureError(f"rule for {op_name(n)} returned a Jacobian of shape "
                                       f"{jac.out_shape}x{jac.in_shape} for output {tuple(env[n].shape)}")
                edges.append(Edge(index[src], index[n], jac, key if isinstance(key, int) else key[0]))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        meta = {
            "model": self.model_name,
            "torch": torch.__version__,
            "sink_value": float(env[sink].detach().reshape(-1)[0]),
            "inputs": [[list(v.shape), str(v.dtype)] for v in
                       (env[p] for p in rec.placeholders if p.name in rec.user_inputs) if isinstance(v, torch.Tensor)],
        }
        source_ids = [index[n] for n in sources.values()]
        # a source's own op (an embedding lookup) is not differentiated: only its consumers are
        computed = {e.dst for e in edges}
        meta.update(diagnostics(gnodes, edges, source_ids,
                                [i for i, n in enumerate(order) if i in computed and n in self._dense]))
        sources_idx = {name: index[n] for name, n in sources.items()}
        return GradGraph(gnodes, edges, sources_idx, index[sink], self.granularity, meta)

    @staticmethod
    def _upstream(n):
        seen, stack = set(), [n]
        while stack:
            m = stack.pop()
            for _, a in tensor_args(m):
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        return seen

    @staticmethod
    def _differentiable_value(v):
        return is_float_tensor(v) or (isinstance(v, (tuple, list)) and any(is_float_tensor(t) for t in v))

    def _jacobians(self, n, env, wants):
        p, idx = producer(n)
        op = p.target
        if not isinstance(op, torch._ops.OpOverload):
            raise UnsupportedOpError(self._where(n, f"cannot differentiate through {op!r} (not an ATen op)"))
        # a half-precision model's values enter the rules in float32: local derivatives are
        # evaluated at the values the model computed, in float32 (numpy has no bfloat16)
        args = pytree.tree_map(lambda a: _widened(env[a] if isinstance(a, torch.fx.Node) else a), p.args)
        kwargs = pytree.tree_map(lambda a: _widened(env[a] if isinstance(a, torch.fx.Node) else a), dict(p.kwargs))
        ctx = RuleContext(op, tuple(args), kwargs, _widened(env[n]), idx, set(wants))
        # a Function's Jacobian comes from its own backward, not from the ops of its forward
        rule = autograd_function_jacobians if op is AUTOGRAD_FUNCTION else get_rule(op)
        try:
            with torch.no_grad():
                jacs = rule(ctx) if rule is not None else {k: dense_jacobian(ctx, k) for k in wants}
            if rule is None or getattr(ctx, "dense_keys", None):
                self._dense.add(n)
        except GradGraphError as exc:
            raise type(exc)(self._where(n, str(exc))) from None
        except Exception as exc:
            raise CaptureError(self._where(n, f"rule failed: {type(exc).__name__}: {exc}")) from exc
        return {k: j for k, j in jacs.items() if k in wants}

    def _bar(self, total):
        show = self.progress if self.progress is not None else (sys.stderr.isatty() and total > 500)
        if not show:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, desc="gradgraph capture", unit="op", leave=False)

    def _where(self, n, msg):
        """``msg`` on one line, followed by the op, fx node, module path and user source line."""
        p, _ = producer(n)
        module, _ = module_of(p)
        line = user_line(p.meta.get("stack_trace"))
        msg = " ".join(str(msg).split())
        return f"{msg} [op {op_name(n)}, node {n.name}, module {module or '<top>'}" + \
               (f", at {line}]" if line else "]")
