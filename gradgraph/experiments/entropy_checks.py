"""Entropy sanity checks (paper App. B.1, Fig. 6).

MLP: 4 features uniform on [0, 1], label = (first feature > 0.5). MLPs (tanh) of hidden size
4 ... 128 (one hidden layer) and of depth 1 ... 4 (hidden size 16) are trained with a fixed seed;
for each, before and after training, the entropy of the path distribution is measured on test
inputs with the correct class's logit as the sink: the whole graph's entropy and the entropy of
the paths ending at the relevant feature (feature 0) and at the irrelevant ones (features 1-3),
as in the paper's Fig. 6b.

Sentence length: on the agreement model (:mod:`.sva_model`), the entropy of generated sentences
(the mean over tokens of the per-token entropy, the paper's "sentence entropy", and the whole
graph's) against their length in tokens (Fig. 6a).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from .common import new_figure, prepare_out, run_items, save_figure, write_csv

__all__ = ["run", "train_mlp", "mlp_entropy", "make_task", "OUTPUTS", "HIDDEN_SIZES", "DEPTHS"]

OUTPUTS = ("entropy_mlp.csv", "entropy_mlp.png", "entropy_length.csv", "entropy_length.png")
HIDDEN_SIZES = (4, 8, 16, 32, 64, 128)
DEPTHS = (1, 2, 3, 4)


def make_task(n, seed):
    """(x (n, 4) float64 uniform on [0, 1], y (n,) int64 = x[:, 0] > 0.5)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0.5).long()


def build_mlp(hidden, depth, seed):
    import torch
    torch.manual_seed(seed)
    layers, width = [], 4
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.Tanh()]
        width = hidden
    layers.append(torch.nn.Linear(width, 2))
    return torch.nn.Sequential(*layers).double()


