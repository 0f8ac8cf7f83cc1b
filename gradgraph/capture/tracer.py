"""Capture: ``torch.export`` a model (with the scalar to explain), run the ATen graph once with an
fx Interpreter that records every value, keep the nodes on source-to-sink paths, and ask the rule
registry for their local Jacobians.

Trace once, capture many: a :class:`Capturer` keeps the exported program per input signature
(shapes, dtypes and non-tensor values of the inputs), so later inputs of the same signature skip
``torch.export``. :func:`capture` keeps one Capturer per (model, output, sources, granularity).
"""
from __future__ import annotations

import operator
import os
import re
import sys
import time
import traceback
import warnings
import weakref

import numpy as np
import torch
import torch.fx
from torch.utils import _pytree as pytree

from ..errors import CaptureError, CaptureWarning, GradGraphError, UnsupportedOpError
from ..graph import Edge, GradGraph, Node
from . import rules as _rules  # noqa: F401  (registers the library's rules)
from .autograd_ops import (AUTOGRAD_FUNCTION, STOP_GRADIENT, autograd_function_jacobians, cut_gradients,
                           function_name, routed_autograd_functions)
from .registry import RuleContext, dense_jacobian, get_rule

__all__ = ["capture", "Capturer", "GRANULARITIES"]

GRANULARITIES = ("function", "primitive")

aten = torch.ops.aten
#: Ops kept whole at ``granularity="function"`` (each has an exact structured rule).
FUNCTION_OPS = (aten._softmax.default, aten._log_softmax.default, aten.native_layer_norm.default,
                aten.gelu.default)
#: Core ATen ops decomposed at both granularities, into ops with exact structured rules: group and
#: instance norm (their per-group gains do not fit one row-block Jacobian), upsampling (index maps
#: and weighted sums) and vector norms.
DECOMPOSED_OPS = (aten.native_group_norm.default, aten._native_batch_norm_legit.no_stats,
                  aten._native_batch_norm_legit.default, aten.native_batch_norm.default,
                  aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default,
                  aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default,
                  aten.linalg_vector_norm.default)

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Explained(torch.nn.Module):
    """model followed by the user's ``output`` callable; traced together."""

    def __init__(self, model, output):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        return self.output(out) if self.output is not None else out


class _ExplainedPacked(_Explained):
    """:class:`_Explained` taking ``(args, kwargs)`` as two arguments: ``torch.export`` maps
    ``dynamic_shapes`` onto a forward with ``**kwargs`` inconsistently (torch 2.13), onto this one
    correctly. Placeholders are named ``args_<i>`` and ``kwargs_<name>``."""

    def forward(self, args, kwargs):
        return super().forward(*args, **kwargs)


def _dynamic_spec(dynamic):
    """Validate ``Capturer(dynamic=...)``: ``{input: dims}`` -> ``{input: tuple of ints}``."""
    if dynamic is None:
        return None
    if not isinstance(dynamic, dict):
        raise CaptureError("dynamic must be a dict {input name or position: dims}, e.g. "
                           "{'input_ids': [1], 'attention_mask': [1]} for a variable sequence length")
    out = {}
    for key, dims in dynamic.items():
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not isinstance(key, (str, int)) or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise CaptureError(f"dynamic[{key!r}] must list non-negative dimension indices, got {dims!r}")
        out[key] = dims
    return out


def _decomposition_table(granularity):
    from torch._decomp import get_decompositions
    table = torch.export.default_decompositions()
    table.update(get_decompositions(list(DECOMPOSED_OPS)))
    if granularity == "function":
        for op in FUNCTION_OPS:
            table.pop(op, None)
    else:
        table.update(get_decompositions(list(FUNCTION_OPS)))
    return table


def _signature(args, kwargs):
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sig = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            sig.append(("T", tuple(x.shape), str(x.dtype)))
        else:
            sig.append(("V", repr(x)))
    return (str(spec), tuple(sig))


