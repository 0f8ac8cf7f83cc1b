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
or executed. Declared sizes are checked against the data present before anything is allocated, only
referenced tensors are read, and the graph's invariants are checked; every defect of a file is
reported as :class:`~gradgraph.errors.GraphFormatError`. Saving is atomic, never replaces a file
without ``overwrite=True`` (even one created meanwhile), and gives the same bytes for the same graph.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from ..errors import GraphFormatError
from ..graph import Edge, GradGraph, Node
from ..jacobians import JACOBIAN_KINDS
from .filewriter import (_NP_DTYPE, FORMAT, VERSION, GraphFileExistsError, _graph_problem, _is_int,  # noqa: F401
                         node_fields, save)

__all__ = ["save", "load", "FORMAT", "VERSION", "GraphFileExistsError"]

_NODE_FIELDS = node_fields(Node)

#: The elements of all nodes without a value together are at most this many times the elements
#: the file stores.
VALUELESS_PER_STORED = 1024


# ============================================================================ load
def _fail(path, msg):
    return GraphFormatError(f"{path}: {msg}")


class _StoredArrays:
    """The tensors of an open safetensors file: dtype and shape from the header at once, the data
    of a tensor only when a reference asks for it -- unreferenced tensors are never read.

    With ``lazy``, a tensor is an array over a private memory map of the file (``mmap`` with
    copy-on-write: the file is never written): its pages are read when a query first touches
    them. Otherwise it is read at once, straight into the array (no second copy)."""

    def __init__(self, path, f, entries, data_start, lazy=False):
        self.path, self._f, self._entries, self._start = path, f, entries, data_start
        self._cache = {}
        self._map = None
        if lazy and entries:
            import mmap
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):    # a file system without memory maps: read instead
                self._map = None

    def __contains__(self, name):
        return name in self._entries

    def names(self):
        return list(self._entries)

    def numel(self, name):
        return math.prod(self._entries[name][1])

    def get(self, name):
        if name not in self._cache:
            dtype, shape, (begin, end) = self._entries[name]
            offset = self._start + begin
            if self._map is not None and end > begin and offset % dtype.itemsize == 0:
                self._cache[name] = np.frombuffer(self._map, dtype, math.prod(shape), offset).reshape(shape)
                return self._cache[name]
            # eager, empty, or misaligned (not written by gradgraph): an aligned copy
            a = np.empty(shape, dtype)
            if a.nbytes:
                self._f.seek(self._start + begin)
                if self._f.readinto(a.reshape(-1).view(np.uint8)) != end - begin:
                    raise _fail(self.path, f"tensor {name!r} is cut short (was the file changed while "
                                           f"it was read?)")
            self._cache[name] = a
        return self._cache[name]


