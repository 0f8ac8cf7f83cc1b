"""Entropy of the gradient-path distribution (paper Eq. 6-7), by the expectation semiring.

Each sink-to-source path pi gets probability p(pi) = |g(pi)| / Z with Z = sum_pi |g(pi)|. One
backward pass in the ENTROPY semiring (Eisner 2002; edge value <|w|, -|w| log|w|>, algebra
<p1, r1> (+) <p2, r2> = <p1 + p2, r1 + r2>, <p1, r1> (x) <p2, r2> = <p1 p2, p1 r2 + p2 r1>) leaves at
each source element the pair <Z_j, R_j> = <sum |g|, -sum |g| log|g|> over the paths ending there, and

    H = -sum_pi p(pi) log p(pi) = log Z + R / Z        (nats).

The engine keeps every tensor's pair relative to one per-tensor scale e^s (both channels share it),
so R / Z is scale-free and log Z = log(mantissa) + s: path weights of 1e-400 and below are fine.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..errors import QueryError
from .dp import backward
from .groups import labels_along
from .paths import pass_dtype
from .semirings import ENTROPY

__all__ = ["entropy"]


def _pairs(g):
    """{source name: (Z mantissas (n,), R mantissas (n,), log scale)} (float64) from one ENTROPY
    pass, whose values are in the model's precision: float32 for a float32 (or narrower) model,
    as its Jacobians' factors are (:func:`.paths.pass_dtype`), float64 otherwise."""
    seed = ENTROPY.seed(g.nodes[g.sink].numel)
    seed.arr = seed.arr.astype(pass_dtype(g), copy=False)
    B = backward(g, ENTROPY, seed=seed, keep=g.sources.values())
    out = {}
    for name, i in g.sources.items():
        n = g.nodes[i].numel
        b = B[i]
        if b is None:
            out[name] = (np.zeros(n), np.zeros(n), 0.0)
        else:
            out[name] = (b.arr[0].astype(np.float64), b.arr[1].astype(np.float64), b.log_scale)
    return out


def _h(z, r, log_scale):
    """Entropy log Z + R/Z elementwise from mantissas; nan where Z = 0 (no path)."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.log(z) + log_scale + r / z
    return np.where(z > 0, h, np.nan)


def _labels(g, name, labels):
    node = g.nodes[g.source_index(name)]
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        labels = labels_along(node.shape, int(labels), f"source {name!r}")
    lab = np.asarray(labels)
    if lab.size != node.numel or not np.issubdtype(lab.dtype, np.integer):
        raise QueryError(f"groups[{name!r}] must be an integer label array with one label per element of "
                         f"the source (shape {node.shape}); got dtype {lab.dtype}, {lab.size} entries. "
                         f"Example: np.arange({node.shape[0] if node.shape else 1})[:, None].repeat(d, 1) "
                         f"groups the units of each row")
    return lab.reshape(-1)


def entropy(g, per_source=False, groups=None):
    """Entropy in nats of p(path) = |g(path)| / Z over sink-to-source paths (paper Eq. 6-7).

    Parameters
    ----------
    g : GradGraph
    per_source : bool
        ``False``: one float over all paths of the graph. ``True``: for every source element, the
        entropy of the paths ending there, ``{source name: float64 array shaped like the source}``.
    groups : dict[str, array-like of int], optional
        Aggregate source elements first (paper Eq. 3: a dummy node joins the elements of a group
        with 1-bar edges, which adds nothing to either channel, so a group's pair is the sum of its
        elements' pairs). ``groups[name]`` is an integer label per element of source ``name``
        (shaped like the source, or flat); label ``k >= 0`` puts the element in group ``k``, a
        negative label leaves it out. An int ``axis`` instead groups by the index along that axis
        (``{name: 1}`` on a (batch, tokens, hidden) source: one entropy per token). Returns ``{name: array indexed by label}`` for the named
        sources only (``per_source`` is then implied).

    Returns
    -------
    float or dict[str, numpy.ndarray]
        Entropies in nats; ``nan`` where no path with a non-zero weight exists (Z = 0).

    Notes
    -----
    A graph with a single path has H = 0; n paths of equal |weight| have H = log n. Zero-weight
    edges are not edges, so a dead ReLU removes its paths rather than adding zero-probability ones.

    Examples
    --------
    >>> import torch, gradgraph as gg
    >>> m = torch.nn.Linear(2, 1).double()
    >>> with torch.no_grad(): _ = m.weight.fill_(1.0)
    >>> g = gg.capture(m, (torch.ones(1, 2, dtype=torch.double),), output=lambda y: y[0, 0])
    >>> round(g.entropy(), 6)    # two paths of weight 1: log 2
    0.693147
    """
    pairs = _pairs(g)
    if groups is not None:
        if not isinstance(groups, dict):
            raise QueryError("groups must be a dict {source name: integer label array shaped like the source}")
        out = {}
        for name, labels in groups.items():
            lab = _labels(g, name, labels)
            z, r, s = pairs[name]
            n = int(lab.max()) + 1 if lab.size and lab.max() >= 0 else 0
            keep = lab >= 0
            zg = np.bincount(lab[keep], weights=z[keep], minlength=n)
            rg = np.bincount(lab[keep], weights=r[keep], minlength=n)
            out[name] = _h(zg, rg, s)
        return out
    if per_source:
        return {name: _h(z, r, s).reshape(g.nodes[g.sources[name]].shape) for name, (z, r, s) in pairs.items()}
    scales = [s for z, r, s in pairs.values() if np.any(z > 0)]
    if not scales:
        return math.nan
    top = max(scales)
    Z = sum(float(z.sum()) * math.exp(s - top) for z, r, s in pairs.values())
    R = sum(float(r.sum()) * math.exp(s - top) for z, r, s in pairs.values())
    return float(_h(np.array([Z]), np.array([R]), top)[0])
