"""The demo: explain one decision of the bundled FirstTokenRepeatedOnce BERT (paper §5.1).

    python -m gradgraph.demo [--out out/demo] [--k 5] [--tokens 3 7 1 9 3 4 0 12 5 8]

Captures the model's gradient graph for one sequence (sink: the logit of the correct class),
checks the gradient against ``torch.autograd``, lists the top gradient paths, computes the
entropy of the path distribution, shows which branch (query / key / value / skip) the best path
of each token takes at the attention input, saves the graph and draws the top paths.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch

import gradgraph as gg
from gradgraph.toy import LENGTH, VOCAB, load_model

DEFAULT_TOKENS = [3, 7, 1, 9, 3, 4, 0, 12, 5, 8]   # first token 3 appears again at position 4
WORD_EMB = "bert.embeddings.word_embeddings"


def _autograd_gradient(model, ids, label):
    store = {}
    hook = model.bert.embeddings.word_embeddings.register_forward_hook(
        lambda mod, inp, out: store.__setitem__("emb", out))
    try:
        logit = model(input_ids=ids).logits[0, label]
    finally:
        hook.remove()
    return torch.autograd.grad(logit, store["emb"])[0]


def _hop_summary(path):
    names = []
    for h in path.hops[1:-1]:
        label = h.module or h.op
        if not names or names[-1] != label:
            names.append(label)
    return " -> ".join(names)


def _branch_name(label):
    """"addmm @ bert.encoder.layer.0.attention.self.key" -> "key"; the residual add -> "skip"."""
    op, _, module = label.partition(" @ ")
    return "skip" if op == "add" else module.rsplit(".", 1)[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gradgraph.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    ap.add_argument("--k", type=int, default=5, help="number of top paths (default: 5)")
    ap.add_argument("--tokens", type=int, nargs=LENGTH, default=DEFAULT_TOKENS,
                    help=f"{LENGTH} token ids in [0, {VOCAB})")
    a = ap.parse_args(argv)
    if a.k < 1:
        ap.error("--k must be at least 1")
    if any(not 0 <= t < VOCAB for t in a.tokens):
        ap.error(f"token ids must be in [0, {VOCAB})")
    os.makedirs(a.out, exist_ok=True)

    model = load_model()
    ids = torch.tensor([a.tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    label = int(a.tokens[0] in a.tokens[1:])
    print(f"sequence {a.tokens}: first token repeated = {bool(label)}; "
          f"model says {bool(logits.argmax())} (logits {logits.tolist()})")

    t0 = time.perf_counter()
    g = gg.capture(model, (), {"input_ids": ids}, output=lambda out: out.logits[0, label])
    print(f"\ncaptured in {time.perf_counter() - t0:.2f}s: {g}")

    grad = g.gradient()[WORD_EMB]
    ref = _autograd_gradient(model, ids, label)
    err = (grad - ref).abs().max().item()
    print(f"gradient check vs torch.autograd.grad: max |difference| = {err:.2e} "
          f"(max |gradient| = {ref.abs().max().item():.3e})")

    t0 = time.perf_counter()
    paths = g.top_paths(k=a.k, order="signed")
    print(f"\ntop {len(paths)} gradient paths (signed max-product, {time.perf_counter() - t0:.2f}s):")
    for r, p in enumerate(paths, 1):
        pos = p.source[1][1] if len(p.source[1]) > 1 else p.source[1][0]
        print(f"  {r}. weight {p.weight:+.4e}  from token {pos} (id {a.tokens[pos]}), "
              f"{p.length} hops: {_hop_summary(p)}")

    H = g.entropy()
    per_token = g.entropy(groups={WORD_EMB: 1})[WORD_EMB]     # axis 1 of (1, tokens, hidden)
    print(f"\nentropy of the path distribution: {H:.3f} nats; per token (its hidden units "
          f"aggregated, paper Eq. 3):\n  " + " ".join(f"{v:.2f}" for v in per_token))

    attn_in = [n.name for n in g.nodes if n.module == "bert.embeddings.LayerNorm"][-1]
    br = g.branches(attn_in, groups=1)
    names = [_branch_name(lab) for lab in br.labels]
    print("\nbest path through each token at the attention input (the output of bert.embeddings.LayerNorm),"
          "\nper branch (paper Fig. 2), and the branch that carries the best one:")
    for tok in range(LENGTH):
        b = br.best[tok]
        values = "  ".join(f"{nm}=" + (f"{np.exp(br.log_abs[tok, j]) * br.sign[tok, j]:+.2e}"
                                        if br.sign[tok, j] else "no path")
                           for j, nm in enumerate(names))
        print(f"  token {tok} (id {a.tokens[tok]:2d}): {names[b] if b >= 0 else '-':6s} {values}")

    graph_file = os.path.join(a.out, "graph.safetensors")
    g.save(graph_file, overwrite=True)
    print(f"\nsaved the graph to {graph_file} ({os.path.getsize(graph_file) / 1e6:.2f} MB); "
          f"query it without the model: gradgraph paths {graph_file} --k 5")

    image = os.path.join(a.out, "top_paths.svg" if shutil.which("dot") else "top_paths.dot")
    gg.render(g, paths, image, collapse="module", overwrite=True)
    print(f"diagram of the top paths: {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