def _frozen(v):
    """A hashable stand-in for a value an ``output`` callable reads, equal iff the value is.

    Tensors and arrays are keyed by content (a closure over token ids must not reuse the program
    traced for other ids: the traced program has the old ids baked in); containers recursively."""
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.numpy().tobytes() if t.dtype != torch.bfloat16
                else t.float().numpy().tobytes())
    if isinstance(v, np.ndarray):
        return ("ndarray", str(v.dtype), v.shape, np.ascontiguousarray(v).tobytes())
    if isinstance(v, (list, tuple)):
        return (type(v).__name__,) + tuple(_frozen(a) for a in v)
    if isinstance(v, dict):
        return ("dict",) + tuple((k, _frozen(a)) for k, a in v.items())
    if isinstance(v, (set, frozenset)):
        return ("set", frozenset(_frozen(a) for a in v))
    hash(v)   # TypeError for other unhashable values: the caller falls back to identity
    return v


def _callable_key(fn):
    """A hashable key for an ``output`` callable: its code plus every value it reads from outside
    (closure cells, defaults, and the module globals its code names -- a lambda written in a
    loop at module level reads the loop variable as a global). Callables without code are keyed
    by identity; the :class:`Capturer` keeps them alive, so the identity is never reused."""
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("id", id(fn))
    try:
        cells = tuple(_frozen(c.cell_contents) for c in (fn.__closure__ or ()))
        glob = getattr(fn, "__globals__", {})
        names = tuple((n, _frozen(glob[n])) for n in _global_names(code) if n in glob)
        key = ("code", code, cells, names, _frozen(fn.__defaults__), _frozen(fn.__kwdefaults__))
        hash(key)
        return key
    except (TypeError, ValueError):
        return ("id", id(fn))


def _global_names(code):
    """Names ``code`` (and code nested in it) may load as globals."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, type(code)):
            names |= _global_names(c)
    return sorted(names)


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s*(?P<code>[^\n]*)')


def _user_line(stack_trace):
    """The innermost frame of the stack trace outside torch itself: "file:line in fn: code"."""
    if not stack_trace:
        return ""
    frames = list(_FRAME.finditer(stack_trace))
    for m in reversed(frames):
        if not m.group("file").startswith((_TORCH_DIR, _OWN_DIR)):
            return f'{m.group("file")}:{m.group("line")} in {m.group("fn")}: {m.group("code").strip()}'
    return ""


def _module_of(fx_node):
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    if path == "":
        return "<output>", typ
    path = path[len("model."):] if path.startswith("model.") else ("" if path == "model" else path)
    return path, typ


def _tensor_args(node):
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


def _is_float_tensor(v):
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _np_value(t):
    return t.detach().cpu().numpy()


def _run_program(ep, args, kwargs, packed=False):
    """Run the exported program on these inputs, keeping every value: (env, the fx nodes or
    values of the user's outputs; buffer updates such as batch norm statistics are left out).
    ``packed``: the program was exported from ``_ExplainedPacked`` (one (args, kwargs) input)."""
    gm = ep.graph_module
    flat = ep._graph_module_flat_inputs(*(((tuple(args), kwargs), {}) if packed else (tuple(args), kwargs)))
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*flat, enable_io_processing=False)
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = outs if isinstance(outs, (list, tuple)) else (outs,)
    kinds = [spec.kind for spec in ep.graph_signature.output_specs]
    if len(kinds) == len(outs):
        outs = [o for o, kind in zip(outs, kinds) if kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    return interp.env, list(outs)


def _output_value(outs, env):
    """The program's one tensor output (None if it has another structure)."""
    return env[outs[0]] if len(outs) == 1 and isinstance(outs[0], torch.fx.Node) else None


def _same_value(a, b):
    """Whether two outputs are the same computation's: same dtype and shape, and equal up to
    256 units of roundoff of their dtype (reordered sums in decompositions differ by a few);
    NaN equals NaN."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype \
            or a.shape != b.shape:
        return False
    if not a.dtype.is_floating_point:
        return bool(torch.equal(a, b))
    tol = 256 * torch.finfo(a.dtype).eps
    return bool(torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))


def _export_failure(exc):
    """A failed ``torch.export``'s whole message, with each exception it was caused by, and the
    innermost line of the user's code where it happened (from the tracebacks, else from
    torch's message)."""
    chain, e = [], exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    where = ""
    for e in chain:       # the deepest cause with a user frame wins: it is nearest the fault
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if not f.filename.startswith((_TORCH_DIR, _OWN_DIR))]
        if frames:
            f = frames[-1]
            where = f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    where = where or _user_line(str(exc))
    return ("torch.export could not trace the model" + (f" at {where}" if where else "") + "\n"
            + "\nwhich was caused by\n".join(f"{type(e).__name__}: {str(e).strip()}" for e in chain))


