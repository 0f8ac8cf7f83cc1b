"""Subject-verb agreement on a BERT masked LM (paper §5.2, Fig. 4, App. B.2) and a head ablation.

Per sentence (a pair of :mod:`.sva_data` encoded by :mod:`.sva_model`), the sink is
log p(good verb) - log p(bad verb) at the mask (``sink="logit"``: the logit difference; both are
the same number, but the log-softmax adds paths through the normaliser that cancel in the
gradient and still count for paths and entropy). The study then computes

* per layer, at the attention input, the best path's value through each branch (query, key,
  value, skip) and which branch carries the best path, for (a) the subject token, (b) the
  attractor tokens, (c) all tokens (:meth:`GradGraph.branches`, signed order) - Fig. 4;
* the key / value split of the last layer's best subject paths (the paper: 76 % / 24 %);
* the entropy of the path distribution, against the number of attractors within sentence-length
  bins, with Spearman's rank correlation (App. B.2);
* the |gradient| flow through every attention head (:func:`.heads.head_flow`), as a share of the
  total flow Z;

and, over a larger set of pairs, agreement accuracy by number of attractors, and the ablation:
heads ranked by their mean flow share; the top-n, bottom-n and n random heads masked
(n = 1, 2, 4, 8; random over several seeds); agreement accuracy for each.
"""
from __future__ import annotations

import os

import numpy as np

from .common import (BRANCHES, ExperimentError, bar_groups, branch_answer, check_runner,
                     new_figure, one_thread, path_entropies, prepare_out, run_batch, save_figure,
                     write_csv)

__all__ = ["run", "SvaSink", "SvaBuild", "graph_answer", "pair_row", "attention_inputs", "OUTPUTS",
           "PAPER_FIG4_SUBJECT", "SOURCE"]

OUTPUTS = ("sva_sentences.csv", "sva_accuracy.csv", "sva_branches.csv", "sva_fig4.png",
           "sva_entropy.csv", "sva_entropy.png", "sva_head_flow.csv", "sva_head_flow.png",
           "sva_ablation.csv", "sva_ablation.png")
GROUPS = ("subject", "attractors", "all")
#: paper Fig. 4, subject panel: value of the best path per layer 0..5 and branch
PAPER_FIG4_SUBJECT = {"skip": [.299, .205, .211, .211, .131, 0], "key": [.020, .001, .001, .014, .080, .114],
                      "value": [0, 0, 0, 0, .009, .036], "query": [0] * 6}
LENGTH_BINS = ((4, 8), (8, 11), (11, 14), (14, 40))
ABLATION_N = (1, 2, 4, 8)
SOURCE = "bert.embeddings.word_embeddings"
#: analysed pairs (the paper: 1,000 sampled, 670 kept) and scored pairs, full and --quick
N_ANALYSED, N_SCORED, N_ABLATION = 1000, 4000, 2000
N_ANALYSED_QUICK, N_SCORED_QUICK, N_ABLATION_QUICK = 8, 200, 200


