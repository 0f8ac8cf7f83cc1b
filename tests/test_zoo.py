"""The model zoo: small random-init architectures of every family, each captured with ``gg.capture``
and exact in float64 against a reference gradient.

The reference is ``torch.autograd.grad``, itself checked by central finite differences along a few
random directions of all sources at once. When autograd and finite differences disagree, finite
differences are the judge: gradgraph's directional derivatives are then compared with them instead.
That happens for the models listed in ``AUTOGRAD_WRONG`` (LeViT at batch size 1, where torch's CPU
batch-norm backward is wrong), and a test fails if autograd disagrees with finite differences on any
other. The reference runs ``F.hardsigmoid`` as the function it is, ``clamp(x + 3, 0, 6) / 6``,
because torch's fused backward of it is only float32-accurate (``_ExactHardsigmoid``).

The CNNs from torchvision and timm are imported from their own directory by ``vision_libs`` (see
there why they are not on the default path); their batch norms get random statistics.

Tolerances: float64 at rtol 1e-10 (with atol 1e-10 times the largest gradient entry, for entries
that are zero up to rounding). Models listed in ``FLOAT32_INSIDE`` compute part of their forward in
float32 even as float64 models (an upcast softmax or norm, written ``.float()`` / ``dtype=float32``
in their code); their gradients are compared at float32's precision, rtol 1e-5, and a test checks
that exactly these models run float32 ops, so the list cannot silently go stale.

Sources are the defaults (word embeddings of integer inputs, floating-point inputs); the sink is a
difference of two output entries in different batch rows. No op may use the dense fallback.
Mixture-of-experts models and Longformer cannot be exported (data-dependent control flow): they are
captured by recording the ops their input runs (``tracer="auto"`` falls back to it) and held to
the same standard. Half-precision models are compared with autograd in their own precision, and a
left-padded causal LM whose forward produces NaN must be reported, not silent.
"""
import re

import pytest
import torch
from torch.overrides import TorchFunctionMode

import gradgraph as gg


from models import autograd_gradient
from vision_libs import vision_lib
import transformers  # noqa: E402  (a test dependency: missing, the zoo fails, never skips)

F64 = torch.float64
VOCAB, SEQ, BATCH = 40, 6, 2


# ---------------------------------------------------------------------------------- inputs
def _gen(seed=0):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _tokens(mask=False, vocab=VOCAB, seq=SEQ):
    g = _gen(1)
    ids = torch.randint(3, vocab, (BATCH, seq), generator=g)
    kwargs = {"input_ids": ids}
    if mask:
        attn = torch.ones(BATCH, seq, dtype=torch.long)
        attn[1, -2:] = 0            # right padding on the second sequence
        kwargs["attention_mask"] = attn
    return kwargs


def _image(channels=3, size=32, batch=BATCH):
    return torch.randn(batch, channels, size, size, generator=_gen(2), dtype=F64)


def _sink(o):
    """A difference of two output entries in different batch rows (first tensor of the output)."""
    t = o if isinstance(o, torch.Tensor) else o[0]
    first, last = t[0].reshape(-1), t[-1].reshape(-1)
    return first[5 % first.numel()] - last[7 % last.numel()]


def _hf(model, **kwargs):
    return model.to(F64).eval(), (), kwargs


def _positional(model, *args):
    return model.to(F64).eval(), args, {}


# ------------------------------------------------------------------------------- builders
T = transformers
SMALL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
             vocab_size=VOCAB, max_position_embeddings=32, attn_implementation="eager")
DECODER = dict(SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _causal(cls_config, cls_model, mask=False, **cfg):
    return lambda: _hf(getattr(T, cls_model)(getattr(T, cls_config)(**cfg)), **_tokens(mask), use_cache=False)


def _encoder(cls_config, cls_model, mask=True, **cfg):
    return lambda: _hf(getattr(T, cls_model)(getattr(T, cls_config)(**cfg)), **_tokens(mask))


def _seq2seq(cls_config, cls_model, **cfg):
    def build():
        model = getattr(T, cls_model)(getattr(T, cls_config)(**cfg))
        kwargs = _tokens(True)
        kwargs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 4), generator=_gen(3))
        return _hf(model, **kwargs, use_cache=False)
    return build


