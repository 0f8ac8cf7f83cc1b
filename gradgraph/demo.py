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
    per = g.entropy(per_source=True)[WORD_EMB]
    print(f"\nentropy of the path distribution: {H:.3f} nats")
    if np.ndim(per) == 3:
        # per embedding unit; summarise per token by its largest-entropy unit
        per = np.asarray(per)[0].max(-1)
    print("  per source element (max over units of each token): "
          + " ".join(f"{float(v):.2f}" for v in np.asarray(per).reshape(LENGTH, -1).max(-1)))

    graph_file = os.path.join(a.out, "graph.safetensors")
    g.save(graph_file, overwrite=True)
    print(f"\nsaved the graph to {graph_file} ({os.path.getsize(graph_file) / 1e6:.2f} MB); "
          f"query it without the model: gradgraph paths {graph_file} --k 5")

    image = os.path.join(a.out, "top_paths.svg" if shutil.which("dot") else "top_paths.dot")
    gg.render(g, paths, image, collapse="module")
    print(f"diagram of the top paths: {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
