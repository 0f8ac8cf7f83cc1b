"""What a user should know about a capture: the dense Jacobians, the lower-precision nodes, the
first non-finite value (``GradGraph.meta``), and the warnings attributed to the user's own code."""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch

from ..errors import CaptureWarning

__all__ = ["diagnostics", "same_value", "warn"]

_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # gradgraph/


def warn(warning):
    """``warnings.warn`` attributed to the first caller outside gradgraph."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(warning, stacklevel=level)


def same_value(a, b):
    """Whether two outputs are the same computation's: same dtype and shape, and equal up to
    256 units of roundoff of their dtype (reordered sums in decompositions differ by a few);
    NaN equals NaN."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype \
            or a.shape != b.shape:
        return False
    if not a.dtype.is_floating_point:
        return bool(torch.equal(a, b))
    tol = 256 * torch.finfo(a.dtype).eps
    return bool(torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))


def _node_summary(node, **extra):
    return {"node": node.name, "op": node.op, "module": node.module, "source_line": node.source_line,
            **extra}


def diagnostics(gnodes, edges, source_ids, dense_ids, nan_ids=None):
    """What a user should know about a captured graph, for ``GradGraph.meta``, and a
    :class:`CaptureWarning` for non-finite values.

    ``dense_jacobians``: the nodes whose Jacobian is a dense matrix. ``lower_precision``: the
    nodes computed in a floating type narrower than the sources' widest (a float32 softmax in a
    float64 model). ``first_non_finite``: the first node, in execution order, holding a NaN or
    whose incoming Jacobian holds a NaN or infinity, or the sink when it is infinite; paths
    through it have non-finite weights. ``nan_ids``: the nodes holding a NaN, when the builder
    found them before it freed values (None: read from the nodes' values)."""
    def float_size(node):
        dtype = getattr(torch, node.dtype, None)
        return dtype.itemsize if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    model_size = max((float_size(gnodes[i]) or 0) for i in source_ids)
    out = {"dense_jacobians": [_node_summary(gnodes[i]) for i in dense_ids],
           "lower_precision": [_node_summary(n, dtype=n.dtype) for n in gnodes
                               if (float_size(n) or model_size) < model_size]}
    bad_jacobian = set()
    for e in edges:
        if e.dst not in bad_jacobian and not all(
                np.isfinite(np.asarray(a)).all() for a in e.jac.state()[1].values()
                if np.asarray(a).dtype.kind == "f"):
            bad_jacobian.add(e.dst)
    if nan_ids is None:
        nan_ids = {i for i, n in enumerate(gnodes) if n.value is not None
                   and np.asarray(n.value).dtype.kind == "f" and np.isnan(n.value).any()}
    for i, n in enumerate(gnodes):
        why = ("holds NaN" if i in nan_ids else
               "has a non-finite local derivative" if i in bad_jacobian else
               "is infinite" if n.role == "sink" and not np.isfinite(np.asarray(n.value)).all() else "")
        if why:
            out["first_non_finite"] = _node_summary(n, problem=why)
            warn(CaptureWarning(
                f"node {n.name} ({n.op}, module {n.module or '<top>'}"
                + (f", at {n.source_line}" if n.source_line else "") + f") {why}, the first "
                "non-finite value of the graph in execution order: paths through it may have "
                "non-finite weights, and the gradient of sources they reach is not finite"))
            break
    return out
