"""The gradient graph: tensor nodes, structured Jacobian edges, sources and one scalar sink.

Nodes are tensors (each stands for its scalar elements); an edge ``src -> dst`` holds the local
Jacobian d(dst)/d(src) of the op that computed ``dst``. The scalar gradient graph of the paper is
implied: scalar node (tensor, element), scalar edge = non-zero Jacobian entry.
Queries (gradient, top paths, entropy, flow, ...) are thin front ends over the semiring engine in
:mod:`gradgraph.algorithms`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import QueryError, QueryWarning, ValueNotHeldError
from .jacobians import Jacobian

__all__ = ["Node", "Edge", "GradGraph", "VIEW_OPS"]

#: The ops that are pure data movement by name: the library registers its rules for them with
#: ``data_movement=True``, and a node without a recorded flag (made by hand, or loaded from a file
#: written before nodes recorded it) falls back to this list.
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "permute", "expand", "slice", "select", "clone",
    "contiguous", "transpose", "t", "unsqueeze", "squeeze", "alias", "detach", "lift_fresh_copy",
    "_to_copy", "flatten", "unflatten", "as_strided", "expand_copy", "view_copy", "permute_copy",
    "unsqueeze_copy", "squeeze_copy", "slice_copy", "select_copy", "t_copy", "transpose_copy",
    "alias_copy", "getitem",
})


@dataclass
class Node:
    """One tensor of the captured computation."""

    name: str                 # unique; the fx node name (or the source name for sources)
    op: str                   # ATen op ("aten.addmm.default"), or "input" / "source"
    shape: tuple
    dtype: str
    module: str = ""          # innermost module path, e.g. "bert.encoder.layer.3.attention.self.key"
    module_type: str = ""     # its class, e.g. "torch.nn.modules.linear.Linear"
    source_line: str = ""     # "file.py:123: code" of the user's code that made it
    value: np.ndarray | None = field(default=None, repr=False)   # None: not held (GradGraph.value)
    role: str = "op"          # "source", "op" or "sink"
    fx_name: str = ""         # the node's name in the exported ATen fx graph
    data_movement: bool | None = None   # its op's rule is pure data movement (None: unknown)

    @property
    def numel(self):
        return int(math.prod(self.shape))

    @property
    def op_name(self):
        """Short op name: "aten.addmm.default" -> "addmm"."""
        parts = self.op.split(".")
        return parts[1] if len(parts) >= 2 and parts[0] == "aten" else parts[0]

    @property
    def is_view(self):
        """Pure data movement (a weight-1 map of elements): transparent in reported paths unless
        ``include_views``, and not counted in path lengths. As the op's rule declared it at
        capture (``register_rule(..., data_movement=True)``); by op name (:data:`VIEW_OPS`) for
        a node that does not record it."""
        if self.data_movement is not None:
            return self.data_movement
        return self.op_name in VIEW_OPS


@dataclass
class Edge:
    """d(dst)/d(src) for one tensor argument of the op that computed ``dst``."""

    src: int
    dst: int
    jac: Jacobian
    arg: int = 0              # position of the argument in the op's call


class GradGraph:
    """A captured gradient graph. Build one with :func:`gradgraph.capture` or :func:`gradgraph.load`.

    Attributes
    ----------
    nodes : list[Node]
        Tensor nodes in topological (forward execution) order; the sink is last.
    edges : list[Edge]
    sources : dict[str, int]
        Source name -> node index. Paths end at source elements.
    sink : int
        Index of the scalar node being explained.
    granularity : str
        ``"function"`` or ``"primitive"`` (see ``docs/capture.md``).
    meta : dict
        Free-form provenance (model class, torch version, input shapes, ...).
    """

    def __init__(self, nodes, edges, sources, sink, granularity, meta=None):
        self.nodes = list(nodes)
        self.edges = list(edges)
        self.sources = dict(sources)
        self.sink = int(sink)
        self.granularity = granularity
        self.meta = dict(meta or {})
        self.in_edges = [[] for _ in self.nodes]     # edges into node v (from its op's inputs)
        self.out_edges = [[] for _ in self.nodes]    # edges leaving node u (to its consumers)
        for k, e in enumerate(self.edges):
            self.in_edges[e.dst].append(k)
            self.out_edges[e.src].append(k)
        self._index = {n.name: i for i, n in enumerate(self.nodes)}
        self._cache = {}

    # ------------------------------------------------------------------ lookup
    def node_index(self, name):
        """Index of the node called ``name`` (a node name or a source name)."""
        if name in self.sources:
            return self.sources[name]
        if name in self._index:
            return self._index[name]
        raise QueryError(f"unknown node {name!r}; sources are {sorted(self.sources)}")

    def source_index(self, name):
        if name not in self.sources:
            raise QueryError(f"unknown source {name!r}; valid sources: {sorted(self.sources)}")
        return self.sources[name]

    def value(self, node):
        """The value the forward computed for tensor ``node``, as a numpy array.

        Parameters
        ----------
        node : str or int
            A node name, a source name or a node index.

        Raises
        ------
        ValueNotHeldError
            The graph does not hold this node's value: :func:`gradgraph.capture` keeps by
            default only the values a Jacobian references and the sources' and the sink's
            (``values="needed"``); capture with ``values="all"`` to hold every value.
        """
        i = node if isinstance(node, (int, np.integer)) and not isinstance(node, bool) else self.node_index(node)
        if not 0 <= i < len(self.nodes):
            raise QueryError(f"node index {i} out of range ({len(self.nodes)} nodes)")
        n = self.nodes[i]
        if n.value is None:
            raise ValueNotHeldError(
                f"the graph does not hold the value of node {n.name!r} ({n.op}): capture keeps only the "
                f"values its Jacobians reference and the sources' and the sink's; capture with "
                f"gg.capture(..., values=\"all\") to hold every node's value")
        return n.value

    @property
    def sink_node(self):
        return self.nodes[self.sink]

    @property
    def sink_value(self):
        return float(np.asarray(self.nodes[self.sink].value).reshape(-1)[0])

    def __repr__(self):
        return (f"GradGraph({len(self.nodes)} tensors, {len(self.edges)} Jacobians, "
                f"{sum(n.numel for n in self.nodes)} scalars, sources={list(self.sources)}, "
                f"sink={self.sink_node.name!r}, granularity={self.granularity!r})")

    def _repr_html_(self):
        """Jupyter's display: a compact summary and the diagram of the top paths."""
        from .export.notebook import graph_html
        return graph_html(self)

    # ------------------------------------------------------------------ queries
    def gradient(self):
        """d(sink)/d(source) for every source, by the real (+, x) semiring.

        Returns
        -------
        dict[str, torch.Tensor]
            Source name -> gradient shaped and typed like the source. Equals
            ``torch.autograd.grad(sink, source)``.
        """
        from .algorithms.api import gradient
        grads = gradient(self)
        bad = [name for name, v in grads.items() if not bool(v.isfinite().all())]
        if bad:
            self._warn_non_finite(f"gradient() of {', '.join(map(repr, bad))}")
        return grads

    def top_paths(self, k=1, order="signed", *, source=None, include_views=False, progress=None):
        """The k highest-weighted sink-to-source paths, best first (see ``docs/semirings.md``).

        Parameters
        ----------
        k : int
            How many paths (>= 1).
        order : {"signed", "magnitude"}
            ``"signed"``: the paper's (max, x): most positive product first.
            ``"magnitude"``: largest |product| first.
        source : str or (str, index-or-indices), optional
            Only paths ending in this source, or in these elements of it (an element group is
            aggregated, paper Eq. 3).
        include_views : bool
            Report pure data-movement hops too.

        Returns
        -------
        PathList
            A list of :class:`~gradgraph.algorithms.paths.Path` that Jupyter shows as a table and
            a diagram.
        """
        from .algorithms.paths import top_paths
        from .export.notebook import PathList
        paths = top_paths(self, k=k, order=order, source=source, include_views=include_views,
                          progress=progress)
        if not paths:
            self._warn_no_path("top_paths() is empty", source)
        return PathList(paths, graph=self)

    def entropy(self, per_source=False, *, groups=None):
        """Entropy (nats) of the path distribution p(path) = |g(path)| / Z (paper Eq. 6-7).

        ``per_source=True``: one entropy per source element (over the paths ending there), as
        ``{source name: array shaped like the source}``; ``groups`` aggregates elements first.
        """
        from .algorithms.entropy import entropy
        h = entropy(self, per_source=per_source, groups=groups)
        if isinstance(h, (float, np.floating)) and math.isnan(h):
            self._warn_no_path("entropy() is NaN", None)
        return h

    def _warn_no_path(self, what, source):
        """A :class:`~gradgraph.errors.QueryWarning` that a query found no path, and why."""
        bad = self.meta.get("first_non_finite")
        why = (f"node {bad['node']} ({bad['op']}) {bad['problem']}" if bad else
               "every path has weight zero: the gradient is zero, the output does not depend on "
               + (f"source {source!r}" if source is not None else "the sources")
               + " through non-zero derivatives")
        warnings.warn(QueryWarning(f"{what}: no path from the sources to the sink has a non-zero "
                                   f"finite weight ({why})"), stacklevel=3)

    def flow(self, by="element", *, log=False):
        """Total |path weight| through each scalar node (inside-outside).

        ``by="element"``: {node name: array shaped like the node}; ``"node"``: {node name: float};
        ``"module"``: {module path: float} (a path counts once per element it visits).
        ``log=True``: natural logs (exact where float64 values would underflow).
        """
        from .algorithms.flow import flow
        result = flow(self, by=by, log=log)
        if any(np.isnan(np.asarray(v, dtype=float)).any() for v in result.values()):
            self._warn_non_finite("flow()")
        return result

    def _warn_non_finite(self, what):
        """A :class:`~gradgraph.errors.QueryWarning` that a query's result is not finite, and where
        the first non-finite value of the graph is."""
        bad = self.meta.get("first_non_finite")
        where = (f"node {bad['node']} ({bad['op']}, module {bad.get('module') or '<top>'}"
                 + (f", at {bad['source_line']}" if bad.get("source_line") else "") + f") {bad['problem']}"
                 if bad else "no node of the graph was found non-finite at capture")
        warnings.warn(QueryWarning(f"{what} is not finite everywhere: the model's forward has non-finite "
                                   f"values on paths to the sink; the first is {where}"), stacklevel=3)

    def path_lengths(self, *, log=False):
        """|gradient| mass of the paths by length (non-view hops): array, index = length."""
        from .algorithms.flow import path_lengths
        return path_lengths(self, log=log)

    def branches(self, node, *, order="signed", groups=None):
        """At tensor ``node``, which consumer (op and module) carries the best path through each
        element or element group, and the best value through every consumer (paper Fig. 2, 4)."""
        from .algorithms.paths import branches
        return branches(self, node, order=order, groups=groups)

    def to_networkx(self, level="tensor"):
        """A networkx view: ``level="tensor"`` (nodes = tensors) or ``"scalar"`` (small graphs)."""
        from .export.nx import to_networkx
        return to_networkx(self, level=level)

    def report(self, path, k=20, **kw):
        """Write an interactive HTML report (see :func:`gradgraph.report`)."""
        from .export.report import report
        return report(self, path, k, **kw)

    def to_json(self, paths=None, **kw):
        """The pruned graph of some paths as node-link JSON (see :func:`gradgraph.to_json`)."""
        from .export.graphjson import to_json
        return to_json(self, paths, **kw)

    def save(self, path, *, overwrite=False):
        """Write the graph to one safetensors file (see ``docs/file-format.md``)."""
        from .export.filewriter import save
        return save(self, path, overwrite=overwrite)