def _t5():
    cfg = T.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                     num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                     attn_implementation="eager")
    return _seq2seq_model(T.T5ForConditionalGeneration(cfg))


def _seq2seq_model(model):
    kwargs = _tokens(True)
    kwargs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 4), generator=_gen(3))
    return _hf(model, **kwargs, use_cache=False)


BART = dict(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, attn_implementation="eager")


def _hf_vision(cls_config, cls_model, channels=3, size=32, **cfg):
    return lambda: _hf(getattr(T, cls_model)(getattr(T, cls_config)(**cfg)),
                       pixel_values=_image(channels, size))


def _vision(build, lib="torchvision", size=32, batch=BATCH):
    """A torchvision or timm model ``build(lib)`` (imported by ``vision_libs``) on an image batch.
    Its batch norms get random statistics and affine parameters, so that each is a different affine
    map (a fresh one is the identity, and timm zeroes the last one of every residual block)."""
    def builder():
        model = build(vision_lib(lib)).to(F64)
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            for norm in model.modules():
                if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                    norm.running_mean.copy_(0.1 * torch.randn(norm.num_features, generator=g, dtype=F64))
                    norm.running_var.copy_(0.5 + torch.rand(norm.num_features, generator=g, dtype=F64))
                    if norm.affine:
                        norm.weight.copy_(0.5 + torch.rand(norm.num_features, generator=g, dtype=F64))
                        norm.bias.copy_(0.1 * torch.randn(norm.num_features, generator=g, dtype=F64))
        return _positional(model, _image(size=size, batch=batch))
    return builder


def _wav2vec2():
    cfg = T.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                           num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
                           vocab_size=VOCAB, attn_implementation="eager")
    values = torch.randn(BATCH, 200, generator=_gen(4), dtype=F64)
    mask = torch.ones(BATCH, 200, dtype=torch.long)
    mask[1, 150:] = 0
    return _hf(T.Wav2Vec2ForCTC(cfg), input_values=values, attention_mask=mask)


def _whisper_encoder():
    cfg = T.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2,
                          decoder_layers=1, decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32,
                          decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16, pad_token_id=0,
                          attn_implementation="eager")
    features = torch.randn(BATCH, 8, 16, generator=_gen(5), dtype=F64)
    return _hf(T.WhisperModel(cfg).get_encoder(), input_features=features)


def _mamba():
    cfg = T.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2,
                        conv_kernel=3, time_step_rank=4, use_cache=False)
    return _hf(T.MambaForCausalLM(cfg), **_tokens(), use_cache=False)


