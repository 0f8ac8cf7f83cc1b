"""The graph builder: from a recorded forward pass, its sink and its sources to a
:class:`~gradgraph.graph.GradGraph` -- liveness (the values on source-to-sink paths), one node per
live tensor, and one edge per (op, differentiable argument) with the Jacobian its rule gives.
"""
from __future__ import annotations

import bisect
import sys

import numpy as np
import torch
import torch.fx
from torch.utils import _pytree as pytree

from ..errors import CaptureError, GradGraphError, UnsupportedOpError
from ..graph import Edge, GradGraph, Node
from . import rules as _rules  # noqa: F401  (registers the library's rules)
from .autograd_ops import AUTOGRAD_FUNCTION, STOP_GRADIENT, autograd_function_jacobians
from .diagnostics import diagnostics
from .fxnodes import is_float_tensor, module_of, op_name, producer, tensor_args, user_line
from .registry import RuleContext, dense_jacobian, get_rule, is_data_movement

__all__ = ["GraphBuilder", "VALUES"]

#: What node values a captured graph holds: ``"needed"`` (those a Jacobian references, the
#: sources' and the sink's) or ``"all"``.
VALUES = ("needed", "all")

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
    values : {"needed", "all"}
        ``"needed"``: a node holds its value only when a Jacobian references its memory or it is
        a source or the sink; every other value is freed as soon as the last Jacobian that
        could read it is built. ``"all"``: every node holds its value.
    """

    def __init__(self, granularity, model_name, progress=None, values="needed"):
        if values not in VALUES:
            raise CaptureError(f"values must be one of {VALUES}, got {values!r}")
        self.granularity, self.model_name, self.progress = granularity, model_name, progress
        self.values = values

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
        self._release(rec, order)

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
                               value=_widened(v.detach()).cpu().numpy(), role=role, fx_name=n.name,
                               data_movement=self._data_movement(n)))

        # what the diagnostics and meta read from values, before any value is freed
        nan_ids = {i for i, gn in enumerate(gnodes) if gn.value.dtype.kind == "f" and np.isnan(gn.value).any()}
        meta = {
            "model": self.model_name,
            "torch": torch.__version__,
            "sink_value": float(env[sink].detach().reshape(-1)[0]),
            "inputs": [[list(v.shape), str(v.dtype)] for v in
                       (env[p] for p in rec.placeholders if p.name in rec.user_inputs) if isinstance(v, torch.Tensor)],
            "values": self.values,
        }

        edges = []
        self._dense = set()       # nodes whose Jacobian came out a dense matrix
        todo = [n for n in order if n not in source_of]
        release = _Release(order, todo, env, gnodes, keep={index[n] for n in sources.values()} | {index[sink]},
                           drop_values=self.values == "needed") if todo else None
        bar = self._bar(len(todo))
        for step, n in enumerate(todo):
            op_node, _ = producer(n)
            wants = {key: a for key, a in tensor_args(op_node) if a in index}
            for key, jac in self._jacobians(n, env, set(wants)).items():
                src = wants[key]
                if tuple(jac.out_shape) != tuple(env[n].shape) or tuple(jac.in_shape) != tuple(env[src].shape):
                    raise CaptureError(f"rule for {op_name(n)} returned a Jacobian of shape "
                                       f"{jac.out_shape}x{jac.in_shape} for output {tuple(env[n].shape)}")
                edges.append(Edge(index[src], index[n], jac, key if isinstance(key, int) else key[0]))
                release.referenced(jac)
            release.after(step)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        source_ids = [index[n] for n in sources.values()]
        # a source's own op (an embedding lookup) is not differentiated: only its consumers are
        computed = {e.dst for e in edges}
        meta.update(diagnostics(gnodes, edges, source_ids,
                                [i for i, n in enumerate(order) if i in computed and n in self._dense],
                                nan_ids=nan_ids))
        sources_idx = {name: index[n] for name, n in sources.items()}
        return GradGraph(gnodes, edges, sources_idx, index[sink], self.granularity, meta)

    @staticmethod
    def _release(rec, order):
        """Drop from the recording every value no node or rule of the graph needs (activations
        off the source-to-sink paths, such as the logits of other tokens' positions when only
        one is explained), so they are freed before the Jacobians are built."""
        needed = set(order) | set(rec.placeholders)
        for n in order:
            p, _ = producer(n)
            needed.add(p)
            needed.update(p.all_input_nodes)
        for n in [n for n in rec.env if n not in needed]:
            del rec.env[n]

    @staticmethod
    def _data_movement(n):
        """The data movement flag of the rule that explains fx node ``n`` (False for inputs,
        Functions and ops left to the dense fallback)."""
        p, _ = producer(n)
        op = p.target if p.op == "call_function" else None
        return isinstance(op, torch._ops.OpOverload) and is_data_movement(op)

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


def _extent(a):
    """(first, last + 1) address of numpy array ``a``'s memory, or None when it has none."""
    if a.nbytes == 0:
        return None
    lo = a.__array_interface__["data"][0] + sum(min(0, (n - 1) * st) for n, st in zip(a.shape, a.strides))
    return lo, lo + sum((n - 1) * abs(st) for n, st in zip(a.shape, a.strides)) + a.itemsize