def train_mlp(model, epochs, seed=0):
    """Adam, lr 1e-2, batch 64 on 2,000 examples; returns test accuracy on 1,000 others."""
    import torch
    x, y = make_task(2000, seed=seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), 64):
            idx = perm[b:b + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = make_task(1000, seed=seed + 2)
    with torch.no_grad():
        return float((model(xt).argmax(-1) == yt).double().mean())


def _logit_of(label):
    return (_logit0, _logit1)[label]


def _logit0(y):
    return y[0, 0]


def _logit1(y):
    return y[0, 1]


def mlp_entropy(model, x, y):
    """Mean over inputs of (whole-graph entropy, entropy at feature 0, mean entropy at 1-3)."""
    import gradgraph as gg
    out = []
    for i in range(len(x)):
        g = gg.capture(model, (x[i:i + 1],), output=_logit_of(int(y[i])))
        per = next(iter(g.entropy(per_source=True).values()))[0]
        out.append((g.entropy(), per[0], float(np.mean(per[1:]))))
    return np.mean(out, axis=0)


def mlp_item(item):
    """(hidden, depth, epochs, n_inputs) -> row: entropies before and after training."""
    import torch
    torch.set_num_threads(1)
    hidden, depth, epochs, n_inputs = item
    model = build_mlp(hidden, depth, seed=0).eval()
    x, y = make_task(n_inputs, seed=99)
    before = mlp_entropy(model, x, y)
    acc = train_mlp(model.train(), epochs)
    model.eval()
    after = mlp_entropy(model, x, y)
    return {"hidden": hidden, "depth": depth, "epochs": epochs, "test_accuracy": acc,
            "entropy_before": before[0], "entropy_after": after[0],
            "relevant_before": before[1], "relevant_after": after[1],
            "irrelevant_before": before[2], "irrelevant_after": after[2]}


def mlp_figure(rows, path):
    fig, axes = new_figure(2, width=5.0)
    for ax, (key, xs, label) in zip(axes, (("hidden", [r for r in rows if r["depth"] == 1], "Hidden size"),
                                           ("depth", [r for r in rows if r["hidden"] == 16], "Depth (hidden layers of 16)"))):
        xs = sorted(xs, key=lambda r: r[key])
        v = [r[key] for r in xs]
        ax.plot(v, [r["entropy_after"] for r in xs], marker="o", label="whole graph, trained")
        ax.plot(v, [r["entropy_before"] for r in xs], marker="o", linestyle="--", label="whole graph, untrained")
        ax.plot(v, [r["relevant_after"] for r in xs], marker="^", label="relevant feature, trained")
        ax.plot(v, [r["irrelevant_after"] for r in xs], marker="v", label="irrelevant features, trained")
        ax.set_xlabel(label)
        ax.set_ylabel("Entropy (nats)")
        if key == "hidden":
            ax.set_xscale("log", base=2)
        ax.set_xticks(v)
        ax.set_xticklabels([str(i) for i in v])
        ax.set_title(f"MLP on the 4-feature task: entropy vs {key}")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


_SVA = {}


def length_item(item):
    """(index, pair, encoded, checkpoint, padded length) -> row: length and entropies on the
    agreement model (padding tokens carry no path: see :func:`.sva.padded_inputs`)."""
    import gradgraph as gg
    from .sva import SvaSink, padded_inputs
    from .sva_model import load_checkpoint
    index, pair, enc, checkpoint, length = item
    if checkpoint not in _SVA:
        import torch
        torch.set_num_threads(1)
        model, tok = load_checkpoint(checkpoint)
        _SVA.clear()
        _SVA[checkpoint] = (SvaSink(model), len(tok.get_vocab()))
    wrapped, V = _SVA[checkpoint]
    src = "bert.embeddings.word_embeddings"
    g = gg.capture(wrapped, padded_inputs(enc, V, length), sources=[src])
    T = int(enc.ids.shape[1])
    per_token = g.entropy(groups={src: 1})[src][:T]
    return {"pair": index, "words": len(pair.words), "tokens": int(enc.ids.shape[1]),
            "entropy": float(g.entropy()), "mean_token_entropy": float(np.mean(per_token))}


def length_figure(rows, path):
    fig, axes = new_figure(1, width=5.5)
    ax = axes[0]
    T = sorted({r["tokens"] for r in rows})
    for key, label in (("mean_token_entropy", "mean per-token entropy"), ("entropy", "whole graph")):
        ax.plot(T, [np.mean([r[key] for r in rows if r["tokens"] == t]) for t in T], marker="o", label=label)
    ax.set_xlabel("Number of tokens per sentence")
    ax.set_ylabel("Mean sentence entropy (nats)")
    ax.set_title("Agreement model: entropy vs sentence length")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def run(out, *, quick=False, workers=1, overwrite=False, checkpoint=None, log=print):
    from scipy.stats import spearmanr
    from .sva_data import make_pairs
    from .sva_model import DEFAULT_CHECKPOINT, encode_pair, load_checkpoint
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    prepare_out(out, OUTPUTS, overwrite)
    epochs, n_inputs = (3, 4) if quick else (30, 20)
    hidden = (4, 16, 64) if quick else HIDDEN_SIZES
    depths = (1, 2) if quick else DEPTHS
    configs = [(h, 1, epochs, n_inputs) for h in hidden] + \
              [(16, d, epochs, n_inputs) for d in depths if d != 1]
    mlp_rows = run_items(mlp_item, configs, workers=workers, desc="entropy: MLPs")
    write_csv(os.path.join(out, OUTPUTS[0]), mlp_rows)
    mlp_figure(mlp_rows, os.path.join(out, OUTPUTS[1]))

    _, tok = load_checkpoint(checkpoint)
    pairs = make_pairs(8 if quick else 100, seed=20_000)
    encoded = [(i, p, e) for i, (p, e) in enumerate((p, encode_pair(tok, p)) for p in pairs)
               if e is not None]
    length = max(e.ids.shape[1] for _, _, e in encoded)
    items = [(i, p, e, checkpoint, length) for i, p, e in encoded]
    len_rows = run_items(length_item, items, workers=workers, desc="entropy: sentences")
    write_csv(os.path.join(out, OUTPUTS[2]), len_rows)
    length_figure(len_rows, os.path.join(out, OUTPUTS[3]))

    log("entropy-checks: MLP (one hidden layer), entropy after / before training (nats):")
    for r in mlp_rows:
        log(f"  hidden {r['hidden']:3d} depth {r['depth']}: {r['entropy_after']:.2f} / {r['entropy_before']:.2f}"
            f"  relevant {r['relevant_after']:.2f}  irrelevant {r['irrelevant_after']:.2f}"
            f"  (test accuracy {r['test_accuracy']:.3f})")
    rho, p = spearmanr([r["tokens"] for r in len_rows], [r["mean_token_entropy"] for r in len_rows])
    log(f"agreement model: mean token entropy vs tokens, Spearman rho={rho:.2f} (p={p:.2g}, "
        f"n={len(len_rows)})")
    log(f"wrote {len(OUTPUTS)} files to {out}")
    return {"mlp": mlp_rows, "length": len_rows}
