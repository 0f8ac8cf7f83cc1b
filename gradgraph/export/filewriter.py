"""Writing the gradgraph file format (see :mod:`.fileformat` for the layout and the reader).

Kept apart from the reader so that :meth:`GradGraph.save <gradgraph.graph.GradGraph.save>` can use
it without an import cycle: writing reads a graph's attributes only, while reading builds a
:class:`~gradgraph.graph.GradGraph`. Saving is atomic, never replaces a file without
``overwrite=True`` (even one created meanwhile), and gives the same bytes for the same graph.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import tempfile

import math

import numpy as np
import torch

from ..errors import GradGraphError

__all__ = ["save", "FORMAT", "VERSION", "GraphFileExistsError", "node_fields"]

FORMAT = "gradgraph"
#: Version written by this gradgraph; files of a larger version are refused with a clear message.
#: 1: every node holds its value. 2: a node other than a source or the sink may hold none
#: (``"value": null``).
VERSION = 2


def node_fields(node_type):
    """The fields of a node stored in the JSON structure (every field but the value array)."""
    return [f.name for f in dataclasses.fields(node_type) if f.name != "value"]


#: Integer arrays at least this long that are arithmetic progressions are stored as (start, step).
_MIN_ARANGE = 16


class GraphFileExistsError(GradGraphError, FileExistsError):
    """``save`` was asked to write over an existing file without ``overwrite=True``."""


# ============================================================================ invariants
#: torch dtype name ("float32", "int64", ...) -> torch.dtype, looked up by name in this table only
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _graph_problem(nodes, edges, sources, sink, granularity):
    """What makes these parts not a graph every query can answer on, or None.

    The invariants (``docs/file-format.md``): nodes in topological order, each with a known
    dtype and a value of its shape; every edge from an earlier to a later node, its Jacobian of
    their shapes; the sink the last node, one floating-point element; at least one source, each a
    distinct floating-point node other than the sink with no edge into it. A node's value may be
    absent (not held), except the sources' and the sink's."""
    if granularity not in ("function", "primitive"):
        return f"granularity {granularity!r} is neither 'function' nor 'primitive'"
    n = len(nodes)
    if not n:
        return "the graph has no nodes"
    must_hold = {sink} | {i for i in (sources.values() if isinstance(sources, dict) else ()) if _is_int(i)}
    for i, nd in enumerate(nodes):
        where = f"node {i} ({nd.name!r})"
        if not isinstance(nd.dtype, str) or nd.dtype.removeprefix("torch.") not in _TORCH_DTYPES:
            return f"{where}: unknown dtype {nd.dtype!r} (a torch dtype name such as 'float32')"
        if nd.value is None:
            if i in must_hold:
                return f"{where} has no value (a graph holds the values of its sources and its sink)"
            continue
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
    fields = node_fields(type(g.nodes[0])) if g.nodes else []
    for i, n in enumerate(g.nodes):
        d = {f: getattr(n, f) for f in fields}
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


