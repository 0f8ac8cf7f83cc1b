"""The FirstTokenRepeatedOnce task and its 1-layer BERT (paper §5.1), bundled for the demo.

A sequence of 10 tokens over a vocabulary of 20 is labelled 1 when its first token appears again
(exactly once more), else 0. The bundled weights (``gradgraph/data/ftro_bert.safetensors``) come
from ``python -m gradgraph.experiments.train_first_token``; :func:`load_model` rebuilds the model from them
without any download.
"""
from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["VOCAB", "LENGTH", "make_dataset", "build_model", "load_model", "WEIGHTS"]

VOCAB, LENGTH = 20, 10
WEIGHTS = os.path.join(os.path.dirname(__file__), "data", "ftro_bert.safetensors")


def make_dataset(n, seed=0):
    """n balanced examples: (ids (n, LENGTH) int64, labels (n,) int64)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((n, LENGTH), dtype=np.int64)
    labels = np.arange(n) % 2
    for i in range(n):
        first = rng.integers(VOCAB)
        rest = rng.choice(np.setdiff1d(np.arange(VOCAB), [first]), LENGTH - 1, replace=True)
        if labels[i]:
            rest[rng.integers(LENGTH - 1)] = first
        ids[i] = np.concatenate([[first], rest])
    order = rng.permutation(n)
    return torch.from_numpy(ids[order]), torch.from_numpy(labels[order])


def build_model():
    """The paper's model: 1-layer BERT, hidden 16, 2 heads, randomly initialised."""
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=LENGTH, type_vocab_size=1,
                     hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, num_labels=2,
                     attn_implementation="eager")
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def load_model(path=WEIGHTS):
    """The bundled trained model, in eval mode."""
    from safetensors.torch import load_file
    model = build_model()
    model.load_state_dict(load_file(path), strict=False)
    return model.eval()
