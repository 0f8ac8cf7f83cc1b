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

import dataclasses
import errno
import json
import math
import os
import re
import tempfile

import numpy as np
import torch

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


#: safetensors dtype names of the numpy dtypes a graph file holds (little-endian bool, int, float).
_ST_DTYPE = {"|b1": "BOOL", "|i1": "I8", "|u1": "U8", "<i2": "I16", "<u2": "U16", "<i4": "I32",
             "<u4": "U32", "<i8": "I64", "<u8": "U64", "<f2": "F16", "<f4": "F32", "<f8": "F64"}
_NP_DTYPE = {v: np.dtype(k) for k, v in _ST_DTYPE.items()}

#: Temporary files of a save: ``.NAME.gradgraph-tmp-PID-XXXXXXXX`` beside the target ``NAME``.
_TMP_MARK = ".gradgraph-tmp-"
_TMP_NAME = re.compile(r"^\..*\.gradgraph-tmp-(\d+)-[a-z0-9_]{8}$")

#: errno values of ``os.link`` on file systems without hard links (FAT, some network and FUSE ones)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def _safetensors_header(arrays, metadata):
    """The header of a safetensors file holding ``arrays`` (name -> contiguous array) and
    ``metadata``, and the arrays in file order: byte for byte the same for the same input.

    Tensors are laid out by decreasing item size, then name, so each starts aligned to its item
    size; the JSON has sorted keys and no spaces, and is padded with spaces to a multiple of 8
    bytes (as safetensors does)."""
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header, offset = {"__metadata__": metadata}, 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _ST_DTYPE[a.dtype.str], "shape": [int(s) for s in a.shape],
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, [arrays[k] for k in order]


def _write_safetensors(f, arrays, metadata):
    """Write a safetensors file to the open binary file ``f``, one array at a time (no copy of
    the whole file in memory)."""
    head, ordered = _safetensors_header(arrays, metadata)
    f.write(head)
    for a in ordered:
        if a.nbytes:
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)


def _pid_alive(pid):
    """Whether process ``pid`` of this machine may still be running (unknown counts as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):    # PermissionError: it runs, as another user
        return True
    return True


def _remove_stale_temporaries(directory):
    """Delete the temporary files that saves killed before they finished left in ``directory``
    (their process has ended). Only names of the form ``.NAME.gradgraph-tmp-PID-XXXXXXXX``."""
    if os.name != "posix":          # os.kill(pid, 0) is a liveness probe on POSIX only
        return
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _TMP_NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:         # removed by another save meanwhile, or not ours to remove
                pass


def _exists_error(path):
    return GraphFileExistsError(f"{path} already exists; pass overwrite=True to replace it")


def _publish_new(tmp, path):
    """Give the complete file ``tmp`` the name ``path`` only if ``path`` does not exist, atomically:
    two saves racing for one new name cannot both succeed."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here: claim the name exclusively (O_EXCL is atomic), then move the complete
        # file over the claim. A crash between the two leaves an empty file, never a torn graph.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise _exists_error(path) from None
        try:
            os.replace(tmp, path)
        except BaseException:
            os.remove(path)        # our own empty claim
            raise
    else:
        try:
            os.remove(tmp)         # the graph is saved; a temporary name left here is cleaned later
        except OSError:
            pass


