"""Spec files for ``gradgraph capture``: small random-init BERT masked language models.

A spec function returns ``(model, args, kwargs, output_fn)``; the command line captures the
gradient graph of ``output_fn(model(*args, **kwargs))``::

    gradgraph capture examples/tiny_bert.py:build --out tiny_bert.safetensors

The sink is a logit difference at the masked position (paper section 5: "is" vs "are").
No weights are downloaded: the models are built from configs with a fixed seed.
"""
import torch

MASK_POSITION = 3
TOKEN_A, TOKEN_B = 5, 7


def _bert(layers, hidden, heads, intermediate, seq_len, vocab=100, seed=0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate,
                     max_position_embeddings=max(seq_len, 16), type_vocab_size=2,
                     attn_implementation="eager")
    model = BertForMaskedLM(cfg).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(10, vocab, (1, seq_len), generator=gen)
    ids[0, MASK_POSITION] = 4          # a fixed "[MASK]" id
    mask = torch.ones_like(ids)

    def logit_difference(out):
        return out.logits[0, MASK_POSITION, TOKEN_A] - out.logits[0, MASK_POSITION, TOKEN_B]

    return model, (), {"input_ids": ids, "attention_mask": mask}, logit_difference


def build():
    """2 layers, hidden 16, 2 heads, 8 tokens: captures in seconds; for tests and the user guide."""
    return _bert(layers=2, hidden=16, heads=2, intermediate=32, seq_len=8)


def build_6x512():
    """6 layers, hidden 512, 8 heads, 32 tokens: a mid-sized graph for start-up benchmarks."""
    return _bert(layers=6, hidden=512, heads=8, intermediate=2048, seq_len=32, vocab=1000)
