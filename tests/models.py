"""A small zoo of random-init models for tests, plus the autograd oracle for their gradients.

Every builder returns ``(model, args, kwargs, output_fn)``: ``output_fn(model(*args, **kwargs))``
is a scalar (a logit difference or one output element). Models are in eval mode, seeded, and in
float64 unless ``dtype`` says otherwise.

>>> model, args, kwargs, out = mlp()
>>> g = gg.capture(model, args, kwargs, output=out)
>>> grads = autograd_gradient(model, args, kwargs, out)   # same keys as g.gradient()
"""
from __future__ import annotations

import functools
import inspect

import torch

__all__ = ["mlp", "cnn", "cnn_norms", "residual_mlp_ln", "bert_mlm", "gpt2_lm", "distilbert_mlm",
           "transformer_encoder_layer", "attention_block", "ZOO", "HF_ZOO", "zoo_model", "autograd_gradient"]


def _gen(seed):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def mlp(act="tanh", dtype=torch.float64, seed=0):
    """Linear(4, 6) -> tanh|relu -> Linear(6, 3) on a batch of 2; sink y[0, 1] - y[1, 2]."""
    g = _gen(seed)
    acts = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "sigmoid": torch.nn.Sigmoid}
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), acts[act](), torch.nn.Linear(6, 3)).to(dtype).eval()
    x = torch.randn(2, 4, generator=g, dtype=dtype)
    return model, (x,), {}, lambda y: y[0, 1] - y[1, 2]


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=1, padding=1, groups=2)
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, image):
        h = self.pool(torch.relu(self.bn(self.conv1(image))))
        h = self.gap(torch.relu(self.conv2(h)))
        return self.head(h.flatten(1))


def cnn(dtype=torch.float64, seed=0):
    """conv -> BatchNorm2d (eval, random running stats) -> relu -> max pool -> grouped conv ->
    adaptive average pool -> linear; input (2, 2, 6, 6); sink y[0, 0] - y[1, 2]."""
    g = _gen(seed)
    model = _CNN().to(dtype)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(4, generator=g, dtype=dtype) * 0.1)
        model.bn.running_var.copy_(torch.rand(4, generator=g, dtype=dtype) + 0.5)
        model.bn.weight.copy_(torch.randn(4, generator=g, dtype=dtype))
        model.bn.bias.copy_(torch.randn(4, generator=g, dtype=dtype))
    model.eval()
    x = torch.randn(2, 2, 6, 6, generator=g, dtype=dtype)
    return model, (x,), {}, lambda y: y[0, 0] - y[1, 2]


class _CNNNorms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.up = torch.nn.Upsample(scale_factor=2, mode="bilinear")
        self.inorm = torch.nn.InstanceNorm2d(4, affine=True)
        self.near = torch.nn.Upsample(scale_factor=2, mode="nearest")
        self.pool = torch.nn.AdaptiveMaxPool2d(3)
        self.head = torch.nn.Linear(36, 3)

    def forward(self, image):
        h = self.up(torch.nn.functional.silu(self.gn(self.conv(image))))
        h = self.pool(self.near(self.inorm(h)))
        return self.head(h.flatten(1))


def cnn_norms(dtype=torch.float64, seed=0):
    """conv -> GroupNorm -> SiLU -> bilinear upsampling -> InstanceNorm -> nearest upsampling ->
    adaptive max pool -> linear; input (2, 2, 4, 4); sink y[0, 1] - y[1, 0]."""
    g = _gen(seed)
    model = _CNNNorms().to(dtype).eval()
    with torch.no_grad():
        for m in (model.gn, model.inorm):
            m.weight.copy_(torch.randn(4, generator=g, dtype=dtype))
            m.bias.copy_(torch.randn(4, generator=g, dtype=dtype))
    x = torch.randn(2, 2, 4, 4, generator=g, dtype=dtype)
    return model, (x,), {}, lambda y: y[0, 1] - y[1, 0]


class _ResidualMLP(torch.nn.Module):
    def __init__(self, d=6, n_blocks=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 2 * d), torch.nn.GELU(),
                                torch.nn.Linear(2 * d, d)) for _ in range(n_blocks))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 2)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


def residual_mlp_ln(dtype=torch.float64, seed=0):
    """Two pre-LayerNorm residual MLP blocks, final LayerNorm, linear head; input (3, 6)."""
    g = _gen(seed)
    model = _ResidualMLP().to(dtype).eval()
    with torch.no_grad():   # non-trivial LayerNorm affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=dtype))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=dtype))
    x = torch.randn(3, 6, generator=g, dtype=dtype)
    return model, (x,), {}, lambda y: y[0, 0] - y[2, 1]


# ---------------------------------------------------------------------------- HuggingFace
_VOCAB, _SEQ = 40, 6


def _ids_and_mask(g, mask, batch=2):
    ids = torch.randint(3, _VOCAB, (batch, _SEQ), generator=g)
    ids[0, 1] = ids[0, 4]     # a repeated token: its two rows must stay distinct sources
    attn = torch.ones(batch, _SEQ, dtype=torch.long)
    if mask:
        attn[1, -2:] = 0      # right padding on the second sequence
    return ids, attn


def _hf_case(model, g, mask, **extra):
    """(model, args, kwargs, output) for a HuggingFace LM: token ids, optional padding mask."""
    ids, attn = _ids_and_mask(g, mask)
    kwargs = {"input_ids": ids, **extra}
    if mask:
        kwargs["attention_mask"] = attn
    return model, (), kwargs, _logit_diff


def _logit_diff(o):
    return o.logits[0, 3, 5] - o.logits[1, 2, 7]