class SvaSink:
    """A BertForMaskedLM as a module with the sink inside: ``forward(input_ids, position, verbs)``
    returns log p(verbs[0]) - log p(verbs[1]) at token ``position`` (``sink="logit"``: the logit
    difference). ``position`` (1,) and ``verbs`` (2,) are integer tensors, so one exported program
    serves every pair (the sequence length is exported symbolic). Only the masked position's row
    goes through the MLM head: the other rows cannot reach the sink."""

    def __new__(cls, mlm, sink="logprob"):
        import torch

        class _Sink(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert, self.cls = mlm.bert, mlm.cls   # module paths stay bert.* and cls.*

            def forward(self, input_ids, position, verbs):
                hidden = self.bert(input_ids=input_ids).last_hidden_state
                scores = self.cls(hidden.index_select(1, position))
                if sink == "logprob":
                    scores = torch.log_softmax(scores, dim=-1)
                pair = scores.index_select(2, verbs)
                return pair[0, 0, 0] - pair[0, 0, 1]
        if sink not in ("logprob", "logit"):
            raise ExperimentError(f"sink must be 'logprob' or 'logit', got {sink!r}")
        return _Sink().eval()


def sink_inputs(encoded):
    """The keyword inputs of :class:`SvaSink` for one encoded pair."""
    import torch
    return {"input_ids": encoded.ids, "position": torch.tensor([encoded.mask]),
            "verbs": torch.tensor([encoded.good, encoded.bad])}


def attention_inputs(g):
    """Per layer, the name of the tensor that feeds the query, key and value projections and the
    residual add: found by walking back from the query projection through views."""
    import re
    pat = re.compile(r"^(.*\.)?layer\.(\d+)\.attention\.self\.query$")
    found = {}
    for i, n in enumerate(g.nodes):
        m = pat.match(n.module or "")
        if m and not n.is_view and int(m.group(2)) not in found:
            x = g.edges[g.in_edges[i][0]].src
            while g.nodes[x].is_view:
                x = g.edges[g.in_edges[x][0]].src
            found[int(m.group(2))] = g.nodes[x].name
    return [found[k] for k in sorted(found)]


class SvaBuild:
    """The batch build: the checkpoint loaded once per worker; an item is an encoded pair."""

    def __init__(self, checkpoint, sink="logprob"):
        self.checkpoint, self.sink = checkpoint, sink

    def setup(self):
        import torch
        from .sva_model import load_checkpoint
        torch.set_num_threads(1)       # the same arithmetic in every worker: identical results
        return SvaSink(load_checkpoint(self.checkpoint)[0], self.sink)

    def inputs(self, encoded):
        return (), sink_inputs(encoded), None


def graph_answer(g):
    """The batch query of one pair: the entropy (whole graph and per token, one pass), per layer
    the best path's value through each branch of the attention input per token (one shared pass
    for all layers), and the |gradient| flow through each head as a share of Z."""
    from .heads import head_flow
    total, per = path_entropies(g, {SOURCE: 1})
    layers = [branch_answer(b) for b in g.branches(attention_inputs(g), groups=1)]
    flows = g.flow(by="element")
    Z = float(np.sum(flows[g.nodes[g.sink].name]))
    heads = [(f / Z).tolist() for f in head_flow(g, flows=flows).values()]
    return {"entropy": total, "token_entropy": per[SOURCE].tolist(), "layers": layers, "heads": heads}


def pair_row(index, pair, enc, answer, sink):
    """One analysed pair -> one row of ``sva_sentences.csv`` (see the module docstring)."""
    T = enc.ids.shape[1]
    row = {"pair": index, "structure": pair.structure, "words": len(pair.words), "tokens": T,
           "n_attractors": pair.n_attractors, "n_intervening": pair.n_intervening,
           "plural": pair.plural, "score": sink, "correct": bool(sink > 0),
           "entropy": answer["entropy"], "mean_token_entropy": float(np.mean(answer["token_entropy"]))}
    positions = {"subject": [] if enc.subject is None else [enc.subject],
                 "attractors": list(enc.attractors), "all": list(range(T))}
    for layer, br in enumerate(answer["layers"]):
        values, best = np.array(br["values"]), np.array(br["best"])
        for grp, pos in positions.items():
            for b in BRANCHES:
                if b not in br["labels"] or not pos:
                    row[f"L{layer}_{grp}_{b}"] = row[f"L{layer}_{grp}_best_{b}"] = None
                    continue
                j = br["labels"].index(b)
                row[f"L{layer}_{grp}_{b}"] = float(values[pos, j].mean())
                row[f"L{layer}_{grp}_best_{b}"] = float(np.mean(best[pos] == j))
    for layer, shares in enumerate(answer["heads"]):
        for h, v in enumerate(shares):
            row[f"head_L{layer}_H{h}"] = v
    return row


def _mean(rows, key):
    v = [r[key] for r in rows if r.get(key) is not None]
    return (float(np.mean(v)), float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0,
            len(v)) if v else (float("nan"), float("nan"), 0)


def branch_table(rows, n_layers):
    out = []
    for grp in GROUPS:
        for layer in range(n_layers):
            for b in BRANCHES:
                m, se, n = _mean(rows, f"L{layer}_{grp}_{b}")
                share, _, _ = _mean(rows, f"L{layer}_{grp}_best_{b}")
                paper = PAPER_FIG4_SUBJECT[b][layer] if grp == "subject" and n_layers == 6 else None
                out.append({"group": grp, "layer": layer, "branch": b, "mean_value": m, "stderr": se,
                            "share_best": share, "n_sentences": n, "paper_fig4": paper})
    return out


def fig4(table, n_layers, path):
    fig, axes = new_figure(3, width=4.6)
    titles = {"all": "All tokens", "subject": "Subject only", "attractors": "Preceding attractors"}
    for ax, grp in zip(axes, ("all", "subject", "attractors")):
        values = {b: [next(r["mean_value"] for r in table if r["group"] == grp and r["layer"] == L
                           and r["branch"] == b) for L in range(n_layers)] for b in BRANCHES}
        bar_groups(ax, [str(L) for L in range(n_layers)], BRANCHES, values)
        ax.set_xlabel("Layer number")
        ax.set_ylabel("Value of the best path through the branch")
        ax.set_title(titles[grp])
        ax.legend(fontsize=7, title="branch", title_fontsize=7)
    fig.suptitle("Agreement: best gradient path at each layer's attention input, by branch "
                 "(signed order, mean over sentences)", fontsize=10)
    return save_figure(fig, path)


def accuracy_table(pairs, scores):
    rows = []
    counts = sorted({p.n_attractors for p in pairs})
    for k in counts + ["all"]:
        sel = [s for p, s in zip(pairs, scores) if k == "all" or p.n_attractors == k]
        rows.append({"n_attractors": k, "n_pairs": len(sel),
                     "accuracy": float(np.mean(np.asarray(sel) > 0)) if sel else float("nan")})
    return rows


def entropy_table(rows):
    from scipy.stats import spearmanr
    out = []
    for lo, hi in LENGTH_BINS:
        sel = [r for r in rows if lo <= r["words"] < hi]
        x = [r["n_attractors"] for r in sel]
        y = [r["entropy"] for r in sel]
        if len(sel) >= 3 and len(set(x)) > 1:
            rho, p = spearmanr(x, y)
        else:
            rho, p = float("nan"), float("nan")
        out.append({"words_from": lo, "words_to": hi - 1, "n_sentences": len(sel),
                    "spearman_rho": float(rho), "p_value": float(p),
                    "mean_entropy": float(np.mean(y)) if y else float("nan")})
    return out


def entropy_figure(rows, table, path):
    fig, axes = new_figure(2, width=5.0)
    ax = axes[0]
    for lo, hi in LENGTH_BINS:
        sel = [r for r in rows if lo <= r["words"] < hi]
        if not sel:
            continue
        ks = sorted({r["n_attractors"] for r in sel})
        ax.plot(ks, [np.mean([r["entropy"] for r in sel if r["n_attractors"] == k]) for k in ks],
                marker="o", label=f"{lo}-{hi - 1} words")
    ax.set_xlabel("Number of attractors")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("Entropy of the path distribution (nats)")
    ax.set_title("Entropy vs attractors, by sentence length")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.scatter([r["words"] for r in rows], [r["entropy"] for r in rows], s=8, alpha=0.6)
    ax.set_xlabel("Sentence length (words)")
    ax.set_ylabel("Entropy (nats)")
    ax.set_title("Entropy vs sentence length")
    return save_figure(fig, path)


def head_table(rows, n_layers, n_heads):
    out = []
    for L in range(n_layers):
        for h in range(n_heads):
            m, se, n = _mean(rows, f"head_L{L}_H{h}")
            out.append({"layer": L, "head": h, "mean_flow_share": m, "stderr": se, "n_sentences": n})
    order = sorted(range(len(out)), key=lambda i: -out[i]["mean_flow_share"])
    for rank, i in enumerate(order):
        out[i]["rank"] = rank + 1
    return out


def head_figure(table, n_layers, n_heads, path):
    fig, axes = new_figure(1, width=6.0, height=4.0)
    ax = axes[0]
    M = np.array([[next(r["mean_flow_share"] for r in table if r["layer"] == L and r["head"] == h)
                   for h in range(n_heads)] for L in range(n_layers)])
    im = ax.imshow(M, aspect="auto", cmap="viridis")
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_title("Gradient flow through each attention head (share of Z, mean over sentences)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="flow / Z")
    return save_figure(fig, path)


def ablation(model, encoded, head_rank, *, ns=ABLATION_N, seeds=5, log=print):
    """Agreement accuracy (and the mean margin log p(good) - log p(bad)) with the top-n, bottom-n
    and n random heads masked."""
    from .heads import mask_heads
    from .sva_model import verb_scores
    scores = verb_scores(model, encoded)
    base = float(np.mean(scores > 0))
    rows = [{"selection": "none", "n": 0, "seed": None, "heads": "", "accuracy": base,
             "mean_margin": float(np.mean(scores))}]
    all_heads = [(r["layer"], r["head"]) for r in sorted(head_rank, key=lambda r: r["rank"])]
    rng = np.random.default_rng(0)
    jobs = []
    for n in ns:
        if n > len(all_heads):
            continue
        jobs.append(("top", n, None, all_heads[:n]))
        jobs.append(("bottom", n, None, all_heads[-n:]))
        for s in range(seeds):
            pick = rng.choice(len(all_heads), size=n, replace=False)
            jobs.append(("random", n, s, [all_heads[i] for i in sorted(pick)]))
    from tqdm import tqdm
    for sel, n, s, heads in tqdm(jobs, desc="head ablation", unit="mask"):
        with mask_heads(model, heads):
            scores = verb_scores(model, encoded)
        rows.append({"selection": sel, "n": n, "seed": s,
                     "heads": " ".join(f"{L}.{h}" for L, h in heads),
                     "accuracy": float(np.mean(scores > 0)), "mean_margin": float(np.mean(scores))})
    return rows


def ablation_figure(rows, path):
    """Accuracy and mean margin against the number of heads masked, per selection."""
    fig, axes = new_figure(2, width=5.2)
    ns = sorted({r["n"] for r in rows if r["n"]})
    for ax, key, label in ((axes[0], "accuracy", "Agreement accuracy"),
                           (axes[1], "mean_margin", "Mean log p(good) - log p(bad)")):
        base = rows[0][key]
        for sel, color in (("top", "#C44E52"), ("bottom", "#4C72B0")):
            ax.plot(ns, [next(r[key] for r in rows if r["selection"] == sel and r["n"] == n)
                         for n in ns], marker="o", color=color, label=f"{sel}-n by flow")
        rnd = [[r[key] for r in rows if r["selection"] == "random" and r["n"] == n] for n in ns]
        ax.errorbar(ns, [np.mean(v) for v in rnd], yerr=[np.std(v) for v in rnd], marker="s",
                    color="gray", capsize=3, label="n random (mean ± sd over seeds)")
        ax.axhline(base, color="black", linestyle=":", label="no head masked")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("Number of heads masked")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("Masking attention heads ranked by gradient flow", fontsize=10)
    return save_figure(fig, path)


def load_pairs(quick, tsv=None, n_eval=None):
    """(analysis pairs, evaluation pairs): generated, or read from a Goldberg (2019) TSV. The
    analysis pairs are the first :data:`N_ANALYSED` of the evaluation pairs (``quick``:
    :data:`N_ANALYSED_QUICK` of :data:`N_SCORED_QUICK`)."""
    from .sva_data import load_lgd_tsv, make_pairs
    from .train_sva import EVAL_SEED
    n_an = N_ANALYSED_QUICK if quick else N_ANALYSED
    if tsv:
        pairs = load_lgd_tsv(tsv)
        return pairs[:n_an], pairs
    evals = make_pairs(n_eval or (N_SCORED_QUICK if quick else N_SCORED), seed=EVAL_SEED)
    return evals[:n_an], evals


@one_thread
def run(out, *, quick=False, workers=1, engine="local", overwrite=False, checkpoint=None, sink="logprob",
        tsv=None, log=print):
    """Run the study; returns a dict of the tables. ``workers`` / ``engine``: see
    :func:`.common.run_batch`."""
    from .sva_model import DEFAULT_CHECKPOINT, encode_pair, load_checkpoint, verb_scores
    checkpoint = os.path.abspath(checkpoint or DEFAULT_CHECKPOINT)
    if sink not in ("logprob", "logit"):
        raise ExperimentError(f"sink must be 'logprob' or 'logit', got {sink!r}")
    check_runner(workers, engine)
    prepare_out(out, OUTPUTS, overwrite)
    model, tok = load_checkpoint(checkpoint)
    analysed, evaluation = load_pairs(quick, tsv)
    enc_eval = [(p, encode_pair(tok, p)) for p in evaluation]
    kept = [(p, e) for p, e in enc_eval if e is not None]
    if not kept:
        raise ExperimentError("no pair has single-token verb forms, subject and attractors in this "
                              "checkpoint's vocabulary")
    scores = verb_scores(model, [e for _, e in kept])
    acc = accuracy_table([p for p, _ in kept], scores)
    write_csv(os.path.join(out, "sva_accuracy.csv"), acc)

    encoded = [(i, p, e) for i, (p, e) in enumerate(enc_eval[:len(analysed)]) if e is not None]
    answers = run_batch([(f"p{i}", e) for i, _, e in encoded], SvaBuild(checkpoint, sink),
                        "gradgraph.experiments.sva:graph_answer", out, "sva",
                        {"checkpoint": checkpoint, "sink": sink, "tsv": os.path.abspath(tsv) if tsv else None},
                        workers=workers, engine=engine, overwrite=overwrite, sources=[SOURCE])
    rows = [pair_row(i, p, e, ans, sink_value) for (i, p, e), (ans, sink_value) in zip(encoded, answers)]
    write_csv(os.path.join(out, "sva_sentences.csv"), rows)
    n_layers = model.config.num_hidden_layers
    n_heads = model.config.num_attention_heads
    table = branch_table(rows, n_layers)
    write_csv(os.path.join(out, "sva_branches.csv"), table)
    fig4(table, n_layers, os.path.join(out, "sva_fig4.png"))
    ent = entropy_table(rows)
    write_csv(os.path.join(out, "sva_entropy.csv"), ent)
    entropy_figure(rows, ent, os.path.join(out, "sva_entropy.png"))
    heads = head_table(rows, n_layers, n_heads)
    write_csv(os.path.join(out, "sva_head_flow.csv"), heads)
    head_figure(heads, n_layers, n_heads, os.path.join(out, "sva_head_flow.png"))
    abl_pairs = [e for _, e in kept][:N_ABLATION_QUICK if quick else N_ABLATION]
    abl = ablation(model, abl_pairs, heads, seeds=2 if quick else 5)
    write_csv(os.path.join(out, "sva_ablation.csv"), abl)
    ablation_figure(abl, os.path.join(out, "sva_ablation.png"))

    last = n_layers - 1
    key = next(r["mean_value"] for r in table if r["group"] == "subject" and r["layer"] == last and r["branch"] == "key")
    val = next(r["mean_value"] for r in table if r["group"] == "subject" and r["layer"] == last and r["branch"] == "value")
    log(f"sva: checkpoint {checkpoint}, sink {sink}; {len(kept)} pairs evaluated, {len(rows)} analysed")
    log("accuracy by attractors: " + "  ".join(f"{r['n_attractors']}: {r['accuracy']:.3f} (n={r['n_pairs']})"
                                               for r in acc))
    if key == key and val == val and key + val > 0:
        log(f"last layer, subject: keys {key / (key + val):.0%} / values {val / (key + val):.0%} of the "
            "best paths' key+value (paper: 76% / 24%)")
    for grp in GROUPS:
        best = [max(BRANCHES, key=lambda b: next(r["share_best"] for r in table if r["group"] == grp
                                                  and r["layer"] == L and r["branch"] == b))
                for L in range(n_layers)]
        log(f"most frequent best branch per layer, {grp}: {' '.join(best)}")
    log("entropy vs attractors (Spearman within length bins): " + "  ".join(
        f"{r['words_from']}-{r['words_to']} words: rho={r['spearman_rho']:.2f} (p={r['p_value']:.2g}, "
        f"n={r['n_sentences']})" for r in ent))
    for n in sorted({r["n"] for r in abl if r["n"]}):
        top = next(r["accuracy"] for r in abl if r["selection"] == "top" and r["n"] == n)
        bot = next(r["accuracy"] for r in abl if r["selection"] == "bottom" and r["n"] == n)
        rnd = np.mean([r["accuracy"] for r in abl if r["selection"] == "random" and r["n"] == n])
        log(f"ablation n={n}: top {top:.3f}  bottom {bot:.3f}  random {rnd:.3f}  (none {abl[0]['accuracy']:.3f})")
    log(f"wrote {len(OUTPUTS)} files to {out}")
    return {"accuracy": acc, "branches": table, "entropy": ent, "heads": heads, "ablation": abl}
