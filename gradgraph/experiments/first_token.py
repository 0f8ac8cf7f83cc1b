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

import numpy as np

from .common import (BRANCHES, bar_groups, branch_answer, check_runner, new_figure, one_thread,
                     prepare_out, run_batch, save_figure, write_csv)

__all__ = ["FirstTokenBuild", "ClassLogit", "graph_answer", "test_items", "run", "OUTPUTS",
           "TOKEN_TYPES", "ORDERS"]

OUTPUTS = ("first_token_sentences.csv", "first_token_summary.csv", "first_token_fig2.png")
TOKEN_TYPES = ("first", "repeat", "other")
ORDERS = ("signed", "magnitude")
ATTENTION_INPUT_MODULE = "bert.embeddings.LayerNorm"
SOURCE = "bert.embeddings.word_embeddings"
#: paper Fig. 2 (read off the plot; signed order, op-level paths); None: not given
PAPER_FIG2 = {("first", "query"): 0.17, ("first", "key"): 0.095, ("first", "skip"): 0.095,
              ("first", "value"): 0.0, ("repeat", "key"): 0.27, ("other", "key"): 0.01}


class ClassLogit:
    """The bundled classifier as a module whose output is one class's logit: ``forward(input_ids,
    label)`` with ``label`` a (1,) integer tensor. The class is an input rather than part of an
    ``output`` function, so one exported program serves both classes; module paths stay
    ``bert.*`` and ``classifier`` (as in ``BertForSequenceClassification.forward``)."""

    def __new__(cls, classifier):
        import torch

        class _ClassLogit(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert, self.dropout, self.classifier = (classifier.bert, classifier.dropout,
                                                            classifier.classifier)

            def forward(self, input_ids, label):
                pooled = self.bert(input_ids=input_ids).pooler_output
                logits = self.classifier(self.dropout(pooled))
                return logits.index_select(1, label)[0, 0]
        return _ClassLogit().eval()


class FirstTokenBuild:
    """The batch build: the bundled model once per worker; an item is (token ids, label)."""

    def setup(self):
        import torch
        from ..toy import load_model
        torch.set_num_threads(1)       # the same arithmetic in every worker: identical results
        return ClassLogit(load_model())

    def inputs(self, value):
        import torch
        ids, label = value
        return (), {"input_ids": torch.tensor([ids]), "label": torch.tensor([label])}, None


def test_items(quick=False):
    """The test split of the paper's setup: examples 8000-9999 of ``make_dataset(10_000, seed=0)``
    (0.7 / 0.1 / 0.2 split, as the bundled model was trained); ``quick``: the first 20."""
    from ..toy import make_dataset
    ids, labels = make_dataset(10_000, seed=0)
    stop = 8020 if quick else 10_000
    return [(i, ids[i].tolist(), int(labels[i])) for i in range(8000, stop)]


def attention_input(g):
    """The attention layer's input: the output of the embeddings' layer norm."""
    return [n.name for n in g.nodes if n.module == ATTENTION_INPUT_MODULE and not n.is_view][-1]


def graph_answer(g):
    """The batch query of one sentence: at the attention input, per token, the best path's value
    through each branch and the best branch, in both orders."""
    node = attention_input(g)
    return {order: branch_answer(g.branches(node, order=order, groups=1)) for order in ORDERS}


def sentence_row(item, answer, sink, predicted):
    """One test sentence -> one row: per order, token type and branch the best path's value, and
    per token type the share of its tokens whose best path leaves by each branch."""
    index, ids, label = item
    repeat = ids.index(ids[0], 1) if label else None
    positions = {"first": [0], "repeat": [repeat] if label else [],
                 "other": [t for t in range(1, len(ids)) if t != repeat]}
    row = {"sentence": index, "label": label, "predicted": predicted, "repeat_position": repeat,
           "sink": sink}
    for order in ORDERS:
        br = answer[order]
        col = {b: br["labels"].index(b) for b in BRANCHES}
        values, best = np.array(br["values"]), np.array(br["best"])
        for kind, pos in positions.items():
            for b in BRANCHES:
                row[f"{order}_{kind}_{b}"] = float(values[pos, col[b]].mean()) if pos else None
                row[f"{order}_{kind}_best_{b}"] = float(np.mean(best[pos] == col[b])) if pos else None
    return row


def predictions(items):
    """The bundled model's predicted class for every item (one batched forward)."""
    import torch
    from ..toy import load_model
    with torch.no_grad():
        logits = load_model()(input_ids=torch.tensor([ids for _, ids, _ in items])).logits
    return logits.argmax(-1).tolist()


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


@one_thread
def run(out, *, quick=False, workers=1, engine="local", overwrite=False, log=print):
    """Run the study; returns the summary rows. ``workers`` / ``engine``: see
    :func:`.common.run_batch`."""
    import os
    check_runner(workers, engine)
    prepare_out(out, OUTPUTS, overwrite)
    items = test_items(quick)
    answers = run_batch([(f"s{i}", (ids, label)) for i, ids, label in items], FirstTokenBuild(),
                        "gradgraph.experiments.first_token:graph_answer", out, "first-token",
                        {"model": "bundled"}, workers=workers, engine=engine, overwrite=overwrite,
                        sources=[SOURCE], dynamic=None)
    rows = [sentence_row(it, ans, sink, pred)
            for it, (ans, sink), pred in zip(items, answers, predictions(items))]
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