ZOO = {
    # decoder-only LLMs: grouped-query attention (num_key_value_heads 2 < 4 heads), rotary positions
    "llama": _causal("LlamaConfig", "LlamaForCausalLM", **DECODER),
    "llama_mask": _causal("LlamaConfig", "LlamaForCausalLM", mask=True, **DECODER),
    "mistral_sliding_window": _causal("MistralConfig", "MistralForCausalLM", sliding_window=3, **DECODER),
    "mistral_mask": _causal("MistralConfig", "MistralForCausalLM", mask=True, sliding_window=3, **DECODER),
    "qwen2": _causal("Qwen2Config", "Qwen2ForCausalLM", **DECODER),
    "qwen3": _causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=4, **DECODER),
    "phi3": _causal("Phi3Config", "Phi3ForCausalLM", **DECODER),
    "gemma": _causal("GemmaConfig", "GemmaForCausalLM", head_dim=4, **DECODER),
    "gemma2_softcap": _causal("Gemma2Config", "Gemma2ForCausalLM", head_dim=4, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0, sliding_window=3, **DECODER),
    "olmo": _causal("OlmoConfig", "OlmoForCausalLM", **DECODER),
    "stablelm": _causal("StableLmConfig", "StableLmForCausalLM", **DECODER),
    # rotary, ALiBi, learned positions; multi-query attention
    "gpt2": _causal("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                    n_positions=32, attn_implementation="eager"),
    "gpt_neox_rotary": _causal("GPTNeoXConfig", "GPTNeoXForCausalLM", **SMALL),
    "gptj_rotary": _causal("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2,
                           rotary_dim=4, n_positions=32, attn_implementation="eager"),
    "opt": _causal("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                   num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=32,
                   attn_implementation="eager"),
    "bloom_alibi": _causal("BloomConfig", "BloomForCausalLM", mask=True, vocab_size=VOCAB, hidden_size=16,
                           n_layer=1, n_head=2, attn_implementation="eager"),
    "mpt_alibi": _causal("MptConfig", "MptForCausalLM", vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2,
                         max_seq_len=32, attn_implementation="eager"),
    "falcon_multi_query": _causal("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=16,
                                  num_hidden_layers=1, num_attention_heads=4, multi_query=True,
                                  new_decoder_architecture=False, attn_implementation="eager"),
    "gpt_bigcode_multi_query": _causal("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=VOCAB, n_embd=16,
                                       n_layer=1, n_head=4, multi_query=True, n_positions=32,
                                       attn_implementation="eager"),
    "mamba_state_space": _mamba,
    # encoders
    "bert": _encoder("BertConfig", "BertForMaskedLM", **SMALL),
    "roberta": _encoder("RobertaConfig", "RobertaForMaskedLM", pad_token_id=1, **SMALL),
    "distilbert": _encoder("DistilBertConfig", "DistilBertForMaskedLM", vocab_size=VOCAB, dim=16, n_layers=1,
                           n_heads=2, hidden_dim=32, max_position_embeddings=32, attn_implementation="eager"),
    "albert": _encoder("AlbertConfig", "AlbertForMaskedLM", embedding_size=8, **SMALL),
    "electra": _encoder("ElectraConfig", "ElectraForMaskedLM", embedding_size=8, **SMALL),
    "deberta_v2": _encoder("DebertaV2Config", "DebertaV2ForMaskedLM", relative_attention=True,
                           position_buckets=4, pos_att_type=["p2c", "c2p"], **SMALL),
    "mpnet": _encoder("MPNetConfig", "MPNetForMaskedLM", **SMALL),
    # encoder-decoders
    "t5": _t5,
    "bart": _seq2seq("BartConfig", "BartForConditionalGeneration", **BART),
    "marian": _seq2seq("MarianConfig", "MarianMTModel", **BART),
    "pegasus": _seq2seq("PegasusConfig", "PegasusForConditionalGeneration", **BART),
    # speech
    "wav2vec2_mask": _wav2vec2,
    "whisper_encoder": _whisper_encoder,
    # vision transformers
    "vit": _hf_vision("ViTConfig", "ViTForImageClassification", size=16, image_size=16, patch_size=4, num_channels=3,
                      num_labels=5, **{k: v for k, v in SMALL.items() if k not in ("vocab_size", "max_position_embeddings")}),
    "deit": _hf_vision("DeiTConfig", "DeiTForImageClassificationWithTeacher", size=16, image_size=16,
                       patch_size=4, num_labels=5,
                       **{k: v for k, v in SMALL.items() if k not in ("vocab_size", "max_position_embeddings")}),
    "swin": _hf_vision("SwinConfig", "SwinForImageClassification", size=16, image_size=16, patch_size=2,
                       embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=5,
                       attn_implementation="eager"),
    # convolutional networks (HuggingFace)
    "hf_resnet": _hf_vision("ResNetConfig", "ResNetForImageClassification", embedding_size=8,
                            hidden_sizes=[8, 16], depths=[1, 1], num_labels=5),
    "hf_convnext": _hf_vision("ConvNextConfig", "ConvNextForImageClassification", num_stages=2, hidden_sizes=[8, 16],
                              depths=[1, 1], num_labels=5),
    "hf_convnext_v2": _hf_vision("ConvNextV2Config", "ConvNextV2ForImageClassification", num_stages=2,
                                 hidden_sizes=[8, 16], depths=[1, 1], num_labels=5),
    "hf_regnet": _hf_vision("RegNetConfig", "RegNetForImageClassification", embedding_size=8,
                            hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_labels=5),
    # convolutional networks (torchvision): the library's constructors, narrowed where they allow it
    "tv_resnet18": _vision(lambda tv: tv.models.resnet18(num_classes=5)),
    "tv_mobilenet_v3_small": _vision(lambda tv: tv.models.mobilenet_v3_small(num_classes=5, width_mult=0.25)),
    "tv_regnet_y": _vision(lambda tv: tv.models.RegNet(tv.models.regnet.BlockParams.from_init_params(
        depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=4, se_ratio=0.25), stem_width=8, num_classes=5)),
    "tv_densenet": _vision(lambda tv: tv.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                         bn_size=2, num_classes=5)),
    "tv_convnext": _vision(lambda tv: tv.models.ConvNeXt([tv.models.convnext.CNBlockConfig(8, 16, 1),
                                                          tv.models.convnext.CNBlockConfig(16, None, 1)], num_classes=5)),
    # convolutional networks (timm), and LeViT's convolution-attention hybrid at batch size 1
    "timm_resnet10t": _vision(lambda timm: timm.create_model("resnet10t", num_classes=5), lib="timm"),
    "timm_convnext_atto": _vision(lambda timm: timm.create_model("convnext_atto", num_classes=5), lib="timm"),
    "timm_tinynet_e": _vision(lambda timm: timm.create_model("tinynet_e", num_classes=5), lib="timm"),
    "timm_mobilevit_xxs": _vision(lambda timm: timm.create_model("mobilevit_xxs", num_classes=5), lib="timm",
                                  size=64),
    "timm_levit_batch1": _vision(lambda timm: timm.models.levit.LevitDistilled(
        img_size=64, embed_dim=(32, 48, 64), key_dim=8, depth=(1, 1, 1), num_heads=(2, 3, 4), num_classes=5),
        lib="timm", size=64, batch=1),
}
#: models whose forward values carry float32 rounding off the gradient path (Swin's float32 shifted-
#: window mask is added to the scores; Longformer's, whose central differences stop converging below
#: a step of 1e-3 -- an error growing as 1/step, from float32 rounding): the gradient is exact at
#: 1e-10, but the finite differences need the larger step and tolerance of the float32 models
FLOAT32_VALUES = {"swin", "longformer"}