def _open(path, lazy=False):
    """(metadata dict, :class:`_StoredArrays`, open file) of a safetensors file, or
    GraphFormatError. safetensors' own reader checks the header first (its message is the reason
    given); the header is then parsed again here for the byte offsets, and every tensor's dtype,
    shape and extent checked against the file's size."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise _fail(path, "no such file" if not os.path.exists(path) else "not a regular file")
    try:
        with safe_open(path, framework="np") as f:
            f.metadata()
    except Exception as exc:   # safetensors reports a bad header, truncation, bad offsets, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(path, f"not a valid safetensors file (truncated or corrupt?): {first}") from None
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        _check(8 + n <= size, path, "not a valid safetensors file (truncated or corrupt?): header too long")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise _fail(path, "not a valid safetensors file (truncated or corrupt?): bad header") from None
        _check(isinstance(header, dict), path, "not a valid safetensors file: the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        _check(isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()), path,
               "not a valid safetensors file: malformed metadata")
        entries, data_size = {}, size - 8 - n
        for name, e in header.items():
            ok = (isinstance(e, dict) and _shape(e.get("shape")) and isinstance(e.get("data_offsets"), list)
                  and len(e["data_offsets"]) == 2 and all(_is_int(v) for v in e["data_offsets"]))
            _check(ok, path, f"not a valid safetensors file: malformed entry of tensor {name!r}")
            dtype = _NP_DTYPE.get(e.get("dtype"))
            _check(dtype is not None, path, f"tensor {name!r} has dtype {e.get('dtype')!r}; a graph file "
                                            f"holds only {sorted(_NP_DTYPE)}")
            begin, end = e["data_offsets"]
            _check(0 <= begin <= end <= data_size and end - begin == math.prod(e["shape"]) * dtype.itemsize,
                   path, f"tensor {name!r}: its bytes [{begin}, {end}) do not fit its shape {e['shape']} "
                         f"or the file ({data_size} bytes of data)")
            entries[name] = (dtype, tuple(e["shape"]), (begin, end))
    except BaseException:
        f.close()
        raise
    return metadata, _StoredArrays(path, f, entries, 8 + n, lazy), f


_INDEX_DTYPES = {np.dtype(t).str for t in (np.int32, np.int64, np.uint32, np.uint64)}


def _check(cond, path, msg):
    if not cond:
        raise _fail(path, msg)


def _shape(x):
    return isinstance(x, list) and all(_is_int(s) and s >= 0 for s in x)


def _is_arange(ref):
    return isinstance(ref, dict) and "arange" in ref


def _resolve(ref, stored, path, where, max_arange=0):
    """The array a reference names, reshaped (and its axes permuted) as the reference says.

    The tensor's size in the header is checked against the reference before its data is read.
    An arange reference stores no data: it may have at most ``max_arange`` entries (the caller's
    bound from the data present) and its values must fit its dtype."""
    if _is_arange(ref):
        r, dt, shape = ref["arange"], ref.get("dtype"), ref.get("shape")
        _check(isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r) and _shape(shape)
               and len(shape) == 1 and dt in _INDEX_DTYPES, path, f"{where}: malformed arange {ref!r}")
        (start, step), n = r, shape[0]
        _check(n <= max_arange, path, f"{where}: arange of {n} entries is longer than the data of its "
                                      f"Jacobian allows ({max_arange})")
        # aranges are index maps: non-negative, and then start + step * i never leaves int64
        top = min(int(np.iinfo(np.dtype(dt)).max), 2**63 - 1)
        _check(n == 0 or (0 <= start <= top and 0 <= start + step * (n - 1) <= top),
               path, f"{where}: arange {r} of {n} entries leaves the index range [0, {top}] of {dt}")
        if step == 0 or n <= 1:              # (a single entry's step may be any number)
            return np.full(n, start, dtype=np.dtype(dt))
        a = np.arange(start, start + step * n, step, dtype=np.dtype(dt))[:n]
        _check(len(a) == n, path, f"{where}: arange {r} of {n} entries cannot be made")
        return a
    _check(isinstance(ref, dict) and isinstance(ref.get("a"), str) and _shape(ref.get("shape")),
           path, f"{where}: malformed array reference {ref!r}")
    name, shape, axes = ref["a"], tuple(ref["shape"]), ref.get("axes")
    _check(axes is None or (isinstance(axes, list) and sorted(axes) == list(range(len(shape)))), path,
           f"{where}: axes {axes!r} is not a permutation of the {len(shape)} axes")
    _check(name in stored, path, f"{where}: array {name!r} is missing from the file")
    _check(stored.numel(name) == math.prod(shape), path,
           f"{where}: array {name!r} has {stored.numel(name)} elements but shape {list(shape)} needs "
           f"{math.prod(shape)}")
    a = stored.get(name)
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


def _build(doc, stored, path, version):
    _check(isinstance(doc, dict), path, "the graph description is not a JSON object")
    for key, typ in (("nodes", list), ("edges", list), ("sources", dict), ("meta", dict),
                     ("granularity", str)):
        _check(isinstance(doc.get(key), typ), path, f"the graph description lacks a valid {key!r}")
    nodes = []
    # what a query allocates for the nodes without a value is bounded by the file's data, so a few
    # bytes of JSON cannot declare terabytes (a graph's values and weights are stored; the nodes
    # whose values are not held are at most a few hundred times their elements in real models)
    stored_elements = sum(stored.numel(name) for name in stored.names())
    budget, unheld = VALUELESS_PER_STORED * max(stored_elements, 1), 0
    for i, d in enumerate(doc["nodes"]):
        where = f"node {i}"
        _check(isinstance(d, dict) and isinstance(d.get("name"), str) and _shape(d.get("shape")),
               path, f"{where}: malformed node {str(d)[:200]}")
        fields = {f: d[f] for f in _NODE_FIELDS if f in d}
        for f in ("op", "dtype", "module", "module_type", "source_line", "role", "fx_name"):
            _check(isinstance(fields.get(f, ""), str), path, f"{where}: field {f!r} must be a string")
        # files written before nodes recorded their rule's flag have no data_movement: None makes
        # Node.is_view fall back to the op-name list graph.VIEW_OPS
        _check(fields.get("data_movement") in (None, True, False), path,
               f"{where}: field 'data_movement' must be true, false or null")
        fields["shape"] = tuple(d["shape"])
        # version 1 files hold every node's value; from version 2 a node may hold none, and its
        # size is then bounded by the file's data (below), as a stored value bounds it
        if d.get("value") is None:
            _check(version >= 2, path, f"{where}: no value (a version {version} graph holds the value "
                                       f"of every node)")
            unheld += math.prod(fields["shape"])
            _check(unheld <= budget, path,
                   f"{where}: the nodes without a value declare more elements than the "
                   f"{VALUELESS_PER_STORED} x {stored_elements} the file's data allows")
            value = None
        else:
            value = _resolve(d["value"], stored, path, where)
            _check(value.shape == fields["shape"], path,
                   f"{where}: value shape {list(value.shape)} != node shape {d['shape']}")
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
        params, refs, arg = d.get("params"), d.get("arrays"), d.get("arg", 0)
        _check(isinstance(params, dict) and isinstance(refs, dict) and _is_int(arg) and arg >= 0, path,
               f"{where}: malformed params, arrays or arg")
        # Stored arrays first: an arange (no data) may be as long as the longest of them or as the
        # larger node -- what an index map of a Jacobian without repeated entries needs -- never
        # longer, so a few bytes of JSON cannot declare gigabytes.
        arrs = {name: _resolve(ref, stored, path, f"{where}.{name}")
                for name, ref in refs.items() if not _is_arange(ref)}
        bound = max([math.prod(out_shape), math.prod(in_shape)] + [a.size for a in arrs.values()])
        arrs.update({name: _resolve(ref, stored, path, f"{where}.{name}", bound)
                     for name, ref in refs.items() if _is_arange(ref)})
        _check_jacobian(kind, tuple(out_shape), tuple(in_shape), params, arrs, path, where)
        try:
            jac = JACOBIAN_KINDS[kind].from_state(tuple(out_shape), tuple(in_shape), params, arrs)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _fail(path, f"{where}: cannot rebuild the {kind} Jacobian: {type(exc).__name__}: {exc}") \
                from None
        edges.append(Edge(src, dst, jac, arg))
    problem = _graph_problem(nodes, edges, doc["sources"], doc.get("sink"), doc["granularity"])
    _check(problem is None, path, problem)
    return GradGraph(nodes, edges, doc["sources"], doc["sink"], doc["granularity"], doc["meta"])


def load(path, *, lazy=True):
    """Read a graph written by :func:`save`.

    Only the safetensors header, JSON and raw arrays are read: nothing is unpickled or executed.
    Every size the file declares is checked against the data it holds before anything of that
    size is allocated, and the graph's invariants are checked (``docs/file-format.md``). The
    graph answers every query without the model.

    Parameters
    ----------
    path : str or os.PathLike
    lazy : bool
        True (default): the arrays are memory-mapped (copy-on-write, the file is never written),
        so a query reads only the parts of the file it touches and memory holds only those. The
        file may be deleted or replaced (as ``save(..., overwrite=True)`` does) while the graph is
        in use, but must not be truncated or rewritten in place. False: every referenced tensor
        is read into memory during ``load``; the graph is then independent of the file.

    Raises
    ------
    GraphFormatError
        The file is missing, not a safetensors file, truncated or corrupt, not a gradgraph graph,
        written by a newer gradgraph, or internally inconsistent (missing arrays, shape
        mismatches, indices out of range, broken invariants). The message says which.
    """
    path = os.fspath(path)
    metadata, stored, f = _open(path, lazy)
    with f:
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
            return _build(doc, stored, path, version)
        except GraphFormatError:
            raise
        except Exception as exc:   # any other inconsistency the checks above did not name
            raise _fail(path, f"inconsistent graph description: {type(exc).__name__}: {exc}") from None