def bert_mlm(mask=False, dtype=torch.float64, seed=0):
    """BertForMaskedLM, 2 layers, hidden 16, eager attention; kwargs input_ids (+ attention_mask)."""
    from transformers import BertConfig, BertForMaskedLM
    g = _gen(seed)
    cfg = BertConfig(vocab_size=_VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, type_vocab_size=2,
                     attn_implementation="eager")
    model = BertForMaskedLM(cfg).to(dtype).eval()
    return _hf_case(model, g, mask)


def gpt2_lm(mask=False, dtype=torch.float64, seed=0):
    """GPT2LMHeadModel, 2 layers, hidden 16, eager attention; kwargs input_ids (+ attention_mask)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    g = _gen(seed)
    cfg = GPT2Config(vocab_size=_VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                     bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).to(dtype).eval()
    return _hf_case(model, g, mask, use_cache=False)


def distilbert_mlm(mask=False, dtype=torch.float64, seed=0):
    """DistilBertForMaskedLM, 2 layers, dim 16, eager attention; kwargs input_ids (+ attention_mask)."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM
    g = _gen(seed)
    cfg = DistilBertConfig(vocab_size=_VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                           max_position_embeddings=16, attn_implementation="eager")
    model = DistilBertForMaskedLM(cfg).to(dtype).eval()
    return _hf_case(model, g, mask)


def transformer_encoder_layer(dtype=torch.float64, seed=0):
    """torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first, eval) on (2, 5, 8)."""
    g = _gen(seed)
    model = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                             batch_first=True).to(dtype).eval()
    x = torch.randn(2, 5, 8, generator=g, dtype=dtype)
    return model, (x,), {}, lambda y: y[0, 1, 2] - y[1, 4, 0]


class _AttentionBlock(torch.nn.Module):
    """Token embedding, one single-head self-attention layer with a residual, unembedding."""

    def __init__(self, vocab=5, hidden=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.q = torch.nn.Linear(hidden, hidden, bias=False)
        self.k = torch.nn.Linear(hidden, hidden, bias=False)
        self.v = torch.nn.Linear(hidden, hidden, bias=False)
        self.unembed = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / h.shape[-1] ** 0.5
        h = h + torch.softmax(scores, dim=-1) @ self.v(h)
        return self.unembed(h)


def attention_block(dtype=torch.float64, seed=0):
    """A 1-layer self-attention block over 3 token ids (vocab 5, hidden 2), small enough to
    enumerate every gradient path; sink logits[0, -1, 1] - logits[0, -1, 3]."""
    g = _gen(seed)
    model = _AttentionBlock().to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    tokens = torch.tensor([[2, 0, 4]])
    return model, (tokens,), {}, lambda y: y[0, -1, 1] - y[0, -1, 3]


#: name -> builder taking no arguments (the default configuration of each model)
ZOO = {
    "mlp_tanh": lambda **kw: mlp("tanh", **kw),
    "mlp_relu": lambda **kw: mlp("relu", **kw),
    "cnn": cnn,
    "cnn_norms": cnn_norms,
    "residual_mlp_ln": residual_mlp_ln,
    "transformer_encoder_layer": transformer_encoder_layer,
    "attention_block": attention_block,
    "bert_mlm": lambda **kw: bert_mlm(False, **kw),
    "bert_mlm_mask": lambda **kw: bert_mlm(True, **kw),
    "gpt2_lm": lambda **kw: gpt2_lm(False, **kw),
    "gpt2_lm_mask": lambda **kw: gpt2_lm(True, **kw),
    "distilbert_mlm": lambda **kw: distilbert_mlm(False, **kw),
    "distilbert_mlm_mask": lambda **kw: distilbert_mlm(True, **kw),
}
HF_ZOO = [k for k in ZOO if k.startswith(("bert", "gpt2", "distilbert"))]


def zoo_model(name, dtype=torch.float64):
    """``ZOO[name](dtype=dtype)``, built once per test session: later ``gg.capture`` calls on the
    same model object (and output function) reuse its traced program instead of exporting again."""
    return _built(name, dtype)


@functools.cache
def _built(name, dtype):
    return ZOO[name](dtype=dtype)


# ---------------------------------------------------------------------------- the oracle
def _same_storage(a, b):
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)   # a Size input is no source
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def autograd_gradient(model, args, kwargs, output_fn, embeddings=None):
    """d output / d sources by ``torch.autograd.grad``, keyed like :meth:`GradGraph.gradient`.

    Sources are found without gradgraph: every floating-point input (named by the forward's
    parameter name, or its keyword) and the output of every ``nn.Embedding`` called on (a view of)
    an integer input -- found by a forward hook comparing storage, so position embeddings indexed
    by an internal ``arange`` are not sources. ``embeddings`` (module paths) overrides the latter.
    """
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    args = list(args)
    kwargs = dict(kwargs)
    leaves = {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
            args[i] = a.detach().clone().requires_grad_(True)
            leaves[params[i] if i < len(params) else f"args_{i}"] = args[i]
    for k, a in list(kwargs.items()):
        if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
            kwargs[k] = a.detach().clone().requires_grad_(True)
            leaves[k] = kwargs[k]
    int_inputs = [a for a in list(args) + list(kwargs.values())
                  if isinstance(a, torch.Tensor) and not a.dtype.is_floating_point]
    hooks = []
    for path, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Embedding):
            continue
        if embeddings is not None and path not in embeddings:
            continue

        def hook(mod, inp, out, path=path):
            if embeddings is not None or any(_same_storage(inp[0], t) for t in int_inputs):
                leaves[path] = out
            return out
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            y = output_fn(model(*args, **kwargs))
            names = list(leaves)
            grads = torch.autograd.grad(y, [leaves[n] for n in names], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    return {n: (torch.zeros_like(leaves[n]) if gr is None else gr.detach()) for n, gr in zip(names, grads)}