def _longformer():
    cfg = T.LongformerConfig(vocab_size=VOCAB, max_position_embeddings=40, attention_window=4, pad_token_id=1,
                             **{k: v for k, v in SMALL.items() if k not in ("vocab_size", "max_position_embeddings",
                                                                           "num_attention_heads")},
                             num_attention_heads=2)
    kwargs = _tokens(True, seq=8)
    kwargs["global_attention_mask"] = torch.zeros_like(kwargs["input_ids"])
    kwargs["global_attention_mask"][:, 0] = 1       # a global token per sequence: `if is_global_attn:`
    return _hf(T.LongformerForMaskedLM(cfg), **kwargs)


#: Models torch.export cannot trace: their forward branches on tensor values (mixture-of-experts
#: routing ``for expert_idx in expert_hit``; Longformer's ``if is_global_attn:`` and its padding).
#: ``tracer="auto"`` records the ops this input runs instead (``g.meta["tracer"] == "record"``).
NOT_EXPORTABLE = {
    "mixtral_moe": _causal("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                           experts_implementation="eager", **DECODER),
    "qwen2_moe": _causal("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=16,
                         experts_implementation="eager", **DECODER),
    "olmoe": _causal("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                     experts_implementation="eager", **DECODER),
    "longformer": _longformer,
}
MOE = {k: v for k, v in NOT_EXPORTABLE.items() if k != "longformer"}

#: models whose float64 forward computes part of the gradient path in float32: their code casts
#: explicitly (``.float()`` / ``dtype=torch.float32``), e.g. Llama's ``softmax(..., dtype=float32)``
#: in eager attention (also ViT's and DeiT's), the rotary ``cos``/``sin`` and RMSNorm's variance (T5's
#: too), Mamba's ``float()`` scan.
#: Others cast too (BLOOM's ALiBi bias, OPT's mask) but off the gradient path, and stay at 1e-10.
FLOAT32_INSIDE = {"llama", "llama_mask", "mistral_sliding_window", "mistral_mask", "qwen2", "qwen3", "phi3",
                  "gemma", "gemma2_softcap", "olmo", "mamba_state_space", "t5", "vit", "deit",
                  "mixtral_moe", "qwen2_moe", "olmoe"}


def _build(name):
    """The zoo's model ``name`` with its inputs; the global generator is seeded first, so that its
    random initialisation is the same whatever ran before in the process."""
    torch.manual_seed(0)
    return (ZOO.get(name) or NOT_EXPORTABLE[name])()


# ------------------------------------------------------------------------- the reference
class _ExactHardsigmoid(TorchFunctionMode):
    """Runs ``F.hardsigmoid`` as ``clamp(x + 3, 0, 6) / 6`` (the function it is, and what
    ``torch.export`` records): torch's CPU backward of the fused op multiplies by 1/6 rounded to
    float32, also in float64, a relative error of 3e-8 in every derivative through it, too small
    for finite differences to see (``test_reference_derives_hardsigmoid_exactly``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.hardsigmoid:
            return torch.clamp(args[0] + 3, 0, 6) / 6
        return func(*args, **(kwargs or {}))


def _source_hooks(model, args, kwargs, deltas, override):
    """Add ``deltas[name]`` to each source: floating inputs (by name) and the outputs of the
    ``nn.Embedding`` modules called on an integer input (every call of the modules in ``override``,
    if given) -- the sources ``autograd_gradient`` uses."""
    int_inputs = [a for a in list(args) + list(kwargs.values())
                  if isinstance(a, torch.Tensor) and not a.dtype.is_floating_point]
    hooks = []
    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding) and path in deltas:
            def hook(mod, inp, out, path=path):
                if override is not None or (isinstance(inp[0], torch.Tensor) and any(
                        t.untyped_storage().data_ptr() == inp[0].untyped_storage().data_ptr() for t in int_inputs)):
                    return out + deltas[path]
            hooks.append(mod.register_forward_hook(hook))
    return hooks


def _output_along(model, args, kwargs, deltas, override):
    """The sink with every source shifted by its delta."""
    params = list(__import__("inspect").signature(model.forward).parameters)
    args = [a + deltas[params[i]] if params[i] in deltas else a for i, a in enumerate(args)]
    kwargs = {k: a + deltas[k] if k in deltas else a for k, a in kwargs.items()}
    hooks = _source_hooks(model, args, kwargs, deltas, override)
    try:
        with torch.no_grad():
            return _sink(model(*args, **kwargs)).item()
    finally:
        for h in hooks:
            h.remove()


def _directional_checks(model, args, kwargs, grads, override, step, n=3):
    """``(finite difference, autograd)`` directional derivatives along ``n`` random unit directions."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        d = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in grads.items()}
        norm = sum((v ** 2).sum() for v in d.values()).sqrt()
        d = {k: v / norm for k, v in d.items()}
        plus = _output_along(model, args, kwargs, {k: step * v for k, v in d.items()}, override)
        minus = _output_along(model, args, kwargs, {k: -step * v for k, v in d.items()}, override)
        out.append(((plus - minus) / (2 * step), sum((grads[k] * d[k]).sum().item() for k in d), d))
    return out


def _runs_float32(model, args, kwargs):
    """Whether a float64 forward casts a float64 tensor down to float32 anywhere (an upcast softmax,
    norm or rotary product), seen by a dispatch mode; float32 constants built from integers
    (``arange(...).float()`` frequencies) do not count."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Spy(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            result = func(*a, **(kw or {}))
            if any(isinstance(t, torch.Tensor) and t.dtype == F64 for t in tree_leaves((a, kw))) and any(
                    isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tree_leaves(result)):
                Spy.seen.append(func)
            return result
    with torch.no_grad(), Spy():
        model(*args, **kwargs)
    return bool(Spy.seen)


def _reference(model, args, kwargs, sources):
    """autograd's gradient for gradgraph's sources ``sources``.

    The default sources agree with ``autograd_gradient``'s storage heuristic except for position
    embeddings: gradgraph counts a lookup of positions computed from the token ids (RoBERTa, MPNet)
    as a source and one of positions computed from the ids' shape (BART's learned positions, called
    on the ids) as none. Then the reference takes exactly gradgraph's embedding modules. An embedding module that scales its lookup (Gemma's ``embed_scale``) has the lookup
    itself as the source, so d/d(lookup) = embed_scale * d/d(module output)."""
    with _ExactHardsigmoid():
        expected = autograd_gradient(model, args, kwargs, _sink)
        override = None
        if set(expected) != set(sources):
            modules = dict(model.named_modules())
            assert all(isinstance(modules.get(k), torch.nn.Embedding) for k in set(sources) | set(expected)), \
                f"sources {sorted(sources)} != {sorted(expected)}"
            override = set(sources)
            expected = autograd_gradient(model, args, kwargs, _sink, embeddings=override)
    return expected, override


#: Models whose code calls a custom ``torch.autograd.Function`` with a backward that is not
#: elementwise (gradgraph honours it with a dense Jacobian, see docs/capture.md). None today:
#: BLOOM's ``GeLUFunction`` has an elementwise backward and a diagonal Jacobian.
DENSE_AUTOGRAD_FUNCTIONS = {}

#: Models for which autograd is wrong, so that finite differences are the reference (the test
#: checks that autograd does disagree with them, so that the list cannot go stale): torch 2.13's CPU
#: ``BatchNorm`` backward at batch size 1 with a transposed incoming gradient, which LeViT's
#: batch-normed linear layers produce, is off by a relative O(1).
AUTOGRAD_WRONG = {"timm_levit_batch1"}

#: float64 models whose central differences need a step larger than 1e-5: their activations are
#: large beside their small gradient (the largest entry 1e-8 for the MobileNet, 2e-5 for TinyNet),
#: so rounding makes the difference quotient at step 1e-5 wrong by a few 1e-6 of the directional
#: derivative; at step 1e-3 by about 1e-7, truncation included (measured). Models with ReLU keep the
#: small step: at 1e-3 the differences cross its kinks (ResNet-18: 4e-4)
FD_STEP = {"timm_levit_batch1": 1e-3, "tv_mobilenet_v3_small": 1e-3, "timm_tinynet_e": 1e-3}



@pytest.mark.parametrize("name", sorted(ZOO) + sorted(NOT_EXPORTABLE))
def test_zoo_model_is_exact(name, no_dense_fallback):
    model, args, kwargs = _build(name)
    low = name in FLOAT32_INSIDE
    assert not low or _runs_float32(model, args, kwargs), f"{name}: no float32 inside; remove it from FLOAT32_INSIDE"
    rtol = 1e-5 if low else 1e-10
    g = gg.capture(model, args, kwargs, output=_sink)
    assert g.meta["tracer"] == ("record" if name in NOT_EXPORTABLE else "export"), g.meta.get("export_failure")
    dense = sorted({d["op"] for d in g.meta["dense_jacobians"]})
    assert dense == DENSE_AUTOGRAD_FUNCTIONS.get(name, []), f"{name}: dense Jacobians {dense}"
    got = g.gradient()
    expected, override = _reference(model, args, kwargs, got)
    scale = max(v.abs().max().item() for v in expected.values())
    assert scale > 0, f"{name}: the reference gradient is zero"
    # autograd is the reference only where central finite differences agree with it; a model with
    # float32 inside has float32 rounding in its output, so it needs a larger step and tolerance
    coarse = low or name in FLOAT32_VALUES
    fd_tol = 1e-3 if coarse else 1e-6
    checks = _directional_checks(model, args, kwargs, expected, override,
                                 step=1e-3 if coarse else FD_STEP.get(name, 1e-5))
    modules = dict(model.named_modules())
    embed_scale = {k: float(getattr(modules.get(k), "embed_scale", 1.0)) for k in expected}
    autograd_agrees = all(abs(fd - ad) <= fd_tol * (abs(fd) + scale) for fd, ad, _ in checks)
    assert autograd_agrees != (name in AUTOGRAD_WRONG), \
        f"{name}: autograd {'agrees' if autograd_agrees else 'disagrees'} with finite differences {checks}"
    if autograd_agrees:
        for k in expected:
            assert got[k].shape == expected[k].shape
            torch.testing.assert_close(got[k], embed_scale[k] * expected[k], rtol=rtol,
                                       atol=rtol * scale * embed_scale[k], msg=f"{name} {k}")
    else:   # finite differences judge: gradgraph must match them where autograd does not
        for fd, _, d in checks:
            ours = sum((got[k] / embed_scale[k] * d[k]).sum().item() for k in d)
            assert abs(ours - fd) <= fd_tol * (abs(fd) + scale), f"{name}: {ours} vs finite difference {fd}"


@pytest.mark.parametrize("name", sorted(MOE))
def test_mixture_of_experts_cannot_be_exported(name):
    """With ``tracer="export"`` the data-dependent expert loop is an error that names the model's own
    file and line (and keeps torch's message), not only torch's."""
    model, args, kwargs = _build(name)
    with pytest.raises(gg.errors.CaptureError) as err:
        gg.capture(model, args, kwargs, output=_sink, tracer="export")
    msg = str(err.value)
    assert "GuardOnDataDependentSymNode" in msg, msg
    first = msg.splitlines()[0]
    assert re.search(rf"modeling_{name.split('_')[0]}[a-z0-9_]*\.py:\d+ in forward: for expert_idx in expert_hit",
                     first), first


def _expert_rows(g, hidden=16):
    """Rows of each expert's input in the graph, in execution order: the gathers
    ``hidden_states[token_idx]`` inside the experts module."""
    return [n.shape[0] for n in g.nodes
            if n.op == "aten.index.Tensor" and n.module.endswith("mlp.experts") and n.shape[-1] == hidden]


def test_recorded_moe_follows_each_inputs_routing():
    """Each input is recorded anew and its graph follows that input's routing: only the experts the
    router picked appear, each with one row per token routed to it (the eager router's top-k,
    ``output_router_logits=True``, is the oracle), and the gradient matches autograd."""
    model, args, kwargs = _build("mixtral_moe")
    cap = gg.Capturer(model, _sink)
    counts = []
    for seed in (1, 11):
        kw = dict(kwargs, input_ids=torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed)))
        with torch.no_grad():
            logits = model(*args, **kw, output_router_logits=True).router_logits[0]
        picked = torch.bincount(torch.topk(logits, 2, dim=-1).indices.reshape(-1), minlength=4).tolist()
        g = cap.capture(args, kw)
        assert g.meta["tracer"] == "record"
        assert _expert_rows(g) == [c for c in picked if c > 0], picked
        got = g.gradient()
        expected, _ = _reference(model, args, kw, got)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5 * expected[k].abs().max().item())
        counts.append(picked)
    assert cap.n_records == 2 and cap.n_exports == 0
    assert len(cap.notes) == 1 and "expert_hit" in cap.notes[0], cap.notes    # export tried once per signature
    assert counts[0] != counts[1], "the two inputs should route differently"


#: half-precision comparison: both gradients end rounded to the model's type (half a unit of
#: roundoff each) and autograd's backward also rounds after every op in that type, while gradgraph
#: evaluates each local derivative in float32 at the values the model computed. Measured
#: differences are about one unit of roundoff of the type times the largest gradient entry
#: (bfloat16: 0.4-0.8 %, float16: 0.05 %); the tolerance is four units. A wrong Jacobian is off by
#: O(1).
HALF_ROUNDOFF_UNITS = 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_half_precision_model_captures_and_queries(name, dtype, no_dense_fallback):
    """A float16 / bfloat16 model (GPT-2-like and Llama-like) captures with its values held in
    float32, queries, and its gradient matches autograd's in the model's own precision."""
    model, args, kwargs = _build(name)
    model = model.to(dtype)
    g = gg.capture(model, args, kwargs, output=_sink)
    assert g.meta["dense_jacobians"] == []
    ops = [n for n in g.nodes if n.role == "op"]
    assert {n.dtype for n in ops} >= {str(dtype).replace("torch.", "")}
    held = [n for n in g.nodes if n.value is not None]
    assert held and all(n.value.dtype.itemsize >= 4 for n in held)   # held in float32 or wider
    got = g.gradient()
    expected, _ = _reference(model, args, kwargs, got)
    eps = torch.finfo(dtype).eps
    for k in expected:
        assert got[k].dtype == dtype and got[k].shape == expected[k].shape
        scale = expected[k].float().abs().max().item()
        assert scale > 0
        torch.testing.assert_close(got[k].float(), expected[k].float(), rtol=HALF_ROUNDOFF_UNITS * eps,
                                   atol=HALF_ROUNDOFF_UNITS * eps * scale, msg=f"{name} {k}")
    paths = g.top_paths(3)
    assert len(paths) == 3 and all(torch.isfinite(torch.tensor(p.weight)) for p in paths)
    assert torch.isfinite(torch.tensor(g.entropy()))


def test_left_padded_causal_lm_with_nan_is_reported_not_silent():
    """A left-padded Llama in float64 with eager attention produces NaN itself: the padded query rows
    are fully masked with float64's minimum, which its float32 softmax turns into -inf everywhere
    (0/0). The eager model is the oracle that the NaN is the model's. Capture warns naming the
    softmax and HF's source line; every query that meets the NaN says so (a warning, or an error
    where ranking paths is impossible); the gradient's NaNs are exactly autograd's."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**dict(DECODER, num_hidden_layers=2))).to(F64).eval()
    kwargs = _tokens()
    kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    kwargs["attention_mask"][1, :3] = 0                 # left padding of the second sequence
    kwargs["use_cache"] = False
    sink = lambda o: o.logits[1, -1, 5] - o.logits[1, -1, 7]   # noqa: E731
    with torch.no_grad():
        assert torch.isnan(model(**kwargs).logits[1]).any(), "the model itself should produce NaN here"
    with pytest.warns(gg.errors.CaptureWarning, match=r"_softmax.*modeling_llama\.py:\d+.*holds NaN"):
        g = gg.capture(model, (), kwargs, output=sink)
    assert g.meta["first_non_finite"]["op"] == "aten._softmax.default"
    with pytest.warns(gg.errors.QueryWarning, match=r"gradient\(\).*not finite.*_softmax"):
        got = g.gradient()["model.embed_tokens"]
    expected = autograd_gradient(model, (), kwargs, sink)["model.embed_tokens"]
    assert torch.isnan(expected).any()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5 * expected[finite].abs().max())
    with pytest.raises(gg.errors.QueryError, match="NaN"):
        g.top_paths(3)
    with pytest.warns(gg.errors.QueryWarning, match=r"entropy\(\) is NaN.*_softmax"):
        assert torch.isnan(torch.tensor(g.entropy()))
    with pytest.warns(gg.errors.QueryWarning, match=r"flow\(\).*not finite"):
        g.flow()


