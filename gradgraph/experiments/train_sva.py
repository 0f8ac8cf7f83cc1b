"""Train the small BERT masked LM of the agreement study and save it as a checkpoint directory.

    python -m gradgraph.experiments.train_sva [--steps 1000] [--out gradgraph/data/sva_bert] [--overwrite]

The corpus is the grammar of :mod:`gradgraph.experiments.sva_data` (grammatical sentences, seeds
disjoint from the evaluation seeds). Each training sentence has its main verb masked with
probability 1/2, and every other word with probability 0.15 (BERT's 80/10/10 replacement), so the
model learns agreement as a masked LM, not as a classifier. Deterministic: one seed for the
initialisation, the data and the masking; one torch thread by default (``--threads``), which
was the fastest on a shared 2-core machine.
Model: BERT with 6 layers, hidden 64, 8 heads (head size 8), feed-forward 256 - the paper's
6 layers x 8 heads at 1/8 of its width - and a word-level vocabulary of the grammar's words.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from .sva_data import MASK, corpus_words, make_pairs, sentence_words
from .sva_model import DEFAULT_CHECKPOINT

__all__ = ["build_model", "train", "SPECIAL", "TRAIN_SEED", "EVAL_SEED"]

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", MASK]
TRAIN_SEED, EVAL_SEED = 1, 10_000


def build_model(vocab_size, *, layers=6, hidden=64, heads=8, seed=0):
    from transformers import BertConfig, BertForMaskedLM
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * hidden,
                     max_position_embeddings=32, type_vocab_size=1, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, attn_implementation="eager")
    torch.manual_seed(seed)
    return BertForMaskedLM(cfg)


def _batch(pairs, word_id, rng, verb_mask_prob=0.5, mask_prob=0.15):
    """Token ids, attention mask and MLM labels (-100 where not predicted) for a list of pairs."""
    T = max(len(p.words) for p in pairs) + 2
    ids = np.zeros((len(pairs), T), dtype=np.int64)
    labels = np.full((len(pairs), T), -100, dtype=np.int64)
    att = np.zeros((len(pairs), T), dtype=np.int64)
    n_vocab = len(word_id)
    for i, p in enumerate(pairs):
        toks = [word_id["[CLS]"]] + [word_id[w] for w in sentence_words(p)] + [word_id["[SEP]"]]
        ids[i, :len(toks)] = toks
        att[i, :len(toks)] = 1
        chosen = rng.random(len(p.words)) < mask_prob
        chosen[p.verb_index] = rng.random() < verb_mask_prob
        for w in np.flatnonzero(chosen):
            t = w + 1
            labels[i, t] = ids[i, t]
            r = rng.random()
            if r < 0.8:
                ids[i, t] = word_id[MASK]
            elif r < 0.9:
                ids[i, t] = rng.integers(len(SPECIAL), n_vocab)
    return torch.from_numpy(ids), torch.from_numpy(att), torch.from_numpy(labels)


def accuracy(model, word_id, pairs):
    """Share of pairs with log p(good) > log p(bad) at the mask."""
    model.eval()
    correct = 0
    for b in range(0, len(pairs), 256):
        chunk = pairs[b:b + 256]
        T = max(len(p.words) for p in chunk) + 2
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        att = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, p in enumerate(chunk):
            toks = [word_id["[CLS]"]] + [word_id[w] for w in p.words] + [word_id["[SEP]"]]
            ids[i, :len(toks)] = torch.tensor(toks)
            att[i, :len(toks)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=att).logits
        for i, p in enumerate(chunk):
            row = logits[i, p.verb_index + 1]
            correct += int(row[word_id[p.good]] > row[word_id[p.bad]])
    model.train()
    return correct / len(pairs)


def train(steps=1000, batch_size=64, lr=1e-3, seed=0, log=print):
    """Train; returns (model, vocabulary list, log of (step, loss, accuracy))."""
    torch.manual_seed(seed)
    vocab = SPECIAL + corpus_words()
    word_id = {w: i for i, w in enumerate(vocab)}
    model = build_model(len(vocab), seed=seed)
    train_pairs = make_pairs(steps * batch_size // 4, seed=TRAIN_SEED)
    dev = make_pairs(1000, seed=EVAL_SEED - 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup))))
    rng = np.random.default_rng(seed)
    history, t0 = [], time.time()
    model.train()
    for step in range(steps):
        idx = rng.integers(len(train_pairs), size=batch_size)
        ids, att, labels = _batch([train_pairs[i] for i in idx], word_id, rng)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            acc = accuracy(model, word_id, dev)
            history.append((step + 1, loss.item(), acc))
            log(f"step {step + 1}/{steps}: loss {loss.item():.3f}  dev agreement accuracy {acc:.4f}  "
                f"({time.time() - t0:.0f}s)")
    return model.eval(), vocab, history


def save(model, vocab, out, history):
    """Write config.json, model.safetensors, vocab.txt and the training log into ``out``."""
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True}, f)
    with open(os.path.join(out, "training_log.json"), "w") as f:
        json.dump([{"step": s, "loss": l, "dev_accuracy": a} for s, l, a in history], f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gradgraph.experiments.train_sva", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    a = ap.parse_args(argv)
    if os.path.exists(os.path.join(a.out, "config.json")) and not a.overwrite:
        print(f"error: {a.out} already holds a checkpoint; pass --overwrite to replace it", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    model, vocab, history = train(a.steps, a.batch_size, a.lr, a.seed)
    save(model, vocab, a.out, history)
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