def save(g, path, *, overwrite=False):
    """Write graph ``g`` to the safetensors file ``path``.

    The file is written completely (and flushed to disk) under a temporary name in the same
    directory, ``.NAME.gradgraph-tmp-PID-XXXXXXXX``, then given its name in one atomic step: ``path``
    is either untouched or holds the whole graph. Without ``overwrite`` the step fails if ``path``
    exists, even if another process created it meanwhile. Nothing is left behind on failure, and
    temporary files of saves that were killed (their process has ended) are removed from the
    directory. The same graph always gives the same bytes.

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

    Raises
    ------
    GraphFileExistsError
        ``path`` exists and ``overwrite`` is false.
    GradGraphError
        The graph breaks an invariant a file must meet (see ``docs/file-format.md``), its meta is
        not JSON-serialisable, or the file cannot be written (``cannot write PATH: reason``).

    Examples
    --------
    >>> g.save("graph.safetensors")
    >>> g2 = gradgraph.load("graph.safetensors")
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise _exists_error(path)
    problem = _graph_problem(g.nodes, g.edges, g.sources, g.sink, g.granularity)
    if problem:
        raise GradGraphError(f"cannot save the graph: {problem}")
    table = _ArrayTable()
    try:
        graph_json = json.dumps(_document(g, table), default=_json_default, allow_nan=True,
                                sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise GradGraphError(f"cannot save the graph: its meta or Jacobian parameters are not "
                             f"JSON-serialisable ({exc})") from exc
    metadata = {"format": FORMAT, "version": str(VERSION), "graph": graph_json}
    directory = os.path.dirname(os.path.abspath(path))
    _remove_stale_temporaries(directory)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{_TMP_MARK}{os.getpid()}-",
                                   dir=directory)
    except OSError as exc:
        raise GradGraphError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            _write_safetensors(f, table.arrays, metadata)
            f.flush()
            os.fsync(f.fileno())   # the data is on disk before the name points at it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)     # mkstemp's private 0600 would outlive the rename
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException as exc:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, GradGraphError):
            raise GradGraphError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return path


# ============================================================================ load
def _fail(path, msg):
    return GraphFormatError(f"{path}: {msg}")


class _StoredArrays:
    """The tensors of an open safetensors file: dtype and shape from the header at once, the data
    of a tensor read (once) only when a reference asks for it -- unreferenced tensors are never
    read. Reads go straight into the array (no second copy, no memory map kept)."""

    def __init__(self, path, f, entries, data_start):
        self.path, self._f, self._entries, self._start = path, f, entries, data_start
        self._cache = {}

    def __contains__(self, name):
        return name in self._entries

    def numel(self, name):
        return math.prod(self._entries[name][1])

    def get(self, name):
        if name not in self._cache:
            dtype, shape, (begin, end) = self._entries[name]
            a = np.empty(shape, dtype)
            if a.nbytes:
                self._f.seek(self._start + begin)
                if self._f.readinto(a.reshape(-1).view(np.uint8)) != end - begin:
                    raise _fail(self.path, f"tensor {name!r} is cut short (was the file changed while "
                                           f"it was read?)")
            self._cache[name] = a
        return self._cache[name]


def _open(path):
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
    return metadata, _StoredArrays(path, f, entries, 8 + n), f


_INDEX_DTYPES = {np.dtype(t).str for t in (np.int32, np.int64, np.uint32, np.uint64)}

#: torch dtype name ("float32", "int64", ...) -> torch.dtype, looked up by name in this table only
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _check(cond, path, msg):
    if not cond:
        raise _fail(path, msg)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


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


def _graph_problem(nodes, edges, sources, sink, granularity):
    """What makes these parts not a graph every query can answer on, or None.

    The invariants (``docs/file-format.md``): nodes in topological order, each with a known
    dtype and a value of its shape; every edge from an earlier to a later node, its Jacobian of
    their shapes; the sink the last node, one floating-point element; at least one source, each a
    distinct floating-point node other than the sink with no edge into it."""
    if granularity not in ("function", "primitive"):
        return f"granularity {granularity!r} is neither 'function' nor 'primitive'"
    n = len(nodes)
    if not n:
        return "the graph has no nodes"
    for i, nd in enumerate(nodes):
        where = f"node {i} ({nd.name!r})"
        if not isinstance(nd.dtype, str) or nd.dtype.removeprefix("torch.") not in _TORCH_DTYPES:
            return f"{where}: unknown dtype {nd.dtype!r} (a torch dtype name such as 'float32')"
        if nd.value is None:
            return f"{where} has no value (a graph holds the value of every node)"
        if tuple(np.shape(nd.value)) != tuple(nd.shape):
            return f"{where}: value shape {list(np.shape(nd.value))} != node shape {list(nd.shape)}"
    has_in_edge = set()
    for k, e in enumerate(edges):
        if not (_is_int(e.src) and _is_int(e.dst) and 0 <= e.src < n and 0 <= e.dst < n):
            return f"edge {k}: node index out of range (src={e.src!r}, dst={e.dst!r}, {n} nodes)"
        if e.src >= e.dst:
            return (f"edge {k}: goes from node {e.src} back to node {e.dst}; nodes must be in "
                    f"topological order")
        if not (_is_int(e.arg) and e.arg >= 0):
            return f"edge {k}: malformed arg {e.arg!r} (the argument position, >= 0)"
        if tuple(e.jac.out_shape) != tuple(nodes[e.dst].shape) or tuple(e.jac.in_shape) != tuple(nodes[e.src].shape):
            return (f"edge {k}: Jacobian of shape {list(e.jac.out_shape)} x {list(e.jac.in_shape)} between "
                    f"nodes of shapes {list(nodes[e.dst].shape)} and {list(nodes[e.src].shape)}")
        has_in_edge.add(e.dst)

    def floating(nd):
        return _TORCH_DTYPES[nd.dtype.removeprefix("torch.")].is_floating_point

    if not (_is_int(sink) and 0 <= sink < n):
        return f"sink index {sink!r} out of range ({n} nodes)"
    if sink != n - 1:
        return f"the sink (node {sink}) is not the last node ({n - 1}); nodes must be in topological order"
    sn = nodes[sink]
    if math.prod(sn.shape) != 1 or not floating(sn):
        return f"the sink {sn.name!r} must be one floating-point number, not shape {list(sn.shape)} {sn.dtype}"
    if not sources:
        return "the graph has no sources"
    seen = {}
    for name, i in sources.items():
        if not isinstance(name, str) or not _is_int(i) or not 0 <= i < n:
            return f"source {name!r}: node index {i!r} out of range ({n} nodes)"
        if i in seen:
            return f"sources {seen[i]!r} and {name!r} are the same node {i}"
        seen[i] = name
        if i == sink:
            return f"source {name!r} is the sink"
        if not floating(nodes[i]):
            return f"source {name!r} is not floating point ({nodes[i].dtype})"
        if i in has_in_edge:
            return f"source {name!r} (node {i}) has an edge into it; sources are where paths end"
    return None


def _build(doc, stored, path):
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
        # the value bounds what queries allocate for the node: it must be there, as stored data
        _check(d.get("value") is not None, path, f"{where}: no value (a graph holds the value of every node)")
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


def load(path):
    """Read a graph written by :func:`save`.

    Only the safetensors header, JSON and raw arrays are read: nothing is unpickled or executed.
    Every size the file declares is checked against the data it holds before anything of that
    size is allocated, the graph's invariants are checked (``docs/file-format.md``), and only the
    tensors the graph references are read -- into memory, so the graph stays usable when the
    file is deleted or replaced. The graph answers every query without the model.

    Raises
    ------
    GraphFormatError
        The file is missing, not a safetensors file, truncated or corrupt, not a gradgraph graph,
        written by a newer gradgraph, or internally inconsistent (missing arrays, shape
        mismatches, indices out of range, broken invariants). The message says which.
    """
    path = os.fspath(path)
    metadata, stored, f = _open(path)
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
            return _build(doc, stored, path)
        except GraphFormatError:
            raise
        except Exception as exc:   # any other inconsistency the checks above did not name
            raise _fail(path, f"inconsistent graph description: {type(exc).__name__}: {exc}") from None
