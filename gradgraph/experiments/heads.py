"""Gradient flow per attention head, and masking heads of a HuggingFace BERT.

Flow through a head
    In HuggingFace's eager attention, each head's context vectors (softmax(QK^T)V, shape
    (batch, tokens, head size) per head) are merged into one (batch, tokens, heads x head size)
    tensor, the output of the ``...attention.self`` module, which feeds the output projection.
    Head h owns the columns [h*d, (h+1)*d) of that tensor. Every path through the attention
    block (through the query, key or value branch) passes through exactly one element of it, so
    the flow through head h - the total |g(path)| of the paths through any of head h's context
    elements - is the sum of the element flows (:meth:`GradGraph.flow` with ``by="element"``)
    over head h's columns. Paths through the layer's skip connection do not count for any head.

Masking
    :func:`mask_heads` zeroes head h's columns at the input of the output projection (a forward
    pre-hook on ``...attention.output.dense``), which is what HuggingFace's former ``head_mask``
    argument did (it multiplied the head's attention probabilities by 0).
"""
from __future__ import annotations

import contextlib
import re

import numpy as np

from ..errors import QueryError

__all__ = ["head_flow", "attention_modules", "mask_heads", "SELF_ATTENTION"]

#: module paths of self-attention blocks whose output merges the heads (HuggingFace BERT naming)
SELF_ATTENTION = re.compile(r"^(.*\.)?layer\.(\d+)\.attention\.self$")


def attention_modules(g, pattern=SELF_ATTENTION):
    """The self-attention module paths of a graph, in layer order."""
    mods = {n.module for n in g.nodes if n.module and pattern.match(n.module)}
    return sorted(mods, key=lambda m: int(pattern.match(m).group(2)))


def _merged_output(g, module):
    """The last tensor computed in ``module``: its output, heads merged on the last axis."""
    idx = [i for i, n in enumerate(g.nodes) if n.module == module]
    return g.nodes[idx[-1]]


def _infer_heads(g, module, width):
    """The number of heads from a (..., heads, head size) view inside the module."""
    for n in g.nodes:
        shape = tuple(n.shape)
        if n.module == module and len(shape) >= 2 and shape[-1] * shape[-2] == width \
                and shape[-1] != width and shape[-2] != width:
            return shape[-2]
    raise QueryError(f"cannot see the head axis of {module}: no (..., heads, head size) tensor of "
                     f"width {width}; pass num_heads=")


def head_flow(g, num_heads=None, *, flows=None, pattern=SELF_ATTENTION):
    """|gradient| flow through each attention head of each layer.

    Parameters
    ----------
    g : GradGraph
        A captured HuggingFace-style transformer (eager attention).
    num_heads : int, optional
        Heads per layer; default: read from the (..., heads, head size) view in each module.
    flows : dict, optional
        ``g.flow(by="element")`` if already computed.
    pattern : re.Pattern
        Which module paths are self-attention blocks (group 2: the layer number).

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{module path: flow per head}`` in layer order; a head's flow is the sum of the element
        flows of the module's output over the head's columns.

    Raises
    ------
    QueryError
        No module matches, or the output's width is not a multiple of ``num_heads``.

    Examples
    --------
    >>> import torch, gradgraph as gg
    >>> from transformers import BertConfig, BertForMaskedLM
    >>> from gradgraph.experiments.heads import head_flow
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
    ...                  intermediate_size=16, max_position_embeddings=8, attn_implementation="eager")
    >>> bert = BertForMaskedLM(cfg).eval()
    >>> g = gg.capture(bert, (), {"input_ids": torch.tensor([[1, 5, 7, 2]])},
    ...                output=lambda o: o.logits[0, 2, 3] - o.logits[0, 2, 4])
    >>> {m: f.shape for m, f in head_flow(g).items()}
    {'bert.encoder.layer.0.attention.self': (2,), 'bert.encoder.layer.1.attention.self': (2,)}
    """
    modules = attention_modules(g, pattern)
    if not modules:
        raise QueryError("no self-attention module in the graph (module paths like "
                         "'...layer.N.attention.self'); pass pattern= for other naming")
    flows = g.flow(by="element") if flows is None else flows
    out = {}
    for m in modules:
        node = _merged_output(g, m)
        width = int(node.shape[-1])
        heads = _infer_heads(g, m, width) if num_heads is None else int(num_heads)
        if heads < 1 or width % heads:
            raise QueryError(f"{m}: output width {width} is not a multiple of num_heads={heads}")
        f = np.asarray(flows[node.name], dtype=np.float64)
        out[m] = f.reshape(-1, heads, width // heads).sum(axis=(0, 2))
    return out


@contextlib.contextmanager
def mask_heads(model, heads):
    """Zero the outputs of the given heads while the context is open.

    Parameters
    ----------
    model : transformers BertModel / BertFor... (anything with ``.encoder.layer`` under
        ``model.bert`` or ``model``)
    heads : iterable of (layer, head)
    """
    bert = getattr(model, "bert", model)
    layers = bert.encoder.layer
    by_layer = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    handles = []
    try:
        for layer, hs in by_layer.items():
            att = layers[layer].attention
            size = att.self.attention_head_size
            keep = np.ones(att.self.num_attention_heads * size, dtype=np.float32)
            for h in hs:
                keep[h * size:(h + 1) * size] = 0.0

            def pre_hook(module, args, keep=keep):
                import torch
                return (args[0] * torch.from_numpy(keep).to(args[0].dtype),) + tuple(args[1:])
            handles.append(att.output.dense.register_forward_pre_hook(pre_hook))
        yield model
    finally:
        for h in handles:
            h.remove()
