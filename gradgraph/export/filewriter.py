"""Writing the gradgraph file format (see :mod:`.fileformat` for the layout and the reader).

Kept apart from the reader so that :meth:`GradGraph.save <gradgraph.graph.GradGraph.save>` can use
it without an import cycle: writing reads a graph's attributes only, while reading builds a
:class:`~gradgraph.graph.GradGraph`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from ..errors import GradGraphError

__all__ = ["save", "FORMAT", "VERSION", "GraphFileExistsError"]

FORMAT = "gradgraph"
#: Version written by this gradgraph; files of a larger version are refused with a clear message.
VERSION = 1


def node_fields(node_type):
    """The fields of a node stored in the JSON structure (every field but the value array)."""
    return [f.name for f in dataclasses.fields(node_type) if f.name != "value"]


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


