"""Brute-force scalar gradient graph, built independently of gradgraph's rules, Jacobians and DP.

The model (with its ``output`` callable) is exported with ``torch.export`` and decomposed with the
same decomposition table as capture (that is torch's decomposition, the definition of the ops, not
gradgraph's mathematics). The ATen fx graph is run once to record every value; then, for every op
node, the *dense* local Jacobian with respect to each floating tensor argument is computed with
``torch.func.jacrev`` (for a multi-output op reached through ``getitem``: the selected output). Every
non-zero entry becomes one edge of a ``networkx.MultiDiGraph`` whose nodes are scalars
``(fx_node_name, flat_index)``.

Conventions (the same as gradgraph's; see ``docs/semirings.md``)
------------------------------------------------------------------
- Edges point forward, parent -> child, with attribute ``w`` = d(child) / d(parent). An op that
  uses one tensor twice (``mul(x, x)``) gives two parallel edges, one per argument.
- Node attributes: ``op`` (the ATen op; for ``getitem`` the multi-output op it selects from),
  ``is_view`` (short op name in :data:`gradgraph.graph.VIEW_OPS`), ``module`` (innermost module).
- Sources are leaves: no edges enter a source, so paths stop there. Only paths that run from the
  sink to a source element are enumerated (nodes that cannot reach a source are pruned).
- Path **length** = the number of hops whose upper (consumer, closer to the sink) node is not a
  view; i.e. along ``nodes = [sink, n1, ..., source]`` it counts ``i < len-1`` with
  ``nodes[i]`` not a view. Read forwards: the number of non-view ops applied along the path. This is
  the LENGTH semiring's convention (``dp.backward`` passes the consumer node's ``is_view``).

Everything is computed by enumerating paths, in float64, with log-space variants so that path
weights far below float64's range (1e-400) are still handled.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
import torch.fx
from torch.utils import _pytree as pytree

from gradgraph.capture.tracer import _decomposition_table, _Explained, _module_of
from gradgraph.graph import VIEW_OPS

__all__ = ["ScalarOracle", "OraclePath", "logsumexp", "captured_case", "autograd_gradient",
           "tiny_mlp", "tiny_residual_ln", "tiny_attention", "tiny_writes", "CASES", "case_strategy", "get_case"]


def logsumexp(a):
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return -math.inf
    m = float(a.max())
    if m == -math.inf:
        return -math.inf
    return m + math.log(float(np.exp(a - m).sum()))


@dataclass
class OraclePath:
    """One sink -> source path. ``weight`` = product of ``edge_weights`` (may underflow to 0);
    ``log_abs`` and ``sign`` are exact."""

    nodes: list             # [(fx_name, flat_idx), ...] from the sink to the source
    edge_weights: list      # edge_weights[i] = d nodes[i] / d nodes[i+1]
    weight: float
    log_abs: float
    sign: int
    length: int

    @property
    def source(self):
        return self.nodes[-1]


#: ATen ops without an autograd formula, and a differentiable function computing the same
_DIFFERENTIABLE = {
    # copy(x, src): src broadcast to x's shape; nothing of x is kept
    torch.ops.aten.copy.default: lambda x, src, non_blocking=False: x * 0 + src,
}


def _short(op):
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else parts[0]


def _tensor_args(node):
    # written again on purpose: the oracle shares no code with gradgraph's capture
    out = []
    for i, a in enumerate(node.args):
        if isinstance(a, torch.fx.Node):
            out.append((i, a))
        elif isinstance(a, (list, tuple)):
            for k, b in enumerate(a):
                if isinstance(b, torch.fx.Node):
                    out.append(((i, k), b))
    return out


def _is_float(v):
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


class ScalarOracle:
    """Exhaustive scalar gradient graph of ``output(model(*args, **kwargs))``.

    Parameters
    ----------
    source_fx_names : list[str], optional
        fx node names of the sources (e.g. ``[n.fx_name for n in g.nodes if n.role == "source"]``).
        Default: the floating-point user inputs.
    max_paths : int
        Enumeration refuses graphs with more paths (a guard for test run time).
    exported : torch.export.ExportedProgram, optional
        The decomposed export of ``_Explained(model, output)`` at this granularity, when one is
        at hand (a deep model's export takes tens of seconds; it is torch's, not gradgraph's math).

    Attributes
    ----------
    G : networkx.MultiDiGraph
    sink : tuple
    sources : dict[str, list[tuple]]
        fx name -> every element's node id (whether or not a path reaches it).
    shapes : dict[str, tuple]
        fx name -> tensor shape, for every scalar-graph tensor.
    """

    def __init__(self, model, args, kwargs=None, output=None, granularity="function",
                 source_fx_names=None, max_paths=200_000, exported=None):
        kwargs = dict(kwargs or {})
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        self.max_paths = max_paths
        if exported is not None:
            ep = exported
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(_Explained(model, output), args, kwargs, strict=False)
                ep = ep.run_decompositions(_decomposition_table(granularity))
        gm = ep.graph_module
        flat = ep._graph_module_flat_inputs(args, kwargs)
        interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
        with torch.no_grad():
            interp.run(*flat, enable_io_processing=False)
        env = interp.env
        fx_nodes = list(gm.graph.nodes)
        by_name = {n.name: n for n in fx_nodes}
        out_node = next(n for n in fx_nodes if n.op == "output")
        outs = out_node.args[0]
        sink_fx = (outs[0] if isinstance(outs, (list, tuple)) else outs)
        if source_fx_names is None:
            user = set(ep.graph_signature.user_inputs)
            source_fx_names = [n.name for n in fx_nodes
                               if n.op == "placeholder" and n.name in user and _is_float(env[n])]
        src_nodes = [by_name[s] for s in source_fx_names]
        src_set = set(src_nodes)

        live = set(src_nodes)
        for n in fx_nodes:
            if n.op == "call_function" and n not in live and any(a in live for _, a in _tensor_args(n)):
                v = env.get(n)
                if _is_float(v) or (isinstance(v, (tuple, list)) and any(_is_float(t) for t in v)):
                    live.add(n)

        G = nx.MultiDiGraph()
        self.shapes = {}
        for n in fx_nodes:
            if n not in live or not _is_float(env.get(n)):
                continue
            producer, idx = (n.args[0], n.args[1]) if n.target is operator.getitem else (n, None)
            op = "input" if producer.op == "placeholder" else str(producer.target)
            module, _ = _module_of(n)
            val = env[n]
            self.shapes[n.name] = tuple(val.shape)
            for j in range(val.numel()):
                G.add_node((n.name, j), op=op, is_view=_short(op) in VIEW_OPS, module=module)
            if n in src_set:
                continue
            for key, a in _tensor_args(producer):
                if a not in live or not _is_float(env.get(a)):
                    continue
                J = self._jacobian(producer, idx, key, env)
                J = J.reshape(val.numel(), env[a].numel())
                rows, cols = np.nonzero(J)
                for i, j in zip(rows.tolist(), cols.tolist()):
                    G.add_edge((a.name, j), (n.name, i), w=float(J[i, j]))

        self.sink = (sink_fx.name, 0)
        self.sources = {s: [(s, j) for j in range(env[by_name[s]].numel())] for s in source_fx_names}
        # keep nodes on sink <- source paths only
        src_ids = [u for ids in self.sources.values() for u in ids if u in G]
        reach_src = set(src_ids)
        for u in src_ids:
            reach_src |= nx.descendants(G, u)
        keep = ({self.sink} | nx.ancestors(G, self.sink)) & reach_src
        self.G = G.subgraph(keep).copy()
        self.env_values = {n.name: env[n].detach().double().numpy().copy() for n in fx_nodes
                           if n.name in self.shapes}
        self._paths = None

    @staticmethod
    def _jacobian(producer, idx, key, env):
        def resolve(a):
            return env[a] if isinstance(a, torch.fx.Node) else a

        args = [pytree.tree_map(resolve, a) if not isinstance(a, torch.fx.Node) else env[a]
                for a in producer.args]
        kwargs = pytree.tree_map(resolve, dict(producer.kwargs))
        i, k = (key, None) if isinstance(key, int) else key
        x0 = (args[i] if k is None else args[i][k]).detach().double()

        def f(t):
            a2 = [list(a) if isinstance(a, (list, tuple)) else a for a in args]
            a2 = [[(v.double() if _is_float(v) else v) for v in a] if isinstance(a, list) else
                  (a.double() if _is_float(a) else a) for a in a2]
            if k is None:
                a2[i] = t
            else:
                a2[i][k] = t
            kw = {name: (v.double() if _is_float(v) else v) for name, v in kwargs.items()}
            if "dtype" in kw and isinstance(kw["dtype"], torch.dtype) and kw["dtype"].is_floating_point:
                kw["dtype"] = torch.float64
            target = _DIFFERENTIABLE.get(producer.target, producer.target)
            out = target(*a2, **kw)
            return out[idx] if idx is not None else out

        try:
            J = torch.func.jacrev(f)(x0)
        except Exception:
            J = torch.autograd.functional.jacobian(f, x0)
        return J.detach().double().numpy()

    # ------------------------------------------------------------------ paths
    def paths(self):
        """Every sink -> source path, by exhaustive depth-first search (iterative)."""
        if self._paths is not None:
            return self._paths
        G, out = self.G, []
        if self.sink not in G:
            self._paths = out
            return out
        is_src = {u for ids in self.sources.values() for u in ids}
        view = {u: d["is_view"] for u, d in G.nodes(data=True)}
        # stack of (node, path nodes, edge weights)
        stack = [(self.sink, [self.sink], [])]
        while stack:
            u, nodes, ws = stack.pop()
            if u in is_src:
                la = sum(math.log(abs(w)) for w in ws)
                sign = -1 if sum(w < 0 for w in ws) % 2 else 1
                weight = sign * math.prod(abs(w) for w in ws)
                length = sum(1 for v in nodes[:-1] if not view[v])
                out.append(OraclePath(nodes, ws, weight, la, sign, length))
                if len(out) > self.max_paths:
                    raise ValueError(f"more than {self.max_paths} paths; use a smaller model")
                continue
            for p, _, w in G.in_edges(u, data="w"):
                stack.append((p, nodes + [p], ws + [w]))
        self._paths = out
        return out

    def _by_source(self):
        per = {}
        for p in self.paths():
            per.setdefault(p.source, []).append(p)
        return per

    # ------------------------------------------------------------------ answers
    def gradient(self):
        """{source fx name: array shaped like the source} = sum of path weights per element."""
        out = {}
        for s, ids in self.sources.items():
            out[s] = np.zeros(len(ids))
        for p in self.paths():
            out[p.source[0]][p.source[1]] += p.weight
        return {s: v.reshape(self.shapes[s]) for s, v in out.items()}

    def log_Z(self):
        """log of Z = sum over paths of |g(path)|."""
        return logsumexp([p.log_abs for p in self.paths()])

    def Z(self):
        return math.fsum(abs(p.weight) for p in self.paths())

    @staticmethod
    def _entropy_of(log_abs):
        """H = -sum p log p of p = |g| / Z, in log space; nan when there is no path."""
        la = np.asarray(log_abs, dtype=np.float64)
        if la.size == 0:
            return math.nan
        lz = logsumexp(la)
        lp = la - lz
        return float(-(np.exp(lp) * lp).sum())

    def entropy(self, per_source=False, groups=None):
        """Entropy (nats) of the path distribution.

        ``per_source=True``: {fx name: array like the source} over the paths ending at each element
        (nan where none). ``groups``: {fx name: list of lists of flat indices} -> {fx name: array with
        one entropy per group} over the paths ending anywhere in the group.
        """
        if groups is not None:
            per = self._by_source()
            return {s: np.array([self._entropy_of([p.log_abs for j in grp for p in per.get((s, j), [])])
                                 for grp in gs]) for s, gs in groups.items()}
        if not per_source:
            return self._entropy_of([p.log_abs for p in self.paths()])
        per = self._by_source()
        return {s: np.array([self._entropy_of([p.log_abs for p in per.get(u, [])]) for u in ids]
                            ).reshape(self.shapes[s]) for s, ids in self.sources.items()}

    def log_flow(self):
        """{scalar node: log of the sum of |g(path)| over the paths through it}."""
        acc = {}
        for p in self.paths():
            for u in p.nodes:
                acc.setdefault(u, []).append(p.log_abs)
        return {u: logsumexp(v) for u, v in acc.items()}

    def flow(self):
        """{scalar node: sum of |g(path)| over the paths through it} (a path visits a node once)."""
        acc = {}
        for p in self.paths():
            for u in p.nodes:
                acc[u] = acc.get(u, 0.0) + abs(p.weight)
        return acc

    def tensor_flow(self):
        """{fx name: array shaped like the tensor} of :meth:`flow` (0 where no path)."""
        out = {s: np.zeros(int(np.prod(sh, dtype=np.int64))) for s, sh in self.shapes.items()}
        for (name, j), v in self.flow().items():
            out[name][j] += v
        return {s: v.reshape(self.shapes[s]) for s, v in out.items()}

    def length_distribution(self):
        """m[l] = sum of |g(path)| over paths of length l (see the module docstring)."""
        ps = self.paths()
        m = np.zeros(max((p.length for p in ps), default=0) + 1)
        for p in ps:
            m[p.length] += abs(p.weight)
        return m

    def log_length_distribution(self):
        ps = self.paths()
        n = max((p.length for p in ps), default=0) + 1
        return np.array([logsumexp([p.log_abs for p in ps if p.length == l]) for l in range(n)])

    def ranked(self, order="signed"):
        """All paths, best first: ``"signed"`` by g(path), ``"magnitude"`` by |g(path)|
        (compared in log space; ties keep enumeration order)."""
        if order == "magnitude":
            key = lambda p: p.log_abs  # noqa: E731
        else:
            key = lambda p: (p.sign, p.sign * p.log_abs)  # noqa: E731
        return sorted(self.paths(), key=key, reverse=True)

    def best(self, order="signed"):
        r = self.ranked(order)
        return r[0] if r else None


# ---------------------------------------------------------------------------- tiny models
# Models small enough for path enumeration (a few hundred to a few thousand paths). Each builder
# returns (model, args, kwargs, output_fn), in float64 and eval mode.

class _TinyMLP(torch.nn.Module):
    def __init__(self, widths, act):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = act

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


def tiny_mlp(seed=0, widths=(3, 4, 2), batch=1, act="tanh"):
    """Linear stack with tanh / relu / gelu between layers; sink y[0, 0] - y[-1, -1]."""
    torch.manual_seed(seed)
    acts = {"tanh": torch.tanh, "relu": torch.relu, "gelu": torch.nn.functional.gelu}
    model = _TinyMLP(list(widths), acts[act]).double().eval()
    x = torch.randn(batch, widths[0], dtype=torch.float64)
    return model, (x,), {}, lambda y: y[0, 0] - y[-1, -1]


class _ResLN(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, 2)

    def forward(self, x):
        x = x + torch.tanh(self.fc(self.norm(x)))
        return self.head(x)


def tiny_residual_ln(seed=0, d=3, rows=1):
    """x + tanh(Linear(LayerNorm(x))), then a linear head; sink y[0, 0] - y[0, 1]."""
    torch.manual_seed(seed)
    model = _ResLN(d).double().eval()
    with torch.no_grad():
        model.norm.weight.copy_(1 + 0.3 * torch.randn(d, dtype=torch.float64))
        model.norm.bias.copy_(0.1 * torch.randn(d, dtype=torch.float64))
    x = torch.randn(rows, d, dtype=torch.float64)
    return model, (x,), {}, lambda y: y[0, 0] - y[0, 1]


class _Attention(torch.nn.Module):
    def __init__(self, vocab, d):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.q = torch.nn.Linear(d, d)
        self.k = torch.nn.Linear(d, d)
        self.v = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, 2)

    def forward(self, ids):
        h = self.embed(ids)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / h.shape[-1] ** 0.5, dim=-1)
        return self.head(h + a @ self.v(h))


def tiny_attention(seed=0, vocab=7, d=2, tokens=3):
    """One self-attention layer over token ids (source: the embedding lookup); sink on the last token."""
    torch.manual_seed(seed)
    model = _Attention(vocab, d).double().eval()
    ids = torch.randint(0, vocab, (tokens,))
    return model, (ids,), {}, lambda y: y[-1, 0] - y[-1, 1]


class _Writes(torch.nn.Module):
    """A transposed convolution, in-place writes (a masked assignment, a column assignment) and a
    cumulative sum."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose1d(1, 2, 2, stride=2)
        self.head = torch.nn.Linear(4, 2)
        self.register_buffer("mask", torch.tensor([[True, False, True, True], [True, True, False, True]]))

    def forward(self, x):
        h = torch.tanh(self.up(x))[0] * 1.5     # (2, 4); the product keeps h free for writes
        h[~self.mask] = 0
        h[:, 1] = h[:, 2] * 0.5 - h[:, 3] * 0.75     # (no exact |weight| ties with the direct paths)
        return self.head(torch.cumsum(h, -1))


def tiny_writes(seed=0):
    """ConvTranspose1d, ``h[~mask] = 0``, ``h[:, 1] = ...``, cumsum, a linear head; sink y[0, 0] - y[1, 1]."""
    torch.manual_seed(seed)
    model = _Writes().double().eval()
    x = torch.randn(1, 1, 2, dtype=torch.float64)
    return model, (x,), {}, lambda y: y[0, 0] - y[1, 1]


def autograd_gradient(model, args, kwargs, output, embedding=None):
    """torch.autograd gradient of the sink wrt the float inputs, or wrt the output of the module
    ``embedding`` (an attribute name) when given. Returns a list of numpy arrays."""
    if embedding is None:
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        y = output(model(*leaves, **kwargs))
        return [t.detach().numpy() for t in torch.autograd.grad(y, leaves)]
    kept = []
    handle = getattr(model, embedding).register_forward_hook(
        lambda m, i, o: (kept.append(o), o.retain_grad())[0])
    try:
        y = output(model(*args, **kwargs))
        y.backward()
    finally:
        handle.remove()
    return [kept[0].grad.detach().numpy()]


_CASES = {}


def captured_case(builder, granularity="function", **params):
    """(graph, oracle, (model, args, kwargs, output)) for ``builder(**params)`` at this
    granularity, cached per arguments so several tests share one capture and one enumeration."""
    import gradgraph as gg

    key = (builder.__name__, granularity, tuple(sorted(params.items())))
    if key not in _CASES:
        model, args, kwargs, out = builder(**params)
        g = gg.capture(model, args, kwargs, output=out, granularity=granularity)
        srcs = [g.nodes[i].fx_name for i in g.sources.values()]
        _CASES[key] = (g, ScalarOracle(model, args, kwargs, out, granularity=granularity,
                                       source_fx_names=srcs), (model, args, kwargs, out))
    return _CASES[key]


#: Small configurations shared by the property tests (a finite space, so the cache is reused
#: across test files): (builder, parameters).
CASES = [
    (tiny_mlp, dict(seed=1)),
    (tiny_mlp, dict(seed=2, widths=(2, 3, 3, 2), batch=2, act="relu")),
    (tiny_mlp, dict(seed=3, widths=(3, 4, 2), act="gelu")),
    (tiny_residual_ln, dict(seed=1)),
    (tiny_residual_ln, dict(seed=4, d=2, rows=2)),
    (tiny_attention, dict(seed=1)),
    (tiny_attention, dict(seed=5, tokens=2, vocab=3)),
    (tiny_attention, dict(seed=6, tokens=2, granularity="primitive")),   # softmax decomposed
    (tiny_residual_ln, dict(seed=7, granularity="primitive")),          # layer norm decomposed
    (tiny_writes, dict(seed=1)),               # conv-transpose, in-place writes, cumsum
]


def case_strategy():
    """A hypothesis strategy over indices into :data:`CASES` (pass them to :func:`get_case`)."""
    from hypothesis import strategies as st

    return st.sampled_from(range(len(CASES)))


def get_case(i):
    """``captured_case`` of ``CASES[i]``: (graph, oracle, (model, args, kwargs, output))."""
    return captured_case(CASES[i][0], **CASES[i][1])