def _warn(warning):
    """``warnings.warn`` attributed to the first caller outside gradgraph."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(warning, stacklevel=level)


def _uses_dense_jacobian(n):
    """Whether the Jacobian of fx node ``n`` is a dense matrix: the jacrev fallback of an op
    without a rule, or a ``torch.autograd.Function`` (from its backward)."""
    p = n.args[0] if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node) else n
    if p.op != "call_function" or not isinstance(p.target, torch._ops.OpOverload):
        return False
    return p.target is AUTOGRAD_FUNCTION or get_rule(p.target) is None


def _node_summary(node, **extra):
    return {"node": node.name, "op": node.op, "module": node.module, "source_line": node.source_line,
            **extra}


def _diagnostics(gnodes, edges, source_ids, dense_ids):
    """What a user should know about a captured graph, for ``GradGraph.meta``, and a
    :class:`CaptureWarning` for non-finite values.

    ``dense_jacobians``: the nodes whose Jacobian is a dense matrix. ``lower_precision``: the
    nodes computed in a floating type narrower than the sources' widest (a float32 softmax in a
    float64 model). ``first_non_finite``: the first node, in execution order, holding a NaN or
    whose incoming Jacobian holds a NaN or infinity, or the sink when it is infinite; paths
    through it have non-finite weights."""
    def float_size(node):
        dtype = getattr(torch, node.dtype, None)
        return dtype.itemsize if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    model_size = max((float_size(gnodes[i]) or 0) for i in source_ids)
    out = {"dense_jacobians": [_node_summary(gnodes[i]) for i in dense_ids],
           "lower_precision": [_node_summary(n, dtype=n.dtype) for n in gnodes
                               if (float_size(n) or model_size) < model_size]}
    bad_jacobian = set()
    for e in edges:
        if e.dst not in bad_jacobian and not all(
                np.isfinite(np.asarray(a)).all() for a in e.jac.state()[1].values()
                if np.asarray(a).dtype.kind == "f"):
            bad_jacobian.add(e.dst)
    for i, n in enumerate(gnodes):
        value = np.asarray(n.value)
        why = ("holds NaN" if value.dtype.kind == "f" and np.isnan(value).any() else
               "has a non-finite local derivative" if i in bad_jacobian else
               "is infinite" if n.role == "sink" and not np.isfinite(value).all() else "")
        if why:
            out["first_non_finite"] = _node_summary(n, problem=why)
            _warn(CaptureWarning(
                f"node {n.name} ({n.op}, module {n.module or '<top>'}"
                + (f", at {n.source_line}" if n.source_line else "") + f") {why}, the first "
                "non-finite value of the graph in execution order: paths through it may have "
                "non-finite weights, and the gradient of sources they reach is not finite"))
            break
    return out


class Capturer:
    """Captures gradient graphs of one model and ``output`` for many inputs, exporting once per
    input signature.

    Parameters
    ----------
    model : torch.nn.Module
        Captured as is (it is neither modified nor switched to eval mode; dropout in training
        mode makes a graph random, so call ``model.eval()`` first).
    output : callable, optional
        ``output(model_output) -> scalar tensor`` -- the quantity to explain (e.g. a logit
        difference). Traced together with the model. Default: the model output, if scalar.
    sources : list[str], optional
        Where paths end. Default: floating-point inputs, and the outputs of embedding lookups
        indexed by integer inputs (one source per lookup, e.g. ``bert.embeddings.word_embeddings``).
        Otherwise names of inputs, fx nodes or modules (a module's output).
    granularity : {"function", "primitive"}
        ``"function"`` keeps softmax, log-softmax, layer norm and GELU whole; ``"primitive"``
        decomposes them into core ATen ops (the paper's own convention).
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal and the graph is large).
    dynamic : dict, optional
        ``{input: dims}``: dimensions whose size varies between captures (``input`` a keyword
        name or a positional index), e.g. ``{"input_ids": [1], "attention_mask": [1]}`` for
        sentences of different lengths. The model is exported once with these dimensions
        symbolic (``torch.export.Dim.AUTO``) and the program serves every size in its range. Where
        the model fixes a size (or the symbolic export fails) it is exported once per size
        instead, and :attr:`notes` says why.
    """

    def __init__(self, model, output=None, *, sources=None, granularity="function", progress=None,
                 dynamic=None):
        if not isinstance(model, torch.nn.Module):
            raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if granularity not in GRANULARITIES:
            raise CaptureError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if output is not None and not callable(output):
            raise CaptureError("output must be a callable taking the model's output and returning a scalar tensor")
        if isinstance(sources, str):
            sources = [sources]
        self.model, self.output, self.granularity = model, output, granularity
        self.sources = None if sources is None else list(sources)
        self.progress = progress
        self._programs = {}
        self.n_exports = 0
        self.dynamic = _dynamic_spec(dynamic)
        self.notes = []              # why a dynamic export fell back to one export per size
        self._packed = set()         # ids of programs exported from _ExplainedPacked
        self._packed_now = False     # the program of the capture in progress is one of them

    # ------------------------------------------------------------------ export
    def _program(self, args, kwargs, refresh=False):
        """The exported program for this input signature; ``refresh``: export again even if one
        is cached (the cached one no longer computes what the model does)."""
        # train / eval mode is traced into the program (dropout, batch norm): part of the key
        mode = tuple(m.training for m in self.model.modules())
        if self.dynamic and not refresh:
            ep = self._dynamic_program(args, kwargs, mode)
            if ep is not None:
                return ep
        key = (_signature(args, kwargs), mode)
        ep = None if refresh else self._programs.get(key)
        if ep is None:
            ep = self._programs[key] = self._export(args, kwargs)
        return ep

    def _export(self, args, kwargs, dynamic_shapes=None):
        t0 = time.perf_counter()
        packed = dynamic_shapes is not None
        wrapper = (_ExplainedPacked if packed else _Explained)(self.model, self.output)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                with routed_autograd_functions():
                    if packed:
                        ep = torch.export.export(wrapper, (tuple(args), dict(kwargs)), strict=False,
                                                 dynamic_shapes=dynamic_shapes)
                    else:
                        ep = torch.export.export(wrapper, tuple(args), dict(kwargs), strict=False)
                cut_gradients(ep)
                ep = ep.run_decompositions(_decomposition_table(self.granularity))
        except GradGraphError:
            raise
        except Exception as exc:
            raise CaptureError(_export_failure(exc)) from exc
        if packed:
            self._packed.add(id(ep))
        self.n_exports += 1
        self.last_export_seconds = time.perf_counter() - t0
        return ep

    def _dynamic_program(self, args, kwargs, mode):
        """The program exported with ``self.dynamic``'s dimensions symbolic, if it serves these
        inputs (exported on first use); None where it cannot (then one program per size)."""
        dims = {}    # (placeholder name, dim) -> size
        for name, key, v in [(f"args_{i}", i, a) for i, a in enumerate(args)] + \
                            [(f"kwargs_{k}", k, v) for k, v in kwargs.items()]:
            for d in self.dynamic.get(key, ()) if isinstance(v, torch.Tensor) else ():
                if d < v.dim():
                    dims[(name, d)] = v.shape[d]
        if not dims:
            return None

        def general(key, v):   # the input with its dynamic sizes left out of the cache key
            if not isinstance(v, torch.Tensor) or key not in self.dynamic:
                return v
            shape = [0 if d in self.dynamic[key] else n for d, n in enumerate(v.shape)]
            return torch.empty(shape, dtype=v.dtype, device="meta")
        key = ("dynamic", _signature(tuple(general(i, a) for i, a in enumerate(args)),
                                     {k: general(k, v) for k, v in kwargs.items()}), mode)
        ep = self._programs.get(key)
        if ep is None:
            auto = torch.export.Dim.AUTO
            spec = (tuple({d: auto for (n, d) in dims if n == f"args_{i}"} or None for i in range(len(args))),
                    {k: {d: auto for (n, d) in dims if n == f"kwargs_{k}"} or None for k in kwargs})
            label = {n: (f"positional input {n[5:]}" if n.startswith("args_") else n[7:]) for n, _ in dims}
            what = ", ".join(f"{label[n]} dim {d}" for n, d in dims)
            try:
                ep = self._export(args, kwargs, dynamic_shapes=spec)
            except CaptureError as exc:
                self.notes.append(f"exporting with a variable size of {what} failed ({exc}); "
                                  f"exporting once per size instead")
                ep = False
            if ep is not False:
                fixed = [f"{label[n]} dim {d}" for (n, d) in dims
                         if self._size_symbol(ep, n, d) is None]
                if fixed:
                    self.notes.append(f"torch.export fixed the size of {', '.join(fixed)} (the model "
                                      f"depends on it); exporting once per size instead")
                    self._programs[(_signature(args, kwargs), mode)] = ep   # still right for this size
                    ep = False
            self._programs[key] = ep
        if ep is False:
            return None
        for (n, d), size in dims.items():
            r = ep.range_constraints.get(self._size_symbol(ep, n, d))
            if r is not None and not int(r.lower) <= size <= r.upper:
                return None   # outside the sizes the program is valid for: one program for this size
        return ep

    @staticmethod
    def _size_symbol(ep, placeholder, dim):
        """The symbol (sympy) of a placeholder's dimension; None where its size is fixed."""
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == placeholder)
        size = node.meta["val"].shape[dim]
        expr = size.node.expr if isinstance(size, torch.SymInt) else None
        return None if expr is None or expr.is_number else expr

    def _eager_output(self, args, kwargs):
        """``output(model(*args, **kwargs))`` run by PyTorch itself, leaving the model's buffers
        as they were (a training-mode batch norm would update its running statistics)."""
        training = any(m.training for m in self.model.modules())
        saved = [(b, b.detach().clone()) for b in self.model.buffers()] if training else []
        try:
            with torch.no_grad():
                out = _Explained(self.model, self.output)(*args, **kwargs)
        except Exception as exc:
            raise CaptureError(f"running the model eagerly failed: {type(exc).__name__}: {exc}") from exc
        finally:
            with torch.no_grad():
                for b, v in saved:
                    b.copy_(v)
        leaves = [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]
        return leaves[0] if len(leaves) == 1 else None

    # ------------------------------------------------------------------ capture
    def capture(self, args, kwargs=None):
        """Capture the gradient graph of the model at these inputs.

        Exports the model only for an input signature (tensor shapes and dtypes, other argument
        values, train / eval mode) not seen before, or when the cached program's output differs
        from the model's own (Python-side state changed); :attr:`n_exports` counts the exports.

        Parameters
        ----------
        args : tuple
            Positional inputs of ``model``.
        kwargs : dict, optional
            Keyword inputs of ``model``.

        Returns
        -------
        GradGraph

        Raises
        ------
        CaptureError
            The model cannot be exported, the output is not one floating-point scalar, or a
            source name is unknown.
        UnsupportedOpError
            An op has no rule and is too large for the dense fallback.

        Warns
        -----
        CaptureWarning
            A node holds a NaN or has a non-finite local derivative (the first one is named), or
            the model does not give the same output twice (see ``docs/capture.md``).

        Examples
        --------
        >>> import torch, gradgraph as gg
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
        >>> cap = gg.Capturer(model, lambda y: y[0, 1])
        >>> graphs = [cap.capture((torch.randn(1, 3),)) for _ in range(3)]
        >>> cap.n_exports
        1
        """
        if not isinstance(args, (tuple, list)):
            args = (args,)
        kwargs = dict(kwargs or {})
        n_exports = self.n_exports
        ep = self._program(args, kwargs)
        env, outs = _run_program(ep, args, kwargs, id(ep) in self._packed)
        # the program must compute what the model computes now: a Python attribute the forward
        # branches on is not in the cache key, so a changed one shows as a different output (an
        # output that is not one tensor is refused by _sink below)
        eager = self._eager_output(args, kwargs)
        if eager is not None and not _same_value(eager, _output_value(outs, env)) \
                and self.n_exports == n_exports:
            ep = self._program(args, kwargs, refresh=True)
            env, outs = _run_program(ep, args, kwargs, id(ep) in self._packed)
        if eager is not None and not _same_value(eager, _output_value(outs, env)):
            _warn(CaptureWarning(
                f"the captured program gives {_output_value(outs, env)} where the model gives "
                f"{eager} on the same input: the model is not deterministic (dropout in training "
                f"mode? call model.eval()), so the graph explains one run of it"))
        gm = ep.graph_module
        self._packed_now = id(ep) in self._packed
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        user_inputs = set(ep.graph_signature.user_inputs)
        return self._build(ep, nodes, env, placeholders, user_inputs, outs)

    def _sink(self, outs, env):
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

    def _default_sources(self, nodes, env, user_inputs):
        found = {}
        int_from_input = set()
        for n in nodes:
            if n.op == "placeholder" and n.name in user_inputs:
                v = env.get(n)
                if _is_float_tensor(v):
                    found[self._input_name(n.name)] = n
                elif isinstance(v, torch.Tensor):
                    int_from_input.add(n)
            elif n.op == "call_function":
                v = env.get(n)
                deps = [a for _, a in _tensor_args(n)]
                if n.target is aten.embedding.default and n.args[1] in int_from_input:
                    found[self._unique(found, _module_of(n)[0] or n.name)] = n
                elif isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and \
                        any(a in int_from_input for a in deps):
                    int_from_input.add(n)
        return found

    def _input_name(self, name):
        """``args_0`` -> the name of the model's first positional parameter (``x``, ``input``)."""
        if self._packed_now and name.startswith("kwargs_"):
            return name[len("kwargs_"):]     # a keyword input of a program with variable sizes
        m = re.fullmatch(r"args_(\d+)", name)
        if m:
            import inspect
            try:
                params = [p.name for p in inspect.signature(self.model.forward).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            except (TypeError, ValueError):
                params = []
            i = int(m.group(1))
            if i < len(params):
                return params[i]
        return name

    @staticmethod
    def _unique(found, name):
        if name not in found:
            return name
        k = 1
        while f"{name}#{k}" in found:
            k += 1
        return f"{name}#{k}"

    def _named_sources(self, names, nodes, env, user_inputs, defaults):
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
                    if outside and _is_float_tensor(env.get(n)):
                        modules[p] = n
        found = {}
        for name in names:
            if name in defaults:
                found[name] = defaults[name]
            elif name in modules:
                found[name] = modules[name]
            elif name in by_name and _is_float_tensor(env.get(by_name[name])):
                found[name] = by_name[name]
            else:
                valid = sorted(defaults) + sorted(modules)
                raise CaptureError(f"unknown source {name!r}; valid sources include input names, fx node "
                                   f"names and module paths: {', '.join(valid[:40])}"
                                   + (" ..." if len(valid) > 40 else ""))
        return found

    def _build(self, ep, nodes, env, placeholders, user_inputs, outs):
        sink = self._sink(outs, env)
        defaults = self._default_sources(nodes, env, user_inputs)
        sources = defaults if self.sources is None else self._named_sources(
            self.sources, nodes, env, user_inputs, defaults)
        if not sources:
            raise CaptureError("no sources: the model has no floating-point inputs and no embedding lookups "
                               "of integer inputs; name them with sources=[...]")
        source_of = {n: name for name, n in sources.items()}

        # forward liveness from the sources (through floating tensors only), sources and
        # detach / no_grad (STOP_GRADIENT) cut
        live = set(sources.values())
        for n in nodes:
            if n.op == "call_function" and n not in live and n.target is not STOP_GRADIENT:
                if any(a in live for _, a in _tensor_args(n)) and self._differentiable_value(env.get(n)):
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
                for _, a in _tensor_args(n):
                    if a in live:
                        keep.add(a)
        order = [n for n in nodes if n in keep and isinstance(env.get(n), torch.Tensor)]
        index = {n: i for i, n in enumerate(order)}

        gnodes = []
        for n in order:
            v = env[n]
            module, mtype = _module_of(n)
            if n in source_of:
                role, op = "source", ("input" if n.op == "placeholder" else self._op_name(n))
                name = source_of[n]
            else:
                role, op, name = ("sink" if n is sink else "op"), self._op_name(n), n.name
            gnodes.append(Node(name=name, op=op, shape=tuple(v.shape), dtype=str(v.dtype).replace("torch.", ""),
                               module=module, module_type=mtype,
                               source_line=_user_line(n.meta.get("stack_trace")),
                               value=_np_value(v), role=role, fx_name=n.name))

        edges = []
        todo = [n for n in order if n not in source_of]
        bar = self._bar(len(todo))
        for n in todo:
            producer, _ = self._producer(n)
            wants = {key: a for key, a in _tensor_args(producer) if a in index}
            for key, jac in self._jacobians(n, env, set(wants)).items():
                src = wants[key]
                if tuple(jac.out_shape) != tuple(env[n].shape) or tuple(jac.in_shape) != tuple(env[src].shape):
                    raise CaptureError(f"rule for {self._op_name(n)} returned a Jacobian of shape "
                                       f"{jac.out_shape}x{jac.in_shape} for output {tuple(env[n].shape)}")
                edges.append(Edge(index[src], index[n], jac, key if isinstance(key, int) else key[0]))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        meta = {
            "model": type(self.model).__module__ + "." + type(self.model).__qualname__,
            "torch": torch.__version__,
            "sink_value": float(env[sink].detach().reshape(-1)[0]),
            "inputs": [[list(v.shape), str(v.dtype)] for v in
                       (env[p] for p in placeholders if p.name in user_inputs) if isinstance(v, torch.Tensor)],
        }
        meta.update(_diagnostics(gnodes, edges, [index[n] for n in sources.values()],
                                 [i for i, n in enumerate(order) if _uses_dense_jacobian(n)]))
        sources_idx = {name: index[n] for name, n in sources.items()}
        return GradGraph(gnodes, edges, sources_idx, index[sink], self.granularity, meta)

    @staticmethod
    def _upstream(n):
        seen, stack = set(), [n]
        while stack:
            m = stack.pop()
            for _, a in _tensor_args(m):
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        return seen

    @staticmethod
    def _differentiable_value(v):
        return _is_float_tensor(v) or (isinstance(v, (tuple, list)) and any(_is_float_tensor(t) for t in v))

    @staticmethod
    def _producer(n):
        """For ``getitem(multi_output_op, i)``: (the op's fx node, i); else (n, None)."""
        if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
            return n.args[0], n.args[1]
        return n, None

    def _op_name(self, n):
        p, _ = self._producer(n)
        if p.op == "call_function" and p.target is AUTOGRAD_FUNCTION:
            return f"{function_name(p.args[1], qualified=False)}.apply"
        return str(p.target) if p.op == "call_function" else p.op

    def _jacobians(self, n, env, wants):
        p, idx = self._producer(n)
        op = p.target
        if not isinstance(op, torch._ops.OpOverload):
            raise UnsupportedOpError(self._where(n, f"cannot differentiate through {op!r} (not an ATen op)"))
        args = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node) else a, p.args)
        kwargs = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node) else a, dict(p.kwargs))
        ctx = RuleContext(op, tuple(args), kwargs, env[n], idx, set(wants))
        # a Function's Jacobian comes from its own backward, not from the ops of its forward
        rule = autograd_function_jacobians if op is AUTOGRAD_FUNCTION else get_rule(op)
        try:
            with torch.no_grad():
                jacs = rule(ctx) if rule is not None else {k: dense_jacobian(ctx, k) for k in wants}
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
        p, _ = self._producer(n)
        module, _ = _module_of(p)
        line = _user_line(p.meta.get("stack_trace"))
        msg = " ".join(str(msg).split())
        return f"{msg} [op {self._op_name(n)}, node {n.name}, module {module or '<top>'}" + \
               (f", at {line}]" if line else "]")


