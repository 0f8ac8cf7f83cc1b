"""Transforms of a model's weights kept across graphs: one per process, bounded in memory.

A contraction's Jacobian references the other operand -- for a linear layer, the weight. Its
products need input-independent transforms of it: |W| and -|W| log|W| (entropy), a transposed
contiguous copy (the max kernels' dot-product form), the columns holding a zero. Every graph
captured from the same model references the same weight memory, so a study over many inputs
computes each transform once per process instead of once per graph.

The cache answers only inside :meth:`WeightCache.active` -- a block in which the caller promises
that the model's weights are not written behind torch's back. Outside it every graph computes its
own transforms: an interactive session that edits a weight through ``weight.data`` (which has a
version counter of its own) or a numpy view of its memory must never get the old weight's answer.
The batch runner opens the block in its workers for a build object's model, which the worker sets
up once and owns.

An entry is found by the memory it was computed from -- the torch storage (held by a weak
reference, so the cache never keeps a dropped model alive and a freed storage's address cannot be
mistaken for a new one), the data pointer, shape, strides and dtype of the view -- and is valid
only while the tensor's version counter is the one it was computed at: an in-place change of the
weight (``weight.mul_(2)`` under ``no_grad``, ``load_state_dict``, an optimizer step, a copy
through ``detach()``) bumps the counter, and the transform is computed again, inside a block too.
Arrays that are not views of a torch tensor (a graph loaded from a file) are not cached here.

Transforms that can be checked against the weight exactly and cheaply -- |W|, and what is made
from |W| alone (-|W| log|W|) -- need no promise: ``get(..., check=...)`` compares the weight with
the array the transform was made from before answering (``|W| == A`` element by element: one read
of both, no logarithm), so a weight written through ``.data``, ``copy_`` or a numpy view inside a
block is computed again at once. The comparison runs once per weight and query
(:meth:`WeightCache.query`): a weight does not change while a query runs.

Outside a block nothing is kept: kept transforms cost up to twice the model's contraction weights
(about 680 MB for GPT-2 small), which a single query's memory should not carry.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["WeightCache", "WEIGHT_CACHE"]


def _tensor_of(array):
    """The torch tensor whose memory numpy ``array`` views, or None."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, torch.Tensor) else None


def _arrays(value):
    """The numpy arrays and torch tensors in a value (an array, a tensor, or a tuple of them)."""
    return [a for v in (value if isinstance(value, tuple) else (value,)) for a in
            ([v] if isinstance(v, np.ndarray) else [v.numpy()] if isinstance(v, torch.Tensor) else [])]


class _Entry:
    __slots__ = ("storage", "version", "value", "nbytes", "checked")

    def __init__(self, storage, version, value, nbytes, checked):
        self.storage, self.version, self.value, self.nbytes = storage, version, value, nbytes
        #: the query (generation) in which the value was last found to match the weight
        self.checked = checked


