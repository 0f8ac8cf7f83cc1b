"""Declarative queries of a batch run: a list of small dicts, the same in Python, JSON or YAML.

Each spec names a query (``"query"``), optionally a ``"name"`` (its label in the table; default the
query itself) and the query's parameters. Every query gives, per item, a headline number
(``value``, NaN where the query has none) and its full answer as JSON (``result``):

=============== ============================================= ==========================================
query           parameters (defaults)                         value / result
=============== ============================================= ==========================================
top_paths       k (1), order ("signed"), source (None),       weight of the best path / the k paths
                include_views (False)                         (weight, log|w|, sign, source, index,
                                                              length, hops [node, index, op, module])
entropy         per_source (False), groups (None: an axis     total entropy (nats) / per source: nested
                index, e.g. 1 = one value per token)          lists, or one entropy per group
flow            by ("module"; "node"; "element" with node     NaN / {module or node: flow}, or the
                and groups), node, groups, top (None)         element flows summed per group
branches        nodes (names) or modules (glob patterns:      NaN / per node: labels (op @ module),
                the tensors entering those modules), order,   best label per group, best values
                groups (None)
path_lengths    --                                            mean length (by |weight| mass) / masses
gradient        --                                            NaN / {source: nested list}
save            --                                            NaN / the graph file (out/_graphs/...)
call            function ("package.module:name" of a          NaN / what the function returns
                function graph -> JSON-serialisable result)   (several answers from shared passes)
=============== ============================================= ==========================================
"""
from __future__ import annotations

import fnmatch
import json
import math
import os

import numpy as np

from ..errors import BatchError

__all__ = ["QUERIES", "normalize_queries", "load_queries", "answer"]

#: query -> its parameters and their defaults
QUERIES = {
    "top_paths": {"k": 1, "order": "signed", "source": None, "include_views": False},
    "entropy": {"per_source": False, "groups": None},
    "flow": {"by": "module", "node": None, "groups": None, "top": None},
    "branches": {"nodes": None, "modules": None, "order": "signed", "groups": None},
    "path_lengths": {},
    "gradient": {},
    "save": {},
    "call": {"function": None},
}


def normalize_queries(queries):
    """Check query specs and fill in defaults: a list of dicts with every parameter spelled out.

    Raises
    ------
    BatchError
        Not a list of dicts, an unknown query or parameter, or two queries with the same name.
    """
    if isinstance(queries, dict):
        queries = [queries]
    if not isinstance(queries, (list, tuple)) or not queries:
        raise BatchError("queries must be a non-empty list of dicts such as "
                         "[{'query': 'top_paths', 'k': 5}, {'query': 'entropy'}]")
    out, names = [], set()
    for q in queries:
        if isinstance(q, str):
            q = {"query": q}
        if not isinstance(q, dict) or q.get("query") not in QUERIES:
            kind = q.get("query") if isinstance(q, dict) else q
            raise BatchError(f"unknown query {kind!r}; queries are {', '.join(QUERIES)}")
        kind = q["query"]
        unknown = set(q) - set(QUERIES[kind]) - {"query", "name"}
        if unknown:
            raise BatchError(f"query {kind!r} has no parameter {sorted(unknown)[0]!r}; its parameters "
                             f"are {', '.join(QUERIES[kind]) or 'none'}")
        spec = {"query": kind, "name": str(q.get("name", kind))}
        spec.update({k: q.get(k, v) for k, v in QUERIES[kind].items()})
        if spec["name"] in names:
            raise BatchError(f"two queries are named {spec['name']!r}; give each a distinct 'name'")
        if kind == "branches" and not (spec["nodes"] or spec["modules"]):
            raise BatchError("a branches query needs 'nodes' (tensor names) or 'modules' (glob patterns, "
                             "e.g. 'bert.encoder.layer.*.attention')")
        if kind == "flow" and spec["by"] == "element" and not spec["node"]:
            raise BatchError("a flow query by 'element' needs 'node' (the tensor whose element flows to report)")
        if kind == "call":
            resolve_function(spec["function"])    # a bad name fails here, not once per item
        names.add(spec["name"])
        out.append(json.loads(json.dumps(spec)))   # plain JSON values: comparable with a saved config
    return out