_CAPTURERS = weakref.WeakKeyDictionary()


def capture(model, args, kwargs=None, *, output=None, sources=None, granularity="function", progress=None):
    """Capture the gradient graph of ``output(model(*args, **kwargs))``.

    Parameters are those of :class:`Capturer`. Repeated calls with the same model, ``output``
    (same code and captured values), ``sources`` and ``granularity`` reuse the traced program for
    inputs of an already seen signature, so only the first capture pays ``torch.export``.

    Returns
    -------
    GradGraph

    Examples
    --------
    >>> import torch, gradgraph as gg
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> g = gg.capture(model, (torch.randn(1, 3),), output=lambda y: y[0, 0])
    >>> g.gradient()["input"].shape   # named by the forward parameter of Sequential
    torch.Size([1, 3])
    """
    key = (_callable_key(output), None if sources is None else tuple([sources] if isinstance(sources, str) else sources),
           granularity)
    per_model = _CAPTURERS.setdefault(model, {}) if isinstance(model, torch.nn.Module) else {}
    cap = per_model.get(key)
    if cap is None:
        cap = Capturer(model, output, sources=sources, granularity=granularity, progress=progress)
        per_model[key] = cap
    cap.output = output   # same code and values; keep the newest object
    cap.progress = progress
    return cap.capture(args, kwargs)
