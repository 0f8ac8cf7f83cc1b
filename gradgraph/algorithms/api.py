"""User-facing queries, each a thin front end over one semiring pass (:mod:`.dp`)."""
from __future__ import annotations

import numpy as np
import torch

from .dp import backward
from .paths import pass_dtype
from .semirings import REAL

__all__ = ["gradient"]


def gradient(g):
    """d(sink)/d(source) by the real semiring; see :meth:`GradGraph.gradient`."""
    # in the model's precision (float32 for a float32 model, as its Jacobians' factors and torch's
    # own backward are: :func:`.paths.pass_dtype`); only the sources' values are returned, every
    # other node's is dropped once propagated
    seed = REAL.seed(g.nodes[g.sink].numel)
    seed.arr = seed.arr.astype(pass_dtype(g), copy=False)
    B = backward(g, REAL, seed=seed, keep=g.sources.values())
    out = {}
    for name, i in g.sources.items():
        node = g.nodes[i]
        vals = np.zeros(node.numel) if B[i] is None else B[i].real()[0]
        out[name] = torch.from_numpy(np.ascontiguousarray(vals).reshape(node.shape)).to(
            getattr(torch, node.dtype.replace("torch.", "")))
    return out