def read_text(path, what, error=BatchError):
    """The text of a study's input file ``path``; ``error("cannot read <what> <path>: <why>")``
    (one line) when it cannot be read. The command line reads its items file the same way."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_queries(path):
    """Read query specs from a JSON or YAML file (a list, or ``{"queries": [...]}``)."""
    text = read_text(path, "queries file")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise BatchError("reading YAML needs PyYAML (pip install pyyaml); or write the queries as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise BatchError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BatchError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "queries" in data:
        data = data["queries"]
    return normalize_queries(data)


def resolve_function(name):
    """The function named ``"package.module:qualified.name"`` (a ``call`` query's ``function``)."""
    import importlib
    if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
        raise BatchError(f"a call query needs 'function': 'package.module:name' (an importable function "
                         f"graph -> result), got {name!r}")
    module, qualname = name.split(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise BatchError(f"call query: cannot import {module!r} ({exc}); the module must be importable "
                         f"in every worker") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise BatchError(f"call query: {module!r} has no function {qualname!r}")
    return obj


# ============================================================================ answers
def _num(x):
    """A JSON-safe float (NaN and infinities as strings JSON can carry)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _nested(a):
    a = np.asarray(a, dtype=np.float64)
    return [_num(x) for x in a] if a.ndim == 1 else [_nested(r) for r in a] if a.ndim else _num(a)


def _grouped(values, axis):
    """Sum an array over every axis but ``axis``: one total per index along it."""
    values = np.asarray(values, dtype=np.float64)
    return values.sum(axis=tuple(d for d in range(values.ndim) if d != axis % values.ndim))


def _inside(module, m):
    return module == m or module.startswith(m + ".")


def _module_inputs(g, patterns):
    """``[(tensor, module)]``: for each module path matching a glob pattern, the tensors outside
    it that feed a node inside it (e.g. the residual stream entering a layer's attention)."""
    out = []
    candidates = set()
    for m in {n.module for n in g.nodes if n.module and not n.module.startswith("<")}:
        # every module path and its ancestors
        parts = m.split(".")
        candidates.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for pat in [patterns] if isinstance(patterns, str) else patterns:
        matches = [c for c in candidates if fnmatch.fnmatchcase(c, pat)]
        for m in sorted(matches, key=lambda c: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in c.split(".")]):
            found = []
            for e in g.edges:
                src, dst = g.nodes[e.src], g.nodes[e.dst]
                if _inside(dst.module, m) and not _inside(src.module, m) and src.name not in found:
                    found.append(src.name)
            out.extend((name, m) for name in found)
    if not out:
        raise BatchError(f"no module matches {patterns!r}")
    return out


def answer(g, spec, artefact_dir=None, item_file=None):
    """``(value, result)`` of one normalised query spec on graph ``g`` (result JSON-serialisable)."""
    kind = spec["query"]
    if kind == "top_paths":
        source = spec["source"]
        if isinstance(source, list):
            source = (source[0], tuple(source[1]) if isinstance(source[1], list) else source[1])
        paths = g.top_paths(k=spec["k"], order=spec["order"], source=source, include_views=spec["include_views"])
        res = [{"weight": _num(p.weight), "log_abs_weight": _num(p.log_abs_weight), "sign": int(p.sign),
                "source": p.source[0], "index": [int(i) for i in p.source[1]], "length": int(p.length),
                "hops": [[h.node, [int(i) for i in h.index], h.op, h.module] for h in p.hops]} for p in paths]
        return (float(paths[0].weight) if paths else math.nan), res
    if kind == "entropy":
        if spec["groups"] is not None:
            H = g.entropy(groups={name: int(spec["groups"]) for name in g.sources})
            return math.nan, {name: _nested(h) for name, h in H.items()}
        if spec["per_source"]:
            return math.nan, {name: _nested(h) for name, h in g.entropy(per_source=True).items()}
        return float(g.entropy()), None
    if kind == "flow":
        if spec["by"] == "element":
            f = g.flow(by="element")
            if spec["node"] not in f:
                raise BatchError(f"flow: no node {spec['node']!r} in the graph")
            f = f[spec["node"]]
            return math.nan, _nested(f if spec["groups"] is None else _grouped(f, int(spec["groups"])))
        f = g.flow(by=spec["by"])
        items = sorted(f.items(), key=lambda kv: -kv[1])[:spec["top"]] if spec["top"] else sorted(f.items())
        return math.nan, {k: _num(v) for k, v in items}
    if kind == "branches":
        targets = [(n, None) for n in spec["nodes"] or []]
        if spec["modules"]:
            targets += _module_inputs(g, spec["modules"])
        # every node from one shared backward and forward pass (not two passes per node)
        found = g.branches([node for node, _ in targets], order=spec["order"], groups=spec["groups"])
        res = [{"node": node, "module": module, "labels": b.labels,
                "best": [int(x) for x in b.best], "best_labels": b.best_labels(),
                "log_abs": _nested(b.log_abs), "sign": [[int(s) for s in r] for r in b.sign]}
               for (node, module), b in zip(targets, found)]
        return math.nan, res
    if kind == "path_lengths":
        m = g.path_lengths()
        total = float(m.sum())
        return (float(np.dot(np.arange(len(m)), m) / total) if total > 0 else math.nan), _nested(m)
    if kind == "gradient":
        return math.nan, {name: _nested(t.double().numpy()) for name, t in g.gradient().items()}
    if kind == "call":     # one function, several answers from passes it shares
        return math.nan, resolve_function(spec["function"])(g)
    if kind == "save":
        if artefact_dir is None:
            raise BatchError("the save query needs a results folder")
        return math.nan, item_file
    raise BatchError(f"unknown query {kind!r}")
