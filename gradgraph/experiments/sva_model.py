"""Masked-LM checkpoints for the agreement study: loading, encoding pairs, scoring verb forms.

Any local HuggingFace ``BertForMaskedLM`` checkpoint directory works (``config.json``, the weights,
``vocab.txt``), for example ``google/bert_uncased_L-6_H-512_A-8`` (the paper's model) saved to disk.
The default, :data:`DEFAULT_CHECKPOINT`, is the small BERT trained by
:mod:`gradgraph.experiments.train_sva` on the synthetic agreement corpus and shipped with the package.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from ..errors import GradGraphError

__all__ = ["DEFAULT_CHECKPOINT", "load_checkpoint", "encode_pair", "EncodedPair", "verb_scores",
           "CheckpointError"]

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "sva_bert")


class CheckpointError(GradGraphError):
    """A checkpoint directory that cannot be used (missing files, not a BERT masked LM)."""


def load_checkpoint(path=DEFAULT_CHECKPOINT):
    """Load ``(model, tokenizer)`` from a local BertForMaskedLM checkpoint directory.

    The model is put in eval mode with the eager attention implementation (the one gradgraph
    captures with the head axis visible). Nothing is downloaded.

    Raises
    ------
    CheckpointError
        The directory, its ``config.json`` or ``vocab.txt`` is missing, or the config is not BERT's.
    """
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist; pass a local "
                              "BertForMaskedLM directory (config.json, weights, vocab.txt)")
    for needed in ("config.json", "vocab.txt"):
        if not os.path.isfile(os.path.join(path, needed)):
            raise CheckpointError(f"checkpoint directory {path} has no {needed}")
    try:
        cfg = BertConfig.from_pretrained(path)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}/config.json: {exc}") from exc
    if cfg.model_type != "bert":
        raise CheckpointError(f"{path} holds a {cfg.model_type!r} model; a BERT masked LM is needed")
    cfg._attn_implementation = "eager"
    model = BertForMaskedLM.from_pretrained(path, config=cfg, local_files_only=True).eval()
    tokenizer = BertTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """A pair as token ids: ``ids`` (1, T) with [CLS] ... [SEP]; ``mask`` the verb's token position;
    ``good`` / ``bad`` the verb forms' token ids; ``subject`` / ``attractors`` token positions."""

    ids: torch.Tensor
    mask: int
    good: int
    bad: int
    subject: int | None
    attractors: tuple


def encode_pair(tokenizer, pair):
    """Token ids of a pair, or None when a verb form, the subject or an attractor is not a single
    token of the vocabulary (the paper kept only such sentences)."""
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    pieces = [[tokenizer.mask_token_id] if w == "[MASK]" else tokenizer.convert_tokens_to_ids(
        tokenizer.tokenize(w)) for w in pair.words]
    start, pos = 1, []
    for p in pieces:
        pos.append(start)
        start += len(p)
    good, bad = vocab.get(pair.good, unk), vocab.get(pair.bad, unk)
    if unk in (good, bad):
        return None
    single = [pair.verb_index] + ([pair.subject_index] if pair.subject_index is not None else []) \
        + list(pair.attractor_indices)
    if any(len(pieces[i]) != 1 or pieces[i][0] == unk for i in single):
        return None
    ids = [tokenizer.cls_token_id] + [t for p in pieces for t in p] + [tokenizer.sep_token_id]
    return EncodedPair(torch.tensor([ids]), pos[pair.verb_index], good, bad,
                       None if pair.subject_index is None else pos[pair.subject_index],
                       tuple(pos[i] for i in pair.attractor_indices))


def verb_scores(model, encoded, *, batch_size=64, logit=False):
    """log p(good) - log p(bad) at the mask for each encoded pair (``logit=True``: the logit
    difference, which is the same number: the softmax's normaliser cancels). > 0 means correct."""
    out = np.empty(len(encoded))
    for b in range(0, len(encoded), batch_size):
        chunk = encoded[b:b + batch_size]
        T = max(e.ids.shape[1] for e in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        att = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, :e.ids.shape[1]] = e.ids[0]
            att[i, :e.ids.shape[1]] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=att).logits
        for i, e in enumerate(chunk):
            row = logits[i, e.mask]
            if not logit:
                row = torch.log_softmax(row, -1)
            out[b + i] = float(row[e.good] - row[e.bad])
    return out
