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

import hashlib
import os

import numpy as np

from .common import (check_runner, new_figure, one_thread, path_entropies, prepare_out, run_batch,
                     save_figure, write_csv)

__all__ = ["run", "train_mlp", "make_task", "build_mlp", "mlp_build", "mlp_answer", "length_answer",
           "OUTPUTS", "HIDDEN_SIZES", "DEPTHS"]

OUTPUTS = ("entropy_mlp.csv", "entropy_mlp.png", "entropy_length.csv", "entropy_length.png")
HIDDEN_SIZES = (4, 8, 16, 32, 64, 128)
DEPTHS = (1, 2, 3, 4)
N_SENTENCES = 100
SOURCE = "bert.embeddings.word_embeddings"


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


class _Logit:
    """An MLP as a module whose output is one class's logit: ``forward(x, label)``, ``label`` a (1,)
    integer tensor (an input, so one exported program serves both classes)."""

    def __new__(cls, mlp):
        import torch

        class _MlpLogit(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = mlp

            def forward(self, x, label):
                return self.mlp(x).index_select(1, label)[0, 0]
        return _MlpLogit().eval()


_MLPS = {}      # per process: (hidden, depth, digest of the weights) -> the model, built once


def _state_digest(state):
    h = hashlib.sha1()
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    return h.hexdigest()


def mlp_build(value):
    """The batch build of the MLP items: ``value`` = (hidden, depth, weights {name: array}, digest,
    x (4 floats), label). Each distinct model is built once per process, so its inputs share one
    exported program."""
    import torch
    hidden, depth, state, digest, x, label = value
    key = (hidden, depth, digest)
    if key not in _MLPS:
        torch.set_num_threads(1)
        if len(_MLPS) > 64:
            _MLPS.clear()
        mlp = build_mlp(hidden, depth, seed=0)
        mlp.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        _MLPS[key] = _Logit(mlp.eval())
    return (_MLPS[key], (torch.tensor([x], dtype=torch.float64), torch.tensor([label])), {}, None)


def mlp_answer(g):
    """The batch query of one MLP input: the whole graph's entropy and the entropy of the paths
    ending at each of the 4 features (one pass)."""
    total, per = path_entropies(g, {"x": 1})
    return {"entropy": total, "features": per["x"].tolist()}


def mlp_rows(configs, epochs, n_inputs, out, *, workers, engine, overwrite):
    """One row per (hidden, depth): test accuracy after training, and the entropies averaged over
    ``n_inputs`` test inputs before and after training (sink: the correct class's logit)."""
    x, y = make_task(n_inputs, seed=99)
    items, acc = [], {}
    for hidden, depth in configs:
        model = build_mlp(hidden, depth, seed=0)
        untrained = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        acc[hidden, depth] = train_mlp(model.train(), epochs)
        trained = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        for phase, state in (("before", untrained), ("after", trained)):
            digest = _state_digest(state)
            items += [(f"h{hidden}-d{depth}-{phase}-x{i}",
                       (hidden, depth, state, digest, x[i].tolist(), int(y[i]))) for i in range(n_inputs)]
    answers = run_batch(items, mlp_build, "gradgraph.experiments.entropy_checks:mlp_answer", out, "mlp",
                        {"epochs": epochs, "inputs": n_inputs}, workers=workers, engine=engine,
                        overwrite=overwrite, dynamic=None)
    found = {key: ans for (key, _), (ans, _) in zip(items, answers)}
    rows = []
    for hidden, depth in configs:
        row = {"hidden": hidden, "depth": depth, "epochs": epochs, "test_accuracy": acc[hidden, depth]}
        for phase in ("before", "after"):
            ans = [found[f"h{hidden}-d{depth}-{phase}-x{i}"] for i in range(n_inputs)]
            row[f"entropy_{phase}"] = float(np.mean([a["entropy"] for a in ans]))
            row[f"relevant_{phase}"] = float(np.mean([a["features"][0] for a in ans]))
            row[f"irrelevant_{phase}"] = float(np.mean([np.mean(a["features"][1:]) for a in ans]))
        rows.append(row)
    return rows


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


def length_answer(g):
    """The batch query of one sentence on the agreement model: the whole graph's entropy and the
    mean per-token entropy (one pass)."""
    from .sva import SOURCE
    total, per = path_entropies(g, {SOURCE: 1})
    return {"entropy": total, "mean_token_entropy": float(np.mean(per[SOURCE]))}


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


@one_thread
def run(out, *, quick=False, workers=1, engine="local", overwrite=False, checkpoint=None, log=print):
    """Run the study; returns ``{"mlp": rows, "length": rows}``. ``workers`` / ``engine``: see
    :func:`.common.run_batch`."""
    from scipy.stats import spearmanr
    from .sva import SvaBuild
    from .sva_data import make_pairs
    from .sva_model import DEFAULT_CHECKPOINT, encode_pair, load_checkpoint
    checkpoint = os.path.abspath(checkpoint or DEFAULT_CHECKPOINT)
    check_runner(workers, engine)
    prepare_out(out, OUTPUTS, overwrite)
    epochs, n_inputs = (3, 4) if quick else (30, 20)
    hidden = (4, 16, 64) if quick else HIDDEN_SIZES
    depths = (1, 2) if quick else DEPTHS
    configs = [(h, 1) for h in hidden] + [(16, d) for d in depths if d != 1]
    mlp_table = mlp_rows(configs, epochs, n_inputs, out, workers=workers, engine=engine, overwrite=overwrite)
    write_csv(os.path.join(out, OUTPUTS[0]), mlp_table)
    mlp_figure(mlp_table, os.path.join(out, OUTPUTS[1]))

    _, tok = load_checkpoint(checkpoint)
    pairs = make_pairs(8 if quick else N_SENTENCES, seed=20_000)
    encoded = [(i, p, e) for i, (p, e) in enumerate((p, encode_pair(tok, p)) for p in pairs)
               if e is not None]
    answers = run_batch([(f"p{i}", e) for i, _, e in encoded], SvaBuild(checkpoint),
                        "gradgraph.experiments.entropy_checks:length_answer", out, "length",
                        {"checkpoint": checkpoint}, workers=workers, engine=engine, overwrite=overwrite,
                        sources=[SOURCE])
    len_rows = [{"pair": i, "words": len(p.words), "tokens": int(e.ids.shape[1]), "entropy": a["entropy"],
                 "mean_token_entropy": a["mean_token_entropy"]} for (i, p, e), (a, _) in zip(encoded, answers)]
    write_csv(os.path.join(out, OUTPUTS[2]), len_rows)
    length_figure(len_rows, os.path.join(out, OUTPUTS[3]))

    log("entropy-checks: MLP (one hidden layer), entropy after / before training (nats):")
    for r in mlp_table:
        log(f"  hidden {r['hidden']:3d} depth {r['depth']}: {r['entropy_after']:.2f} / {r['entropy_before']:.2f}"
            f"  relevant {r['relevant_after']:.2f}  irrelevant {r['irrelevant_after']:.2f}"
            f"  (test accuracy {r['test_accuracy']:.3f})")
    rho, p = spearmanr([r["tokens"] for r in len_rows], [r["mean_token_entropy"] for r in len_rows])
    log(f"agreement model: mean token entropy vs tokens, Spearman rho={rho:.2f} (p={p:.2g}, "
        f"n={len(len_rows)})")
    log(f"wrote {len(OUTPUTS)} files to {out}")
    return {"mlp": mlp_table, "length": len_rows}