def held_arrays(jac):
    """The numpy arrays a Jacobian object holds (its attributes), whatever its kind."""
    out = []
    for v in vars(jac).values():
        for a in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(a, torch.Tensor) and a.device.type == "cpu":
                a = a.detach().numpy()
            if isinstance(a, np.ndarray):
                out.append(a)
    return out


class _Release:
    """Frees the recorded values of a graph being built as soon as no Jacobian still to be built
    can read them, and decides which node values the graph keeps.

    The rule of the op computing ``n`` reads the recorded values of ``n`` and of its op's inputs,
    so a recorded value is last read at the last such op in build order. A node's value is
    referenced when some Jacobian holds part of its memory (``mul``'s other factor, a softmax's
    output, a matrix product's operands): keeping it costs nothing. Values share memory across
    nodes (a view is its base's memory), so a node's value is judged once every node sharing its
    storage is past its last read: only then can no later Jacobian reference that memory.
    """

    def __init__(self, order, todo, env, gnodes, keep, drop_values):
        self.env, self.gnodes, self.keep, self.drop_values = env, gnodes, keep, drop_values
        position = {n: i for i, n in enumerate(order)}
        last = {}                      # fx node -> last build step that reads its recorded value
        for step, n in enumerate(todo):
            p, _ = producer(n)
            for a in [n, *p.all_input_nodes]:
                last[a] = step
        # the recorded values freed after each step (never the graph's inputs: those are the
        # model's parameters and the user's tensors)
        self.free_at = [[] for _ in todo]
        for a, step in last.items():
            if a.op != "placeholder":
                self.free_at[step].append(a)
        # node values judged after each step: by storage, once every node sharing it is past
        # its last read
        storage = {}
        for n in order:
            st = env[n].untyped_storage()
            storage.setdefault((st.data_ptr(), st.nbytes()) if st.nbytes() else id(n), []).append(position[n])
        self.judge_at = [[] for _ in todo]
        for ids in storage.values():
            self.judge_at[max(last.get(order[i], len(todo) - 1) for i in ids)].append(ids)
        # the storages' memory, sorted (distinct allocations never overlap), and the node values
        # inside each (a half-precision node's value is a float32 copy outside every storage,
        # which no Jacobian references)
        spans = sorted(((key[0], key[0] + key[1]), ids) for key, ids in storage.items()
                       if isinstance(key, tuple))
        self._starts = [lo for (lo, _), _ in spans]
        self._spans = spans
        self._referenced = set()       # node indices whose value a Jacobian holds memory of

    def referenced(self, jac):
        """Record which node values the Jacobian ``jac`` holds memory of."""
        for a in held_arrays(jac):
            ext = _extent(a)
            if ext is None:
                continue
            lo, hi = ext
            k = max(0, bisect.bisect_right(self._starts, lo) - 1)
            while k < len(self._spans) and self._spans[k][0][0] < hi:
                (s_lo, s_hi), ids = self._spans[k]
                if s_hi > lo:
                    for i in ids:
                        e = _extent(self.gnodes[i].value) if self.gnodes[i].value is not None else None
                        if e is not None and e[0] < hi and lo < e[1]:
                            self._referenced.add(i)
                k += 1

    def after(self, step):
        """Free what the Jacobians built up to ``step`` were the last to read."""
        if self.drop_values:
            for ids in self.judge_at[step]:
                for i in ids:
                    if i not in self.keep and i not in self._referenced:
                        self.gnodes[i].value = None
        for a in self.free_at[step]:
            self.env.pop(a, None)
