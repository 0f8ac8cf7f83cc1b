"""The ``gradgraph`` command line: capture a model once, then query the saved graph offline.

::

    gradgraph capture examples/tiny_bert.py:build --out bert.safetensors
    gradgraph info bert.safetensors
    gradgraph paths bert.safetensors --k 10 --json
    gradgraph entropy bert.safetensors --per-source
    gradgraph flow bert.safetensors --by module --top 20
    gradgraph render bert.safetensors --k 5 --collapse module -o top.svg
    gradgraph report bert.safetensors -o report.html
    gradgraph export bert.safetensors --json top.json --k 20

Every query reads only the saved file: no model code, no ``torch.export``. ``--json`` output
follows the schemas in ``docs/cli.md``. User errors print one line, ``gradgraph: error: ...``,
to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import warnings

from .errors import GradGraphError, GradGraphWarning

__all__ = ["main", "load_spec"]

EXIT_USAGE = 2


class UsageError(GradGraphError):
    """Bad command-line input that no library call reports (a bad spec, an existing file, ...)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other user error of the command line."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ============================================================================ helpers
def _finite(x):
    """A JSON-safe float: non-finite values (no path, underflow to -inf log) become null."""
    x = float(x)
    return x if math.isfinite(x) else None


def _strict_json(obj):
    """``obj`` with every non-finite float (Python or numpy, at any depth) replaced by None and
    numpy scalars by Python ones: what strict JSON (RFC 8259, no NaN or Infinity) can hold."""
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:    # numpy scalars
        obj = obj.item()
    if isinstance(obj, float):
        return _finite(obj)
    return obj