class WeightCache:
    """Least-recently-used cache of weight transforms, at most ``max_bytes`` of them.

    Attributes
    ----------
    max_bytes : int
        Memory budget of the cached values; a value larger than it is computed and not kept.
    hits, misses : int
        Lookups answered from the cache, and computed.
    checked_hits : int
        Of the hits, those of checked transforms (``get(..., check=...)``), which are answered
        inside and outside :meth:`active` blocks alike.
    """

    def __init__(self, max_bytes=1 << 30):
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.checked_hits = 0
        self.nbytes = 0
        self._entries = OrderedDict()
        self._lock = threading.Lock()
        self._depth = 0          # open active() blocks
        self._owner = None       # whose entries are held: the last outermost block's owner
        self._queries = 0        # open query() blocks
        self._generation = 0     # counts outermost query() blocks
        self._local = threading.local()   # this thread's open query() blocks and scratch memory

    @contextlib.contextmanager
    def active(self, owner=None):
        """A block in which graphs share weight transforms.

        Parameters
        ----------
        owner : hashable, optional
            Who promises that the weights do not change behind torch's back between the blocks it
            opens (the batch runner passes its run's token): entries survive from one outermost
            block to the next of the same owner, and are dropped when a block of another owner
            (or of no owner, the default) opens.

        Examples
        --------
        >>> from gradgraph.jacobians import WEIGHT_CACHE
        >>> with WEIGHT_CACHE.active():          # doctest: +SKIP
        ...     graphs = [gg.capture(model, (x,), output=out) for x in inputs]
        """
        with self._lock:
            if self._depth == 0 and (owner is None or owner != self._owner):
                self._entries.clear()
                self.nbytes = 0
                self._owner = owner
            self._depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._depth -= 1

    @property
    def keeping(self):
        """Whether transforms are kept and answered now (inside an :meth:`active` block)."""
        return self._depth > 0

    def __len__(self):
        return len(self._entries)

    @contextlib.contextmanager
    def query(self):
        """A block in which weights do not change (one query: the passes of the dynamic program
        open it): a checked transform is compared with its weight once per block."""
        with self._lock:
            if self._queries == 0:
                self._generation += 1
            self._queries += 1
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1
        try:
            yield self
        finally:
            local.depth -= 1
            if not local.depth:
                local.scratch = None          # the query's scratch memory goes with it
            with self._lock:
                self._queries -= 1

    def scratch(self, n, dtype, slot="transforms"):
        """An uninitialised array of ``n`` elements of ``dtype`` for a transform used only until
        the next call for the same ``slot`` (one product's |W| and -|W| log|W|, or a weight copied
        into the orientation a kernel reads, outside an :meth:`active` block).
        Inside a :meth:`query` block every call of this thread for a slot returns the same memory
        (grown to the largest size asked for, and released when the query ends): the products of a
        query touch already-mapped pages instead of a weight-sized new array each, whose page faults
        cost more than the transforms themselves. Outside a query, a new array."""
        dtype = np.dtype(dtype)
        local = self._local
        if not getattr(local, "depth", 0):
            return np.empty(n, dtype)
        nbytes = n * dtype.itemsize
        slots = getattr(local, "scratch", None)
        if slots is None:
            local.scratch = slots = {}
        buf = slots.get(slot)
        if buf is None or buf.nbytes < nbytes:
            slots[slot] = None                # free the smaller one first
            slots[slot] = buf = np.empty(nbytes, np.uint8)
        return buf[:nbytes].view(dtype)

    def get(self, array, what, compute, check=None):
        """``compute()`` for the weight viewed by numpy ``array``, or its value cached from an
        earlier call on the same memory. ``what`` (hashable) names the transform; ``compute`` must
        depend only on ``array``'s contents and ``what``.

        Values are kept and answered only inside an :meth:`active` block (outside,
        ``compute()``: a query of a graph holds no transforms beyond the product that needs them).
        Without ``check``, a cached value is valid at the same version of the tensor. With
        ``check(value) -> bool``, an exact test that the value is still the weight's transform
        (e.g. ``|W| == A``), it is answered after ``check`` -- run once per weight within a
        :meth:`query` block -- has passed, whatever the version; otherwise it is computed again."""
        if not self._depth:
            return compute()
        tensor = _tensor_of(array)
        try:
            version = tensor._version
        except (AttributeError, RuntimeError):    # not a tensor's memory; an inference-mode tensor
            return compute()
        storage = StorageWeakRef(tensor.untyped_storage())
        key = (storage.cdata, array.ctypes.data, array.shape, array.strides, array.dtype.str, what)
        with self._lock:
            e = self._entries.get(key)
            generation = self._generation if self._queries else None
            if e is not None and e.storage.expired():
                e = None
            if e is not None and check is None and e.version == version:
                self._entries.move_to_end(key)
                self.hits += 1
                return e.value
        if e is not None and check is not None:
            if (generation is not None and e.checked == generation) or check(e.value):
                with self._lock:
                    e.checked = generation
                    if key in self._entries:
                        self._entries.move_to_end(key)
                    self.hits += 1
                    self.checked_hits += 1
                return e.value
        self.misses += 1
        value = compute()
        arrays = _arrays(value)
        # a value viewing the weight's own memory costs nothing to recompute, and keeping it would
        # keep the weight alive
        if any(np.may_share_memory(a, array) for a in arrays):
            return value
        nbytes = sum(a.nbytes for a in arrays) + 64
        if nbytes > self.max_bytes:
            return value
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            for k in [k for k, e in self._entries.items() if e.storage.expired()]:   # freed weights
                self.nbytes -= self._entries.pop(k).nbytes
            while self._entries and self.nbytes + nbytes > self.max_bytes:
                self.nbytes -= self._entries.popitem(last=False)[1].nbytes
            self._entries[key] = _Entry(storage, version, value, nbytes, generation)
            self.nbytes += nbytes
        return value

    def clear(self):
        """Drop every entry (inside an :meth:`active` block, after writing to a weight behind
        torch's back, e.g. via ``.data``)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


#: The process's cache of weight transforms, keeping and answering inside ``WEIGHT_CACHE.active()``
#: blocks only (``WEIGHT_CACHE.max_bytes = 0`` turns it off there too).
WEIGHT_CACHE = WeightCache()