def test_reference_derives_hardsigmoid_exactly():
    """Why the reference runs ``F.hardsigmoid`` through ``_ExactHardsigmoid``: in float64, torch's
    CPU backward of the fused op gives 1/6 rounded to float32 where the derivative is 1/6 (if torch
    makes it exact, this test fails and the mode can go); under the mode autograd gives 1/6, and so
    does gradgraph, whose graph holds the decomposed ops."""
    x = torch.tensor([-0.5, 0.5, 2.0], dtype=F64, requires_grad=True)
    fused, = torch.autograd.grad(torch.nn.functional.hardsigmoid(x).sum(), x)
    assert fused.tolist() == [float(torch.tensor(1 / 6, dtype=torch.float32))] * 3
    with _ExactHardsigmoid():
        exact, = torch.autograd.grad(torch.nn.functional.hardsigmoid(x).sum(), x)
    assert exact.tolist() == [1 / 6] * 3
    g = gg.capture(torch.nn.Hardsigmoid(), (x.detach(),), output=lambda y: y.sum())
    assert g.gradient()["input"].tolist() == [1 / 6] * 3


def test_missing_vision_libs_fail_the_test_saying_what_to_do(monkeypatch, tmp_path):
    """Without the directory scripts/setup.sh fills, a test of a torchvision or timm model fails
    (it is not skipped) and says how to install them."""
    import vision_libs
    monkeypatch.setattr(vision_libs, "VISION_LIBS", tmp_path / "vision-libs")
    with pytest.raises(pytest.fail.Exception, match=r"timm is not installed in .*: run scripts/setup\.sh"):
        vision_libs.vision_lib("timm")