def _emit(obj, as_json, text):
    if as_json:
        # allow_nan=False: a non-finite number that escaped the mapping is a bug, not bad JSON
        sys.stdout.write(json.dumps(_strict_json(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")
    else:
        sys.stdout.write(text() + "\n")


def _load(path):
    from .export.fileformat import load
    return load(path)


def _check_new_file(path, overwrite, what="--out"):
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {what} {path}: directory {parent} does not exist")


def load_spec(spec):
    """Call a spec function and check what it returns.

    ``spec`` is ``path/to/file.py:function`` or ``package.module:function``; the function takes
    no arguments and returns ``(model, args, kwargs, output_fn)`` with ``args`` a tuple (or list),
    ``kwargs`` a dict or None, and ``output_fn`` a callable (model output -> scalar tensor) or
    None when the model's output already is a scalar.
    """
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func:
        raise UsageError(f"bad spec {spec!r}: use path/to/file.py:function or package.module:function")
    is_file = target.endswith(".py") or os.sep in target or "/" in target
    try:
        if is_file:
            if not os.path.isfile(target):
                raise UsageError(f"bad spec {spec!r}: file {target} does not exist")
            name = "_gradgraph_spec_" + os.path.splitext(os.path.basename(target))[0]
            mspec = importlib.util.spec_from_file_location(name, target)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[name] = module       # dataclasses and pickling look modules up by name
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except GradGraphError:
        raise
    except SystemExit as exc:
        raise UsageError(f"bad spec {spec!r}: importing {target} called sys.exit({exc.code!r})") from None
    except ModuleNotFoundError as exc:
        raise UsageError(f"bad spec {spec!r}: cannot import {target}: {exc}") from exc
    except Exception as exc:
        raise UsageError(f"bad spec {spec!r}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"bad spec {spec!r}: {target} has no function {func!r}")
    try:
        built = fn()
    except SystemExit as exc:
        raise UsageError(f"bad spec {spec!r}: {func}() called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise UsageError(f"bad spec {spec!r}: {func}() failed: {type(exc).__name__}: {exc}") from exc
    import torch
    shape = "(model, args, kwargs, output_fn)"
    if not isinstance(built, (tuple, list)) or len(built) != 4:
        raise UsageError(f"bad spec {spec!r}: {func}() must return {shape}, got {type(built).__name__}"
                         + (f" of length {len(built)}" if isinstance(built, (tuple, list)) else ""))
    model, args, kwargs, output = built
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"bad spec {spec!r}: the model returned by {func}() must be a torch.nn.Module, "
                         f"got {type(model).__name__}")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise UsageError(f"bad spec {spec!r}: args must be a tuple, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UsageError(f"bad spec {spec!r}: kwargs must be a dict or None, got {type(kwargs).__name__}")
    if output is not None and not callable(output):
        raise UsageError(f"bad spec {spec!r}: output_fn must be callable or None, got {type(output).__name__}")
    return model, tuple(args), dict(kwargs or {}), output


def _shape(node):
    return [int(s) for s in node.shape]


def _sink_json(g):
    n = g.sink_node
    return {"name": n.name, "op": n.op, "module": n.module, "value": _finite(g.sink_value)}


def _path_json(rank, p):
    return {
        "rank": rank,
        "weight": _finite(p.weight),
        "log_abs_weight": _finite(p.log_abs_weight),
        "sign": int(p.sign),
        "length": int(p.length),
        "source": {"name": p.source[0], "index": [int(i) for i in p.source[1]]},
        "hops": [{"node": h.node, "index": [int(i) for i in h.index], "op": h.op, "module": h.module}
                 for h in p.hops],
    }


def _table(rows, headers):
    cols = list(zip(*([headers] + rows))) if rows else [[h] for h in headers]
    widths = [max(len(str(c)) for c in col) for col in cols]
    fmt = "  ".join(f"{{:{'>' if i else '<'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(out)


def _route_part(module):
    """A module path cut after its first numbered component (``bert.encoder.layer.3``), else
    after two (``cls.predictions``): the level a route through a deep model is read at."""
    if not module or module.startswith("<"):
        return ""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2])


def _weight_text(w, log_abs, sign):
    from .export.dot import format_weight
    return format_weight(w, log_abs, sign, digits=6)


# ============================================================================ commands
def cmd_capture(a):
    _check_new_file(a.out, a.overwrite)
    model, args, kwargs, output = load_spec(a.spec)
    from .capture import capture
    tty = sys.stderr.isatty()
    if tty:
        print("gradgraph: tracing the model with torch.export ...", file=sys.stderr, flush=True)
    # progress=None: the capture's own bar appears on a terminal for large graphs, never in pipes
    try:
        g = capture(model, args, kwargs, output=output, sources=a.sources or None,
                    granularity=a.granularity, progress=True if a.progress else None, values=a.values)
    except SystemExit as exc:   # the model's code, run by the capture, asked to exit
        raise UsageError(f"capturing {a.spec} failed: the model or output function called "
                         f"sys.exit({exc.code!r})") from None
    g.save(a.out, overwrite=a.overwrite)
    size = os.path.getsize(a.out)
    print(f"wrote {a.out} ({size / 1e6:.2f} MB): {len(g.nodes)} tensors, "
          f"{sum(n.numel for n in g.nodes)} scalars, {len(g.edges)} Jacobians; sources "
          f"{', '.join(f'{k} {_shape(g.nodes[i])}' for k, i in g.sources.items())}; "
          f"sink {g.sink_node.name} = {g.sink_value:.6g}")
    return 0


def _format_version(path):
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        return int((f.metadata() or {}).get("version", 0))


def cmd_info(a):
    g = _load(a.file)
    ops = {}
    for n in g.nodes:
        if n.role != "source":
            ops[n.op_name] = ops.get(n.op_name, 0) + 1
    ops = dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    info = {
        "file": a.file,
        "file_size": os.path.getsize(a.file),
        "format_version": _format_version(a.file),
        "granularity": g.granularity,
        "tensors": len(g.nodes),
        "scalars": int(sum(n.numel for n in g.nodes)),
        "jacobians": len(g.edges),
        "values_held": sum(n.value is not None for n in g.nodes),
        "ops": ops,
        "sources": [{"name": k, "shape": _shape(g.nodes[i]), "dtype": g.nodes[i].dtype,
                     "module": g.nodes[i].module} for k, i in g.sources.items()],
        "sink": _sink_json(g),
        "meta": g.meta,
    }

    def text():
        lines = [f"file         {a.file} ({info['file_size'] / 1e6:.2f} MB, format version {info['format_version']})",
                 f"granularity  {g.granularity}",
                 f"tensors      {info['tensors']}",
                 f"scalars      {info['scalars']}",
                 f"jacobians    {info['jacobians']}",
                 f"values       held for {info['values_held']} of {info['tensors']} tensors",
                 f"sink         {g.sink_node.name} = {g.sink_value:.6g}"
                 + (f"  [{g.sink_node.module}]" if g.sink_node.module else "")]
        for s in info["sources"]:
            lines.append(f"source       {s['name']} {s['shape']} {s['dtype']}")
        if "model" in g.meta:
            lines.append(f"model        {g.meta['model']}")
        lines.append("ops          " + ", ".join(f"{k} {v}" for k, v in ops.items()))
        lines += _capture_notes(g.meta)
        return "\n".join(lines)

    _emit(info, a.json, text)
    return 0


def _capture_notes(meta):
    """``info`` lines for what capture recorded about the graph's exactness (docs/capture.md)."""
    def ops(entries):
        return ", ".join(dict.fromkeys(e["op"] for e in entries))
    lines = []
    if meta.get("tracer") == "record":     # not exportable: the ops of this one input were recorded
        lines.append("captured by   recording this input's ops (torch.export failed on data-dependent control flow)"
                     if meta.get("export_failure") else "captured by   recording this input's ops")
    dense = meta.get("dense_jacobians") or []
    if dense:
        lines.append(f"dense        {len(dense)} node{'s' if len(dense) > 1 else ''}: {ops(dense)}")
    low = meta.get("lower_precision") or []
    if low:
        dtypes = ", ".join(dict.fromkeys(e["dtype"] for e in low))
        lines.append(f"lower prec.  {len(low)} node{'s' if len(low) > 1 else ''} ({dtypes}): {ops(low)}")
    bad = meta.get("first_non_finite")
    if bad:
        lines.append(f"non-finite   node {bad['node']} ({bad['op']}) {bad['problem']}"
                     + (f" at {bad['source_line']}" if bad.get("source_line") else ""))
    return lines


def cmd_paths(a):
    g = _load(a.file)
    if a.source is not None:
        g.source_index(a.source)
    paths = g.top_paths(k=a.k, order=a.order, source=a.source, include_views=a.include_views)
    out = {"file": a.file, "k": a.k, "order": a.order, "source": a.source,
           "include_views": a.include_views, "sink": _sink_json(g),
           "paths": [_path_json(r + 1, p) for r, p in enumerate(paths)]}

    def text():
        rows = []
        for r, p in enumerate(paths):
            route = []
            for h in p.hops[1:-1]:
                m = _route_part(h.module)
                if m and (not route or route[-1] != m):
                    route.append(m)
            rows.append([r + 1, _weight_text(p.weight, _finite(p.log_abs_weight), p.sign), p.length,
                         f"{p.source[0]}{list(p.source[1])}", " <- ".join(route)])
        head = f"top {len(paths)} paths ({a.order}) of {g.sink_node.name} = {g.sink_value:.6g}"
        return head + "\n" + _table(rows, ["rank", "weight", "length", "source", "route (sink -> source)"])

    _emit(out, a.json, text)
    return 0


def cmd_entropy(a):
    import numpy as np
    g = _load(a.file)
    H = float(g.entropy())
    out = {"file": a.file, "entropy": _finite(H), "unit": "nats"}
    per = None
    if a.per_source:
        per = g.entropy(per_source=True)
        out["per_source"] = {k: {"shape": list(np.shape(v)),
                                 "values": [_finite(x) for x in np.asarray(v, dtype=float).reshape(-1)]}
                             for k, v in per.items()}

    def text():
        lines = [f"entropy of the path distribution: {H:.6g} nats"]
        for k, v in (per or {}).items():
            v = np.asarray(v, dtype=float)
            fin = v[np.isfinite(v)]
            lines.append(f"{k} {list(v.shape)}: min {fin.min():.4g}, mean {fin.mean():.4g}, max {fin.max():.4g}"
                         if fin.size else f"{k} {list(v.shape)}: no paths")
            if v.ndim >= 2:        # one row per position (token), averaged over the last axis
                rows = v.reshape(-1, v.shape[-1])
                lines += [f"  [{i}] mean {np.nanmean(np.where(np.isfinite(r), r, np.nan)):.4g}"
                          for i, r in enumerate(rows[:64])]
        return "\n".join(lines)

    _emit(out, a.json, text)
    return 0


def cmd_flow(a):
    import numpy as np
    g = _load(a.file)
    if a.top < 1:
        raise UsageError(f"--top must be >= 1, got {a.top}")
    f = g.flow(by=a.by)
    if a.by == "element":
        items = []
        for name, arr in f.items():
            arr = np.asarray(arr, dtype=float)
            flat = arr.reshape(-1)
            best = np.argsort(-flat, kind="stable")[:a.top]
            items += [{"node": name, "index": [int(i) for i in np.unravel_index(j, arr.shape)],
                       "flow": float(flat[j])} for j in best]
        count = int(sum(np.size(v) for v in f.values()))
        items.sort(key=lambda d: -d["flow"])   # stable: node order, then element order breaks ties
    else:
        key = "node" if a.by == "node" else "module"
        items = [{key: k, "flow": float(v)} for k, v in f.items()]
        count = len(items)
        items.sort(key=lambda d: -d["flow"])
    items = items[:a.top]
    out = {"file": a.file, "by": a.by, "count": count, "top": [dict(rank=r + 1, **d) for r, d in enumerate(items)]}

    def text():
        if a.by == "element":
            rows = [[r + 1, f"{d['node']}{d['index']}", f"{d['flow']:.6g}"] for r, d in enumerate(items)]
            head = ["rank", "element", "flow"]
        else:
            k = "node" if a.by == "node" else "module"
            rows = [[r + 1, d[k] or "<top level>", f"{d['flow']:.6g}"] for r, d in enumerate(items)]
            head = ["rank", k, "flow"]
        return f"gradient flow by {a.by} (top {len(items)} of {count})\n" + _table(rows, head)

    _emit(out, a.json, text)
    return 0


def cmd_render(a):
    from .export.dot import check_output, render
    if a.max_nodes < 3:
        raise UsageError(f"--max-nodes must be >= 3 (a sink, a source and an ellipsis), got {a.max_nodes}")
    _check_new_file(a.out, a.overwrite)
    fmt = check_output(a.out, None, overwrite=a.overwrite)
    g = _load(a.file)
    if a.source is not None:
        g.source_index(a.source)
    # the diagram hides view hops itself; asking for them keeps every local derivative at hand
    paths = g.top_paths(k=a.k, order=a.order, source=a.source, include_views=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        render(g, paths, a.out, fmt, overwrite=a.overwrite, collapse=a.collapse,
               include_views=a.include_views, max_nodes=a.max_nodes)
    for w in caught:     # e.g. the node cap: one plain line each, not a Python warning
        print(f"gradgraph: note: {' '.join(str(w.message).split())}", file=sys.stderr)
    print(f"wrote {a.out}: top {len(paths)} paths, collapse={a.collapse}")
    return 0


def _check_k(k):
    if k < 1:
        raise UsageError(f"--k must be >= 1, got {k}")


def cmd_report(a):
    from .export.report import check_report_output, report
    _check_k(a.k)
    check_report_output(a.out, a.overwrite)
    g = _load(a.file)
    report(g, a.out, a.k, order=a.order, tokens=a.tokens, overwrite=a.overwrite,
           source_file=os.path.basename(a.file))
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.2f} MB): top {a.k} paths of "
          f"{g.sink_node.name} = {g.sink_value:.6g}")
    return 0


def cmd_export(a):
    from .export.graphjson import write_json
    from .export.report import check_report_output
    if a.flow_threshold is not None and a.k is not None:
        raise UsageError("pass either --k or --flow-threshold, not both")
    k = 20 if a.k is None else a.k
    _check_k(k)
    check_report_output(a.json, a.overwrite)
    g = _load(a.file)
    kw = {"flow_threshold": a.flow_threshold} if a.flow_threshold is not None else {"k": k, "order": a.order}
    data = write_json(g, a.json, overwrite=a.overwrite, **kw)
    print(f"wrote {a.json} ({os.path.getsize(a.json) / 1e6:.2f} MB): {len(data['nodes'])} nodes, "
          f"{len(data['links'])} links")
    return 0


# ============================================================================ parser
_EPILOG = {
    "capture": """examples:
  gradgraph capture examples/tiny_bert.py:build --out bert.safetensors
  gradgraph capture mypkg.models:build --out g.safetensors --granularity primitive
  gradgraph capture spec.py:build --out g.safetensors --sources bert.embeddings.word_embeddings --overwrite

SPEC names a function taking no arguments that returns (model, args, kwargs, output_fn):
output_fn maps the model's output to the scalar to explain (None if it already is one).""",
    "info": """examples:
  gradgraph info bert.safetensors
  gradgraph info bert.safetensors --json""",
    "paths": """examples:
  gradgraph paths bert.safetensors --k 10
  gradgraph paths bert.safetensors --k 5 --order magnitude --source bert.embeddings.word_embeddings --json""",
    "entropy": """examples:
  gradgraph entropy bert.safetensors
  gradgraph entropy bert.safetensors --per-source --json""",
    "flow": """examples:
  gradgraph flow bert.safetensors --by module --top 20
  gradgraph flow bert.safetensors --by element --top 5 --json""",
    "render": """examples:
  gradgraph render bert.safetensors --k 5 -o top.svg
  gradgraph render bert.safetensors --k 3 --collapse none -o top.png
  gradgraph render bert.safetensors --k 5 -o top.dot        # needs no Graphviz

.svg, .png and .pdf need the Graphviz 'dot' program (apt-get install graphviz / brew install graphviz).""",
    "report": """examples:
  gradgraph report bert.safetensors -o report.html
  gradgraph report bert.safetensors -o report.html --k 10 --tokens "[CLS]" the cat sat "[SEP]"

One HTML file that opens offline: summary, top paths beside their diagram, per-token views,
layer x component flow, path lengths (docs/user-guide.md).""",
    "export": """examples:
  gradgraph export bert.safetensors --json top.json --k 20
  gradgraph export bert.safetensors --json flow.json --flow-threshold 0.01

The pruned scalar graph in networkx's node-link layout (docs/file-format.md).""",
}


def build_parser():
    p = _Parser(prog="gradgraph", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Gradient-path interpretability: capture a model's gradient graph once, "
                            "then query the saved file (top paths, entropy, flow, diagrams) without the model.",
                epilog="run 'gradgraph COMMAND --help' for the options and examples of each command; "
                       "JSON schemas: docs/cli.md")
    p.add_argument("--version", action="version", version=f"gradgraph {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=_EPILOG[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    c = cmd("capture", "capture the gradient graph of a model built by a spec function and save it")
    c.add_argument("spec", metavar="SPEC", help="path/to/file.py:function or package.module:function")
    c.add_argument("--out", "-o", required=True, metavar="FILE", help="graph file to write (.safetensors)")
    c.add_argument("--granularity", choices=["function", "primitive"], default="function",
                   help="ATen ops with softmax/layer norm/GELU whole (function, default) or fully "
                        "decomposed as in the paper's implementation (primitive)")
    c.add_argument("--sources", nargs="+", metavar="NAME",
                   help="source names: input names, module paths or fx node names "
                        "(default: floating inputs, or the embedding lookups of integer inputs)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.add_argument("--values", choices=["needed", "all"], default="needed",
                   help="node values the file holds: those the Jacobians reference and the sources' "
                        "and the sink's (needed, default; every query works on them) or every "
                        "node's (all: a larger file)")
    c.add_argument("--progress", action="store_true",
                   help="always show the progress bar (default: on a terminal, for large graphs)")
    c.set_defaults(func=cmd_capture)

    c = cmd("info", "summarise a saved graph")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--json", action="store_true", help="machine-readable output (docs/cli.md)")
    c.set_defaults(func=cmd_info)

    c = cmd("paths", "the k highest-weighted gradient paths")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--k", "-k", type=int, default=10, help="number of paths (default 10)")
    c.add_argument("--order", choices=["signed", "magnitude"], default="signed",
                   help="most positive weight first (signed, the paper's) or largest |weight| first")
    c.add_argument("--source", metavar="NAME", help="only paths ending in this source")
    c.add_argument("--include-views", action="store_true", help="list pure data-movement hops too")
    c.add_argument("--json", action="store_true", help="machine-readable output (docs/cli.md)")
    c.set_defaults(func=cmd_paths)

    c = cmd("entropy", "entropy (nats) of the distribution over gradient paths")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--per-source", action="store_true", help="also one entropy per source element")
    c.add_argument("--json", action="store_true", help="machine-readable output (docs/cli.md)")
    c.set_defaults(func=cmd_entropy)

    c = cmd("flow", "gradient flow (total |path weight|) through nodes, modules or elements")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--by", choices=["node", "module", "element"], default="module")
    c.add_argument("--top", type=int, default=20, help="how many of the largest to list (default 20)")
    c.add_argument("--json", action="store_true", help="machine-readable output (docs/cli.md)")
    c.set_defaults(func=cmd_flow)

    c = cmd("render", "draw the top paths as a Graphviz diagram (svg, png, pdf or dot)")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--out", "-o", required=True, metavar="OUT", help="out.svg, out.png, out.pdf or out.dot")
    c.add_argument("--k", "-k", type=int, default=5, help="number of paths (default 5)")
    c.add_argument("--order", choices=["signed", "magnitude"], default="signed")
    c.add_argument("--source", metavar="NAME", help="only paths ending in this source")
    c.add_argument("--collapse", choices=["module", "op", "none"], default="module",
                   help="one box per module run (default), per tensor, or per scalar element")
    c.add_argument("--include-views", action="store_true", help="draw pure data-movement hops too")
    c.add_argument("--max-nodes", type=int, default=200, help="cap on boxes, >= 3 (default 200)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c.set_defaults(func=cmd_render)

    c = cmd("report", "write an interactive HTML report of a graph (one self-contained file)")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--out", "-o", required=True, metavar="OUT", help="the .html file to write")
    c.add_argument("--k", "-k", type=int, default=20, help="number of top paths (default 20)")
    c.add_argument("--order", choices=["signed", "magnitude"], default="signed")
    c.add_argument("--tokens", nargs="+", metavar="TOKEN",
                   help="one label per token position (default: labels saved with the graph, else positions)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c.set_defaults(func=cmd_report)

    c = cmd("export", "export the pruned graph of the top paths (or of high-flow elements) as JSON")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--json", required=True, metavar="OUT", help="the .json file to write")
    c.add_argument("--k", "-k", type=int, default=None, help="number of top paths (default 20)")
    c.add_argument("--order", choices=["signed", "magnitude"], default="signed")
    c.add_argument("--flow-threshold", type=float, metavar="X",
                   help="instead of paths: the elements carrying at least this fraction of all |gradient|")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c.set_defaults(func=cmd_export)

    _add_batch_commands(sub)
    _add_experiment_command(sub)
    # one --threads for the whole command line, accepted before or after the command's name
    _add_threads_option(p, None)
    for c in sub.choices.values():
        _add_threads_option(c, argparse.SUPPRESS)
    return p


def _threads(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def _add_threads_option(parser, default):
    parser.add_argument("--threads", type=_threads, metavar="N", default=default,
                        help="threads for every pool (torch, numba, numpy's BLAS; gg.set_num_threads); "
                             "default: torch's default, all cores")


# ============================================================================ batch, batch-status
_BATCH_EPILOG = """examples:
  gradgraph batch study.py:Builder --items items.jsonl --queries queries.json --out results/
  gradgraph batch study.py:build --items items.json --queries queries.yaml --out results/ --engine dask --workers 4
  gradgraph batch study.py:Builder --items items.jsonl --queries queries.json --out results/ \\
      --engine dask --scheduler tcp://10.0.0.5:8786
  gradgraph batch-status results/

SPEC names a function item -> (model, args, kwargs, output_fn), or a class whose instance has
setup() -> model and inputs(item) -> (args, kwargs, output_fn). Items: a JSON list or JSON lines,
each a dict with an "id". Queries: a JSON or YAML list of query specs (docs/batch.md). A re-run
with the same --out computes only missing or failed items."""


def _load_build(spec):
    """The build named by ``path/to/file.py:name`` or ``package.module:name`` (a class is instantiated)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UsageError(f"bad spec {spec!r}: use path/to/file.py:name or package.module:name")
    try:
        if target.endswith(".py") or os.sep in target or "/" in target:
            if not os.path.isfile(target):
                raise UsageError(f"bad spec {spec!r}: file {target} does not exist")
            modname = "_gradgraph_spec_" + os.path.splitext(os.path.basename(target))[0]
            mspec = importlib.util.spec_from_file_location(modname, target)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[modname] = module
            mspec.loader.exec_module(module)
            import cloudpickle    # workers cannot import this file by name: send its code along
            cloudpickle.register_pickle_by_value(module)
        else:
            module = importlib.import_module(target)
    except GradGraphError:
        raise
    except Exception as exc:
        raise UsageError(f"bad spec {spec!r}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
    build = getattr(module, name, None)
    if build is None:
        raise UsageError(f"bad spec {spec!r}: {target} has no {name!r}")
    if isinstance(build, type):
        try:
            build = build()
        except Exception as exc:
            raise UsageError(f"bad spec {spec!r}: {name}() failed: {type(exc).__name__}: {exc}") from exc
    return build


def _load_items(path):
    from .batch.queries import read_text
    text = read_text(path, "--items", UsageError)
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UsageError(f"--items {path} is neither a JSON list nor JSON lines: {exc}") from None


def cmd_batch(a):
    from .batch import load_queries, run
    if a.workers is not None and a.workers < 0:
        raise UsageError("--workers must be >= 0")
    queries = load_queries(a.queries)
    items = _load_items(a.items)
    build = _load_build(a.spec)
    s = run(items, build, queries, a.out, engine=a.engine, workers=a.workers, scheduler=a.scheduler,
            resume=not a.no_resume, force=a.force, progress=True if a.progress else None)
    for note in s.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{s.computed} computed ({s.failed} failed), {s.skipped} already done, {s.items} items; "
          f"{s.seconds:.1f} s; results in {a.out}")
    return 0


def cmd_batch_status(a):
    from .batch import status
    st = status(a.dir)
    if a.json:
        json.dump(st, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{st['items']} items: {st['done']} done, {st['failed']} failed, {st['missing']} missing")
    for item, et, err in st["failures"]:
        print(f"failed {item}: {et}: {err}")
    return 0


def _add_batch_commands(sub):
    fmt = argparse.RawDescriptionHelpFormatter
    h = "capture and query many inputs (local processes or Dask), resumably, into a Parquet table"
    c = sub.add_parser("batch", help=h, description=h, epilog=_BATCH_EPILOG, formatter_class=fmt)
    c.add_argument("spec", metavar="SPEC", help="path/to/file.py:name or package.module:name (function or class)")
    c.add_argument("--items", required=True, metavar="FILE", help="JSON list or JSON lines of items with an 'id'")
    c.add_argument("--queries", required=True, metavar="FILE", help="JSON or YAML list of query specs")
    c.add_argument("--out", "-o", required=True, metavar="DIR", help="results folder (resumed if it exists)")
    c.add_argument("--engine", choices=["local", "dask"], default="local")
    c.add_argument("--workers", type=int, metavar="N", help="worker processes (default: one per CPU; 0: this process)")
    c.add_argument("--scheduler", metavar="ADDR", help="Dask scheduler, e.g. tcp://host:8786 (default: a local cluster)")
    c.add_argument("--force", action="store_true", help="accept a folder written with other queries: recompute every item")
    c.add_argument("--no-resume", action="store_true", help="recompute items already done")
    c.add_argument("--progress", action="store_true", help="always show the progress bar (default: on a terminal)")
    c.set_defaults(func=cmd_batch)
    h = "done / failed / missing counts of a batch results folder, and the failures' messages"
    c = sub.add_parser("batch-status", help=h, description=h, formatter_class=fmt,
                       epilog="example:\n  gradgraph batch-status results/")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_batch_status)


# ============================================================================ experiment
_EXPERIMENTS = ("first-token", "sva", "entropy-checks")


def cmd_experiment(a):
    """Run one of the paper's studies (gradgraph.experiments) and write its tables and figures."""
    import importlib
    module = {"first-token": "first_token", "sva": "sva", "entropy-checks": "entropy_checks"}[a.name]
    study = importlib.import_module(f"gradgraph.experiments.{module}")
    if a.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {a.workers}")
    out = a.out or os.path.join("out", "experiments", a.name)
    kwargs = {}
    if a.name in ("sva", "entropy-checks") and a.checkpoint:
        kwargs["checkpoint"] = a.checkpoint
    if a.name == "sva":
        kwargs.update(sink=a.sink, tsv=a.tsv)
    elif a.sink != "logprob" or a.tsv:
        raise UsageError(f"--sink and --tsv apply to the sva study only, not {a.name}")
    if a.checkpoint and a.name == "first-token":
        raise UsageError("--checkpoint applies to sva and entropy-checks, not first-token")
    study.run(out, quick=a.quick, workers=a.workers, engine=a.engine, overwrite=a.overwrite, **kwargs)
    return 0


def _add_experiment_command(sub):
    help_ = "run one of the paper's studies and write its tables (CSV) and figures (PNG)"
    c = sub.add_parser("experiment", help=help_, description=help_,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="""examples:
  gradgraph experiment first-token --out out/first-token
  gradgraph experiment sva --quick
  gradgraph experiment sva --checkpoint path/to/bert_uncased_L-6_H-512_A-8 --tsv lgd_dataset.tsv
  gradgraph experiment entropy-checks --workers 2
  gradgraph experiment first-token --workers 2 --engine dask

Studies and their outputs: docs/experiments.md.""")
    c.add_argument("name", choices=_EXPERIMENTS, metavar="NAME", help=", ".join(_EXPERIMENTS))
    c.add_argument("--quick", action="store_true", help="a small version (about a minute or two)")
    c.add_argument("--out", "-o", metavar="DIR", help="output folder (default: out/experiments/NAME)")
    c.add_argument("--workers", type=int, default=1,
                   help="processes for the per-item loop, through the batch runner (default 1: this process)")
    c.add_argument("--engine", choices=["local", "dask"], default="local",
                   help="local processes (default) or a Dask LocalCluster of --workers processes")
    c.add_argument("--overwrite", action="store_true",
                   help="replace the study's files in --out and recompute every item")
    c.add_argument("--checkpoint", metavar="DIR",
                   help="sva, entropy-checks: a local BertForMaskedLM checkpoint directory "
                        "(default: the bundled agreement model)")
    c.add_argument("--sink", choices=["logprob", "logit"], default="logprob",
                   help="sva: difference of the verb forms' log-probabilities (default) or logits")
    c.add_argument("--tsv", metavar="FILE", help="sva: agreement pairs in the Goldberg (2019) TSV format")
    c.set_defaults(func=cmd_experiment)


def _version():
    from . import __version__
    return __version__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """gradgraph's own warnings (non-finite values, no path) as one line, like its errors."""
    if issubclass(category, GradGraphWarning):
        print(f"gradgraph: warning: {' '.join(str(message).split())}", file=sys.stderr)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


def main(argv=None):
    """Run the command line; returns the exit status (0 ok, 2 user error)."""
    try:
        a = build_parser().parse_args(argv)
        if a.threads is not None:
            from .threads import set_num_threads
            set_num_threads(a.threads)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return a.func(a)
    except GradGraphError as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"gradgraph: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:   # `gradgraph ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:   # an unwritable output path and the like
        print(f"gradgraph: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("gradgraph: error: out of memory: the graph or the query needs more memory than this "
              "machine has", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradgraph: interrupted", file=sys.stderr)
        return 130


def _entry():
    sys.exit(main())


if __name__ == "__main__":
    _entry()
