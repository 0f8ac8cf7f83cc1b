"""FirstTokenRepeatedOnce (paper §5.1, Fig. 2) over the whole test set.

For every test sentence of the bundled 1-layer BERT (:mod:`gradgraph.toy`), with the correct
class's logit as the sink, the study asks at the attention layer's input (the output of
``bert.embeddings.LayerNorm``): through which branch - the query, key or value projection or the
skip connection (the residual add of ``attention.output``) - does the best path through each token
leave, and what is the best path's value through each branch (:meth:`GradGraph.branches`, one
group per token). Values are averaged per token type: the first token, its repeat (sentences
with label 1), the other tokens. Both orders are computed: ``signed`` (the paper's Eq. 5, most
positive path) and ``magnitude`` (largest |path|).

Outputs: ``first_token_sentences.csv`` (one row per sentence), ``first_token_summary.csv`` (per
order, token type and branch: mean value, its standard error, share of tokens whose best path
takes the branch) and ``first_token_fig2.png`` (the paper's Fig. 2 layout; the second panel
shows the magnitude order).
"""
from __future__ import annotations

import functools

import numpy as np

from .common import (BRANCHES, bar_groups, branch_name, new_figure, prepare_out, run_items,
                     save_figure, write_csv)

__all__ = ["analyse_sentence", "test_items", "run", "OUTPUTS", "TOKEN_TYPES", "ORDERS"]

OUTPUTS = ("first_token_sentences.csv", "first_token_summary.csv", "first_token_fig2.png")
TOKEN_TYPES = ("first", "repeat", "other")
ORDERS = ("signed", "magnitude")
ATTENTION_INPUT_MODULE = "bert.embeddings.LayerNorm"
#: paper Fig. 2 (read off the plot; signed order, op-level paths); None: not given
PAPER_FIG2 = {("first", "query"): 0.17, ("first", "key"): 0.095, ("first", "skip"): 0.095,
              ("first", "value"): 0.0, ("repeat", "key"): 0.27, ("other", "key"): 0.01}


@functools.lru_cache(maxsize=1)
def _model():
    import torch
    from ..toy import load_model
    torch.set_num_threads(1)
    return load_model()


def _logit_of(label):
    # one function per class, so that the capture cache traces each sink once
    return (_logit0, _logit1)[label]


def _logit0(out):
    return out.logits[0, 0]


def _logit1(out):
    return out.logits[0, 1]


def test_items(quick=False):
    """The test split of the paper's setup: examples 8000-9999 of ``make_dataset(10_000, seed=0)``
    (0.7 / 0.1 / 0.2 split, as the bundled model was trained); ``quick``: the first 20."""
    from ..toy import make_dataset
    ids, labels = make_dataset(10_000, seed=0)
    stop = 8020 if quick else 10_000
    return [(i, ids[i].tolist(), int(labels[i])) for i in range(8000, stop)]


def analyse_sentence(item):
    """One test sentence -> one row: per order, token type and branch the best path's value, and
    per token type the share of its tokens whose best path leaves by each branch."""
    import torch
    import gradgraph as gg
    index, ids, label = item
    model = _model()
    x = torch.tensor([ids])
    with torch.no_grad():
        predicted = int(model(input_ids=x).logits[0].argmax())
    g = gg.capture(model, (), {"input_ids": x}, output=_logit_of(label))
    attention_input = [n.name for n in g.nodes if n.module == ATTENTION_INPUT_MODULE and not n.is_view][-1]
    repeat = ids.index(ids[0], 1) if label else None
    positions = {"first": [0], "repeat": [repeat] if label else [],
                 "other": [t for t in range(1, len(ids)) if t != repeat]}
    row = {"sentence": index, "label": label, "predicted": predicted, "repeat_position": repeat,
           "sink": float(g.sink_value)}
    for order in ORDERS:
        br = g.branches(attention_input, order=order, groups=1)
        names = [branch_name(lab) for lab in br.labels]
        col = {b: names.index(b) for b in BRANCHES}
        values = np.where(br.sign != 0, br.values, 0.0)     # no path through a branch: value 0
        for kind, pos in positions.items():
            for b in BRANCHES:
                row[f"{order}_{kind}_{b}"] = float(values[pos, col[b]].mean()) if pos else None
                row[f"{order}_{kind}_best_{b}"] = (float(np.mean(br.best[pos] == col[b]))
                                                    if pos else None)
    return row


def summarise(rows):
    """Per order, token type and branch: mean value, standard error, share as best branch."""
    out = []
    for order in ORDERS:
        for kind in TOKEN_TYPES:
            for b in BRANCHES:
                v = np.array([r[f"{order}_{kind}_{b}"] for r in rows
                              if r[f"{order}_{kind}_{b}"] is not None], dtype=float)
                best = np.array([r[f"{order}_{kind}_best_{b}"] for r in rows
                                 if r[f"{order}_{kind}_best_{b}"] is not None], dtype=float)
                out.append({"order": order, "token_type": kind, "branch": b, "n_sentences": len(v),
                            "mean_value": float(v.mean()) if len(v) else float("nan"),
                            "stderr": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan"),
                            "share_best": float(best.mean()) if len(best) else float("nan"),
                            "paper_fig2": PAPER_FIG2.get((kind, b)) if order == "signed" else None})
    return out


def figure(summary, path):
    fig, axes = new_figure(2, width=5.2)
    labels = {"first": "First token", "repeat": "Repeat token", "other": "Other tokens"}
    for ax, order in zip(axes, ORDERS):
        values, errors = {}, {}
        for b in BRANCHES:
            sel = {r["token_type"]: r for r in summary if r["order"] == order and r["branch"] == b}
            values[b] = [sel[t]["mean_value"] for t in TOKEN_TYPES]
            errors[b] = [sel[t]["stderr"] for t in TOKEN_TYPES]
        bar_groups(ax, [labels[t] for t in TOKEN_TYPES], BRANCHES, values, errors=errors)
        ax.set_xlabel("Token type")
        ax.set_ylabel("Value of the best path through the branch")
        ax.set_title(f"{order} order" + (" (paper's Eq. 5)" if order == "signed" else " (|path|)"))
        ax.legend(title="branch", fontsize=8)
    fig.suptitle("FirstTokenRepeatedOnce: best gradient path at the attention input, by branch "
                 "(mean over test sentences)", fontsize=10)
    return save_figure(fig, path)


def run(out, *, quick=False, workers=1, overwrite=False, log=print):
    """Run the study; returns the summary rows."""
    import os
    prepare_out(out, OUTPUTS, overwrite)
    items = test_items(quick)
    _model()   # load once before a fork: the workers inherit it
    rows = run_items(analyse_sentence, items, workers=workers, desc="first-token sentences")
    write_csv(os.path.join(out, OUTPUTS[0]), rows)
    summary = summarise(rows)
    write_csv(os.path.join(out, OUTPUTS[1]), summary)
    figure(summary, os.path.join(out, OUTPUTS[2]))
    acc = np.mean([r["predicted"] == r["label"] for r in rows])
    log(f"first-token: {len(rows)} test sentences, model accuracy {acc:.4f}")
    log("mean best-path value at the attention input (signed order), per token type:")
    for kind in TOKEN_TYPES:
        cells = [f"{r['branch']}={r['mean_value']:+.4f} (best {r['share_best']:.0%})" for r in summary
                 if r["order"] == "signed" and r["token_type"] == kind]
        log(f"  {kind:6s} " + "  ".join(cells))
    log(f"wrote {', '.join(os.path.join(out, f) for f in OUTPUTS)}")
    return summary
