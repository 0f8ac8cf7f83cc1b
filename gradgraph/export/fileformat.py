"""The gradgraph file format: one safetensors file holding a whole :class:`~gradgraph.graph.GradGraph`.

Layout (see ``docs/file-format.md``):

* the **arrays** -- node values and every Jacobian's arrays -- are the safetensors tensors. An array
  used by several nodes or edges (a weight matrix, an activation that is also the other operand of
  a matrix product) is stored once: arrays are deduplicated by memory identity, and a view that
  permutes the axes of a contiguous block (``W.T`` of a linear layer, the head split of attention)
  is stored as that block plus the axis order, never as a copy;
* the **structure** -- nodes (every field but the value), edges (Jacobian kind, parameters, array
  references, argument position), sources, sink, granularity and meta -- is JSON in the
  safetensors metadata, under the keys ``format`` (``"gradgraph"``), ``version`` and ``graph``.

Loading parses only the safetensors header, JSON and raw little-endian arrays: nothing is unpickled
or executed. Every defect of a file is reported as :class:`~gradgraph.errors.GraphFormatError`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

import numpy as np

from ..errors import GradGraphError, GraphFormatError
from ..graph import Edge, GradGraph, Node
from ..jacobians import JACOBIAN_KINDS

__all__ = ["save", "load", "FORMAT", "VERSION", "GraphFileExistsError"]

FORMAT = "gradgraph"
#: Version written by this gradgraph; files of a larger version are refused with a clear message.
VERSION = 1

_NODE_FIELDS = [f.name for f in dataclasses.fields(Node) if f.name != "value"]


#: Integer arrays at least this long that are arithmetic progressions are stored as (start, step).
_MIN_ARANGE = 16


class GraphFileExistsError(GradGraphError, FileExistsError):
    """``save`` was asked to write over an existing file without ``overwrite=True``."""


# ============================================================================ save
class _ArrayTable:
    """Collects the arrays to write, each distinct block of memory once.

    A reference to an array is ``{"a": name, "shape": [...], "axes": [...]}``: with ``axes`` absent,
    the stored contiguous array reshaped to ``shape`` is the value; otherwise the value is the view
    ``v`` of ``shape`` whose ``v.transpose(axes)`` is the stored array (reshaped), i.e. ``axes``
    lists the value's axes from the largest stride to the smallest (``[1, 0]`` for ``W.T``).
    A 1-d integer arithmetic progression (the index map of a reshape or slice) is stored as no
    array at all: ``{"arange": [start, step], "dtype": "<i4", "shape": [n]}``.
    Two arrays are the same block when they start at the same address and cover the same number
    of bytes with the same dtype, both C-contiguous after ordering their axes by stride.
    """

    def __init__(self):
        self.arrays = {}          # name -> contiguous array to write
        self._by_memory = {}      # (address, nbytes, dtype) -> name
        self._alive = []          # keeps every referenced block alive, so no address is reused

    def ref(self, arr, name):
        arr = np.asarray(arr)
        if arr.dtype.byteorder == ">" or arr.dtype.kind not in "biuf":
            raise GradGraphError(f"cannot save array {name!r} of dtype {arr.dtype}: only little-endian "
                                 f"bool, integer and floating-point arrays can be saved")
        self._alive.append(arr)
        shape = list(arr.shape)
        if arr.ndim == 1 and arr.dtype.kind in "iu" and len(arr) >= _MIN_ARANGE:
            step = int(arr[1]) - int(arr[0])
            if (np.diff(arr) == step).all():    # index maps of views and slices: no data needed
                return {"arange": [int(arr[0]), step], "dtype": arr.dtype.str, "shape": shape}
        ref = {"a": None, "shape": shape}
        base = arr
        if not arr.flags.c_contiguous:
            axes = sorted(range(arr.ndim), key=lambda a: -arr.strides[a])
            if arr.transpose(axes).flags.c_contiguous:
                base = arr.transpose(axes)
                ref["axes"] = axes
            else:
                base = np.ascontiguousarray(arr)    # broadcast, flipped or strided: stored as a copy
        key = (base.__array_interface__["data"][0], base.nbytes, base.dtype.str)
        stored = self._by_memory.get(key) if base.nbytes else None
        if stored is None:
            stored = name
            self.arrays[name] = base
            self._by_memory[key] = name
        ref["a"] = stored
        return ref


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _document(g, table):
    nodes = []
    for i, n in enumerate(g.nodes):
        d = {f: getattr(n, f) for f in _NODE_FIELDS}
        d["shape"] = [int(s) for s in n.shape]
        d["value"] = None if n.value is None else table.ref(n.value, f"node{i}.value")
        nodes.append(d)
    edges = []
    for k, e in enumerate(g.edges):
        params, arrays = e.jac.state()
        edges.append({"src": int(e.src), "dst": int(e.dst), "arg": int(e.arg), "kind": e.jac.kind,
                      "out_shape": list(e.jac.out_shape), "in_shape": list(e.jac.in_shape),
                      "params": params,
                      "arrays": {a: table.ref(v, f"edge{k}.{a}") for a, v in arrays.items()}})
    return {"granularity": g.granularity, "sink": int(g.sink),
            "sources": {str(s): int(i) for s, i in g.sources.items()},
            "meta": g.meta, "nodes": nodes, "edges": edges}


def save(g, path, *, overwrite=False):
    """Write graph ``g`` to the safetensors file ``path``.

    The file is written to a temporary file in the same directory and renamed over ``path`` when
    complete, so ``path`` is either untouched or holds the whole graph; nothing is left behind on
    failure.

    Parameters
    ----------
    g : GradGraph
    path : str or os.PathLike
    overwrite : bool
        Replace an existing file. Without it an existing ``path`` raises
        :class:`GraphFileExistsError`.

    Returns
    -------
    str
        The path written.

    Examples
    --------
    >>> g.save("graph.safetensors")
    >>> g2 = gradgraph.load("graph.safetensors")
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise GraphFileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    table = _ArrayTable()
    try:
        graph_json = json.dumps(_document(g, table), default=_json_default, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise GradGraphError(f"cannot save the graph: its meta or Jacobian parameters are not "
                             f"JSON-serialisable ({exc})") from exc
    metadata = {"format": FORMAT, "version": str(VERSION), "graph": graph_json}
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise GradGraphError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        save_file(table.arrays, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)     # mkstemp's private 0600 would outlive the rename
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise GradGraphError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return path


# ============================================================================ load
def _fail(path, msg):
    return GraphFormatError(f"{path}: {msg}")


def _read(path):
    """(metadata dict, {name: array}) of a safetensors file, or GraphFormatError."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise _fail(path, "no such file" if not os.path.exists(path) else "not a regular file")
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata()
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:   # safetensors reports a bad header, truncation, bad offsets, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(path, f"not a valid safetensors file (truncated or corrupt?): {first}") from None
    return metadata or {}, arrays


_INDEX_DTYPES = {np.dtype(t).str for t in (np.int32, np.int64, np.uint32, np.uint64)}


def _check(cond, path, msg):
    if not cond:
        raise _fail(path, msg)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(x):
    return isinstance(x, list) and all(_is_int(s) and s >= 0 for s in x)


def _resolve(ref, arrays, path, where, max_arange=0):
    """The array a reference names, reshaped (and its axes permuted) as the reference says.
    An arange reference may have at most ``max_arange`` elements (it allocates on load)."""
    if isinstance(ref, dict) and "arange" in ref:
        r, dt, shape = ref["arange"], ref.get("dtype"), ref.get("shape")
        _check(isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r) and _shape(shape)
               and len(shape) == 1 and dt in _INDEX_DTYPES, path, f"{where}: malformed arange {ref!r}")
        _check(shape[0] <= max_arange, path, f"{where}: arange of {shape[0]} entries is longer than "
                                             f"its Jacobian has entries ({max_arange})")
        return r[0] + r[1] * np.arange(shape[0], dtype=np.dtype(dt))
    _check(isinstance(ref, dict) and isinstance(ref.get("a"), str) and _shape(ref.get("shape")),
           path, f"{where}: malformed array reference {ref!r}")
    name, shape, axes = ref["a"], tuple(ref["shape"]), ref.get("axes")
    _check(axes is None or (isinstance(axes, list) and sorted(axes) == list(range(len(shape)))), path,
           f"{where}: axes {axes!r} is not a permutation of the {len(shape)} axes")
    _check(name in arrays, path, f"{where}: array {name!r} is missing from the file")
    a = arrays[name]
    _check(a.size == math.prod(shape), path,
           f"{where}: array {name!r} has {a.size} elements but shape {list(shape)} needs {math.prod(shape)}")
    if axes is not None:
        return a.reshape([shape[k] for k in axes]).transpose(np.argsort(axes))
    return a.reshape(shape)


def _check_jacobian(kind, out_shape, in_shape, params, arrays, path, where):
    """Reject arrays whose shapes or indices would make the kernels read out of bounds."""
    n_out, n_in = math.prod(out_shape), math.prod(in_shape)
    for k in (k for k in arrays if k not in ("rows", "cols")):
        _check(arrays[k].dtype.kind == "f", path, f"{where}: array {k!r} must be floating point")
    if kind == "sparse":
        m = params.get("n")
        _check(_is_int(m) and m >= 0, path, f"{where}: malformed entry count {m!r}")
        for k, a in arrays.items():
            _check(a.ndim == 1 and len(a) == m, path, f"{where}: {k} must be 1-d with {m} entries")
        for k, bound in (("rows", n_out), ("cols", n_in)):
            if k in arrays:
                a = arrays[k]
                _check(a.dtype.kind in "iu", path, f"{where}: {k} must be integers")
                _check(a.size == 0 or (a.min() >= 0 and a.max() < bound), path,
                       f"{where}: {k} index out of range [0, {bound})")
            else:
                _check(m <= bound, path, f"{where}: {m} implicit {k} run past {bound}")
    elif kind == "matmul":
        o = arrays.get("other")
        _check(o is not None, path, f"{where}: array 'other' is missing")
        s3 = lambda s: tuple(s) if len(s) == 3 else (1,) + tuple(s)   # noqa: E731
        _check(len(in_shape) in (2, 3) and len(out_shape) == len(in_shape) and o.ndim in (2, 3), path,
               f"{where}: matmul shapes must be 2-d or 3-d")
        (b, i, t), (bo, io, jo), ob = s3(in_shape), s3(out_shape), s3(o.shape)
        ok = (ob[0] in (1, b) and bo == b and
              ((params.get("wrt") == "left" and ob[1] == t and io == i and jo == ob[2]) or
               (params.get("wrt") == "right" and ob[2] == i and io == ob[1] and jo == t)))
        _check(ok, path, f"{where}: operand shape {list(o.shape)} does not fit {list(in_shape)} -> "
                         f"{list(out_shape)} (wrt={params.get('wrt')!r})")
    elif kind == "conv":
        w = arrays.get("weight")
        _check(w is not None and w.ndim in (3, 4) and len(in_shape) == w.ndim == len(out_shape), path,
               f"{where}: convolution weight and input must both be 3-d or 4-d")
        try:
            s, p, d, grp = (list(params[k]) if k != "groups" else int(params[k])
                            for k in ("stride", "padding", "dilation", "groups"))
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"{where}: malformed convolution parameters {params!r}") from None
        nsp = w.ndim - 2
        _check(grp >= 1 and len(s) == len(p) == len(d) == nsp and all(v >= 1 for v in s + d)
               and all(v >= 0 for v in p), path, f"{where}: malformed convolution parameters {params!r}")
        expect = [in_shape[0], w.shape[0]] + [
            (in_shape[2 + a] + 2 * p[a] - d[a] * (w.shape[2 + a] - 1) - 1) // s[a] + 1 for a in range(nsp)]
        _check(list(out_shape) == expect and in_shape[1] == w.shape[1] * grp and w.shape[0] % grp == 0,
               path, f"{where}: convolution shapes do not fit ({list(in_shape)} * {list(w.shape)} -> "
                     f"{list(out_shape)})")
    elif kind == "rowblock":
        try:
            o_, d_, i_ = int(params["outer"]), int(params["d"]), int(params["inner"])
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"{where}: malformed row-block parameters {params!r}") from None
        _check(min(o_, d_, i_) >= 0 and o_ * d_ * i_ == n_out == n_in, path,
               f"{where}: row layout {o_}x{d_}x{i_} does not match shape {list(out_shape)}")
        sizes = {"A": o_ * i_ * d_, "rstd": o_ * i_, "gamma": d_}
        for k, n in sizes.items():
            _check(k not in arrays or arrays[k].size == n, path, f"{where}: array {k!r} must have {n} elements")


def _build(doc, arrays, path):
    _check(isinstance(doc, dict), path, "the graph description is not a JSON object")
    for key, typ in (("nodes", list), ("edges", list), ("sources", dict), ("meta", dict),
                     ("granularity", str)):
        _check(isinstance(doc.get(key), typ), path, f"the graph description lacks a valid {key!r}")
    nodes = []
    for i, d in enumerate(doc["nodes"]):
        where = f"node {i}"
        _check(isinstance(d, dict) and isinstance(d.get("name"), str) and _shape(d.get("shape")),
               path, f"{where}: malformed node {str(d)[:200]}")
        fields = {f: d[f] for f in _NODE_FIELDS if f in d}
        for f in ("op", "dtype", "module", "module_type", "source_line", "role", "fx_name"):
            _check(isinstance(fields.get(f, ""), str), path, f"{where}: field {f!r} must be a string")
        fields["shape"] = tuple(d["shape"])
        value = None if d.get("value") is None else _resolve(d["value"], arrays, path, where)
        _check(value is None or value.shape == fields["shape"], path,
               f"{where}: value shape {None if value is None else list(value.shape)} != node shape {d['shape']}")
        try:
            nodes.append(Node(value=value, **fields))
        except TypeError as exc:
            raise _fail(path, f"{where}: {exc}") from None
    n = len(nodes)
    _check(len({nd.name for nd in nodes}) == n, path, "node names are not unique")
    edges = []
    for k, d in enumerate(doc["edges"]):
        where = f"edge {k}"
        _check(isinstance(d, dict), path, f"{where}: malformed edge")
        src, dst = d.get("src"), d.get("dst")
        _check(_is_int(src) and _is_int(dst) and 0 <= src < n and 0 <= dst < n, path,
               f"{where}: node index out of range (src={src!r}, dst={dst!r}, {n} nodes)")
        _check(src < dst, path, f"{where}: goes from node {src} back to node {dst}; nodes must be in "
                                f"topological order")
        kind = d.get("kind")
        _check(kind in JACOBIAN_KINDS, path, f"{where}: unknown Jacobian kind {kind!r} "
                                             f"(known: {sorted(JACOBIAN_KINDS)})")
        out_shape, in_shape = d.get("out_shape"), d.get("in_shape")
        _check(_shape(out_shape) and tuple(out_shape) == nodes[dst].shape, path,
               f"{where}: out_shape {out_shape!r} != shape {list(nodes[dst].shape)} of node {dst}")
        _check(_shape(in_shape) and tuple(in_shape) == nodes[src].shape, path,
               f"{where}: in_shape {in_shape!r} != shape {list(nodes[src].shape)} of node {src}")
        params, refs = d.get("params"), d.get("arrays")
        _check(isinstance(params, dict) and isinstance(refs, dict) and _is_int(d.get("arg", 0)), path,
               f"{where}: malformed params, arrays or arg")
        dense = math.prod(out_shape) * math.prod(in_shape)
        arrs = {name: _resolve(ref, arrays, path, f"{where}.{name}", dense) for name, ref in refs.items()}
        _check_jacobian(kind, tuple(out_shape), tuple(in_shape), params, arrs, path, where)
        try:
            jac = JACOBIAN_KINDS[kind].from_state(tuple(out_shape), tuple(in_shape), params, arrs)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _fail(path, f"{where}: cannot rebuild the {kind} Jacobian: {type(exc).__name__}: {exc}") \
                from None
        edges.append(Edge(src, dst, jac, d.get("arg", 0)))
    sink = doc.get("sink")
    _check(_is_int(sink) and 0 <= sink < n, path, f"sink index {sink!r} out of range ({n} nodes)")
    for name, i in doc["sources"].items():
        _check(_is_int(i) and 0 <= i < n, path, f"source {name!r}: node index {i!r} out of range ({n} nodes)")
    return GradGraph(nodes, edges, doc["sources"], sink, doc["granularity"], doc["meta"])


def load(path):
    """Read a graph written by :func:`save`.

    Only the safetensors header, JSON and raw arrays are read: nothing is unpickled or executed.
    The graph answers every query without the model.

    Raises
    ------
    GraphFormatError
        The file is missing, not a safetensors file, truncated or corrupt, not a gradgraph graph,
        written by a newer gradgraph, or internally inconsistent (missing arrays, shape
        mismatches, indices out of range). The message says which.
    """
    path = os.fspath(path)
    metadata, arrays = _read(path)
    fmt = metadata.get("format")
    _check(fmt == FORMAT, path, "not a gradgraph graph (a safetensors file without gradgraph metadata"
                                + (f"; its format is {fmt!r})" if fmt else ")"))
    try:
        version = int(metadata.get("version", ""))
    except ValueError:
        raise _fail(path, f"malformed format version {metadata.get('version')!r}") from None
    _check(version <= VERSION, path, f"written by a newer gradgraph (file format version {version}, this "
                                     f"gradgraph reads up to {VERSION}); upgrade gradgraph to read it")
    _check(version >= 1, path, f"invalid format version {version}")
    _check("graph" in metadata, path, "the graph description (metadata key 'graph') is missing")
    try:
        doc = json.loads(metadata["graph"])
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"the graph description is not valid JSON: {exc}") from None
    try:
        return _build(doc, arrays, path)
    except GraphFormatError:
        raise
    except Exception as exc:   # any other inconsistency the checks above did not name
        raise _fail(path, f"inconsistent graph description: {type(exc).__name__}: {exc}") from None
