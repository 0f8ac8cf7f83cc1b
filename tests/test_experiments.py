"""The paper's studies (gradgraph.experiments): data generators, the TSV loader, the shipped
agreement model, flow per attention head, and each study's --quick run through the CLI."""
import math
import os

import numpy as np
import pytest
import torch

from gradgraph.experiments import sva_data
from gradgraph.experiments.sva_data import (MASK, NOUNS, VERB_PAIRS, SvaDataError, load_lgd_tsv,
                                            make_pairs)

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "lgd_fixture.tsv")
NOUN_NUMBER = {sg: False for sg, _ in NOUNS} | {pl: True for _, pl in NOUNS}
SINGULAR_VERBS = {sg for sg, _ in VERB_PAIRS}
PLURAL_VERBS = {pl for _, pl in VERB_PAIRS}


# ------------------------------------------------------------------ generator
@pytest.mark.parametrize("seed", [0, 7])
def test_generated_pairs_labels_balance_and_attractors(seed):
    pairs = make_pairs(400, seed=seed)
    assert sum(p.plural for p in pairs) == 200                       # balanced classes
    assert {p.structure for p in pairs} == set(sva_data.STRUCTURES)
    for p in pairs:
        assert p.words.count(MASK) == 1 and p.words[p.verb_index] == MASK
        nouns = [i for i, w in enumerate(p.words) if w in NOUN_NUMBER]
        # the subject is the first noun, and its number is the pair's number
        assert nouns[0] == p.subject_index and NOUN_NUMBER[p.words[nouns[0]]] == p.plural
        # the good verb agrees with the subject, the bad one is the other form of the same verb
        assert (p.good in PLURAL_VERBS) == p.plural and (p.good in SINGULAR_VERBS) != p.plural
        assert {p.good, p.bad} in [set(v) for v in VERB_PAIRS]
        # attractors recounted from the words: nouns between subject and verb of the other number
        between = [i for i in nouns if p.subject_index < i < p.verb_index]
        assert tuple(between) == p.intervening_indices and len(between) == p.n_intervening
        recount = [i for i in between if NOUN_NUMBER[p.words[i]] != p.plural]
        assert tuple(recount) == p.attractor_indices and len(recount) == p.n_attractors
        if p.structure == "simple":
            assert p.n_intervening == 0


def test_generator_covers_attractor_counts_and_is_deterministic():
    pairs = make_pairs(2000, seed=3)
    assert {p.n_attractors for p in pairs} == {0, 1, 2, 3}
    assert make_pairs(50, seed=3) == pairs[:50]
    assert all(p.n_intervening <= 1 for p in make_pairs(100, seed=3, max_intervening=1))


def test_generator_rejects_bad_requests():
    with pytest.raises(SvaDataError, match="unknown structures"):
        make_pairs(3, structures=["passive"])
    with pytest.raises(SvaDataError, match="unknown verb pairs"):
        make_pairs(3, verbs=[("goes", "go")])


# ------------------------------------------------------------------ TSV loader
def test_lgd_loader_reads_the_fixture():
    pairs = load_lgd_tsv(FIXTURE)
    assert len(pairs) == 3                                          # the blank line is skipped
    p = pairs[1]
    assert p.n_attractors == 2 and p.good == "laughs" and p.bad == "laugh"
    assert p.words[p.verb_index] == MASK and p.words[0] == "the"   # lower-cased
    assert " ".join(p.with_verb(p.good)) == "the author of the books near the lamps laughs ."
    assert [q.n_attractors for q in pairs] == [1, 2, 1]
    assert len(load_lgd_tsv(FIXTURE, limit=2)) == 2


@pytest.mark.parametrize("line, message", [
    ("1\tonly three\tfields\n", "expected 5"),
    ("x\ta b\ta ***mask***\tis\tare\n", "not an integer"),
    ("1\ta b\ta b\tis\tare\n", "once"),
])
def test_lgd_loader_names_the_bad_line(tmp_path, line, message):
    f = tmp_path / "bad.tsv"
    f.write_text("1\tthe dog barks\tthe dog ***mask***\tbarks\tbark\n" + line)
    with pytest.raises(SvaDataError, match=f"bad.tsv:2: .*{message}"):
        load_lgd_tsv(str(f))
    with pytest.raises(SvaDataError, match="no such file"):
        load_lgd_tsv(str(tmp_path / "missing.tsv"))


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_loader_on_a_saved_model(tmp_path):
    from gradgraph.experiments import train_sva
    from gradgraph.experiments.sva_model import CheckpointError, encode_pair, load_checkpoint
    vocab = train_sva.SPECIAL + sva_data.corpus_words()
    model = train_sva.build_model(len(vocab), layers=1, hidden=16, heads=2).eval()
    train_sva.save(model, vocab, str(tmp_path / "ckpt"), [])
    loaded, tok = load_checkpoint(str(tmp_path / "ckpt"))
    p = make_pairs(1, seed=1)[0]
    enc = encode_pair(tok, p)
    ids = [vocab.index(w) for w in p.words]
    assert enc.ids[0, 1:-1].tolist() == ids and enc.mask == p.verb_index + 1
    assert enc.good == vocab.index(p.good) and enc.subject == p.subject_index + 1
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=enc.ids).logits, model(input_ids=enc.ids).logits)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nothing"))
    os.remove(tmp_path / "ckpt" / "vocab.txt")
    with pytest.raises(CheckpointError, match="vocab.txt"):
        load_checkpoint(str(tmp_path / "ckpt"))


def test_shipped_agreement_model_reaches_its_documented_accuracy():
    from gradgraph.experiments.sva_model import encode_pair, load_checkpoint, verb_scores
    model, tok = load_checkpoint()
    assert os.path.getsize(os.path.join(os.path.dirname(sva_data.__file__), "..", "data", "sva_bert",
                                        "model.safetensors")) < 5e6
    pairs = make_pairs(1000, seed=424242)                          # seeds unseen in training
    scores = verb_scores(model, [encode_pair(tok, p) for p in pairs])
    hard = np.array([p.n_attractors >= 1 for p in pairs])
    # docs/experiments.md: 100 % on 4,000 evaluation pairs; allow a small margin on new pairs
    assert np.mean(scores > 0) >= 0.98
    assert np.mean(scores[hard] > 0) >= 0.97


# ------------------------------------------------------------------ heads
def _tiny_bert(seed=0, layers=2, heads=2, hidden=8):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=20, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden,
                     max_position_embeddings=8, attn_implementation="eager")
    return BertForMaskedLM(cfg).eval()


@pytest.mark.parametrize("heads, hidden", [(2, 8), (4, 8)])
def test_head_flow_is_the_element_flow_of_each_heads_context(heads, hidden):
    import gradgraph as gg
    from gradgraph.experiments.heads import head_flow
    bert = _tiny_bert(heads=heads, hidden=hidden)
    g = gg.capture(bert, (), {"input_ids": torch.tensor([[1, 5, 7, 2, 9]])},
                   output=lambda o: o.logits[0, 2, 3] - o.logits[0, 2, 4])
    flows = g.flow(by="element")
    got = head_flow(g)
    assert list(got) == [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    for layer, (module, per_head) in enumerate(got.items()):
        # independently: the per-head context tensor softmax(QK^T)V, shape (heads, tokens, head
        # size), is the output of the second bmm of the module; sum its element flows per head
        bmms = [n for n in g.nodes if n.module == module and n.op_name == "bmm"]
        context = flows[bmms[-1].name]
        assert context.shape == (heads, 5, hidden // heads)
        np.testing.assert_allclose(per_head, context.sum(axis=(1, 2)), rtol=1e-10)
        # and every path through the attention block passes one context element: the heads'
        # flows add up to the flow through the block's output projection (the same set of
        # paths, summed over another tensor: the model computes in float32, hence rtol 1e-6)
        dense = [n for n in g.nodes if n.module == module.replace(".self", ".output.dense")
                 and n.op_name == "addmm"][0]
        np.testing.assert_allclose(per_head.sum(), flows[dense.name].sum(), rtol=1e-6)
    np.testing.assert_allclose(head_flow(g, num_heads=heads)[module], per_head, rtol=0)


def test_head_flow_rejects_a_wrong_head_count():
    import gradgraph as gg
    from gradgraph.errors import QueryError
    from gradgraph.experiments.heads import head_flow
    g = gg.capture(_tiny_bert(), (), {"input_ids": torch.tensor([[1, 5, 2]])},
                   output=lambda o: o.logits[0, 1, 3])
    with pytest.raises(QueryError, match="multiple"):
        head_flow(g, num_heads=3)
    mlp = gg.capture(torch.nn.Linear(2, 1), (torch.ones(1, 2),), output=lambda y: y[0, 0])
    with pytest.raises(QueryError, match="no self-attention"):
        head_flow(mlp)


def test_mask_heads_zeroes_exactly_the_heads_context():
    from gradgraph.experiments.heads import mask_heads
    bert = _tiny_bert(heads=2, hidden=8)
    ids = torch.tensor([[1, 5, 7, 2]])
    seen = []
    dense = bert.bert.encoder.layer[1].attention.output.dense
    h = dense.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    with torch.no_grad():
        before = bert(input_ids=ids).logits
        with mask_heads(bert, [(1, 0)]):
            masked = bert(input_ids=ids).logits
        after = bert(input_ids=ids).logits
    h.remove()
    assert torch.equal(before, after) and not torch.equal(before, masked)
    # a forward hook sees the input as the pre-hook left it: head 0's columns zero, head 1's intact
    assert torch.count_nonzero(seen[1][..., :4]) == 0 and torch.equal(seen[1][..., 4:], seen[0][..., 4:])


# ------------------------------------------------------------------ the batch query and shared passes
def entropy_and_gradient(g):
    """A call query for the test below: two answers from one function."""
    return {"entropy": g.entropy(), "gradient": g.gradient()["input"].tolist()}


def test_call_query_answers_what_the_function_computes(tmp_path):
    import gradgraph as gg
    from gradgraph.errors import BatchError
    from batch_cases import build_mlp, sink, tiny_input, tiny_mlp
    items = [{"id": i} for i in range(3)]
    gg.batch.run(items, build_mlp, [{"query": "call", "function": "test_experiments:entropy_and_gradient"}],
                 str(tmp_path / "b"), workers=0)
    import pandas as pd
    table = pd.read_parquet(tmp_path / "b").set_index("item")
    for i in range(3):
        got = __import__("json").loads(table.loc[str(i), "result"])
        # oracle: torch.autograd's gradient of the same scalar, and the entropy of a separate capture
        x = tiny_input(i).requires_grad_(True)
        sink(tiny_mlp()(x)).backward()
        np.testing.assert_allclose(got["gradient"], x.grad.numpy(), rtol=1e-10)
        g = gg.capture(tiny_mlp(), (tiny_input(i),), output=sink)
        assert got["entropy"] == pytest.approx(g.entropy(), rel=1e-12)
    for bad in ["no_colon", "gradgraph.nothing_here:f", "gradgraph.experiments.common:no_such_function"]:
        with pytest.raises(BatchError, match="call query"):
            gg.batch.normalize_queries([{"query": "call", "function": bad}])


@pytest.mark.parametrize("case", [dict(seed=2, widths=(2, 3, 3, 2), batch=2, act="relu"), dict(seed=1)])
def test_path_entropies_from_one_pass_match_brute_force(case):
    from oracle import captured_case, tiny_mlp
    from gradgraph.experiments.common import path_entropies
    g, oracle, _ = captured_case(tiny_mlp, **case)
    name = next(iter(g.sources))
    node = g.nodes[g.sources[name]]
    total, per = path_entropies(g, {name: 0})          # one entropy per row of the input
    assert total == pytest.approx(oracle.entropy(), rel=1e-10)
    rows = np.arange(node.numel).reshape(node.shape)
    want = oracle.entropy(groups={node.fx_name: [list(r) for r in rows]})[node.fx_name]
    np.testing.assert_allclose(per[name], want, rtol=1e-10)


def test_study_sinks_equal_the_models_own_outputs():
    """The wrapped models (class and verb as integer inputs) compute what the plain models do."""
    from gradgraph.experiments.first_token import ClassLogit
    from gradgraph.experiments.sva import SvaSink, sink_inputs
    from gradgraph.experiments.sva_model import encode_pair, load_checkpoint
    from gradgraph.toy import load_model
    clf = load_model()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    with torch.no_grad():
        logits = clf(input_ids=ids).logits[0]
        for label in (0, 1):
            assert ClassLogit(clf)(ids, torch.tensor([label])) == logits[label]
    model, tok = load_checkpoint()
    for p in make_pairs(4, seed=11):
        e = encode_pair(tok, p)
        with torch.no_grad():
            row = model(input_ids=e.ids).logits[0, e.mask]
            for sink, scores in (("logprob", torch.log_softmax(row, -1)), ("logit", row)):
                got = SvaSink(model, sink)(**sink_inputs(e))
                torch.testing.assert_close(got, scores[e.good] - scores[e.bad], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the studies, --quick
@pytest.mark.parametrize("name, files", [
    ("first-token", ["first_token_sentences.csv", "first_token_summary.csv", "first_token_fig2.png"]),
    ("sva", ["sva_sentences.csv", "sva_accuracy.csv", "sva_branches.csv", "sva_fig4.png",
             "sva_entropy.csv", "sva_entropy.png", "sva_head_flow.csv", "sva_head_flow.png",
             "sva_ablation.csv", "sva_ablation.png"]),
    ("entropy-checks", ["entropy_mlp.csv", "entropy_mlp.png", "entropy_length.csv",
                        "entropy_length.png"]),
])
def test_quick_run_writes_its_outputs(tmp_path, capsys, name, files):
    import csv
    from gradgraph.cli import main
    out = str(tmp_path / name)
    assert main(["experiment", name, "--quick", "--out", out]) == 0
    printed = capsys.readouterr().out
    for f in files:
        path = os.path.join(out, f)
        assert os.path.getsize(path) > 0, f
        if f.endswith(".csv"):
            with open(path) as fh:
                assert len(list(csv.DictReader(fh))) >= 1, f
        else:
            with open(path, "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in printed
    # a second run does not overwrite without being asked: one line, status 2
    assert main(["experiment", name, "--quick", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    # the per-item loop runs through the batch runner: two worker processes give the same tables.
    # The studies' models compute in float32, and a process's contraction path (BLAS library and
    # blocking) may differ from a worker's in the last float32 bits of a value: numbers are
    # compared at rtol 1e-6 (the models' precision), everything else exactly.
    out2 = str(tmp_path / f"{name}-2")
    assert main(["experiment", name, "--quick", "--out", out2, "--workers", "2"]) == 0
    _assert_same_tables(out, out2, files)


def _assert_same_tables(out, out2, files):
    """The CSV tables of two runs: the same rows and labels, numbers equal at rtol 1e-6."""
    import csv
    for f in files:
        if f.endswith(".csv"):
            with open(os.path.join(out, f)) as a, open(os.path.join(out2, f)) as b:
                rows_a, rows_b = list(csv.reader(a)), list(csv.reader(b))
            assert len(rows_a) == len(rows_b), f
            for ra, rb in zip(rows_a, rows_b):
                assert len(ra) == len(rb), f
                for x, y in zip(ra, rb):
                    try:
                        fx, fy = float(x), float(y)
                    except ValueError:
                        assert x == y, f
                        continue
                    assert fx == pytest.approx(fy, rel=1e-6, abs=1e-12) or (math.isnan(fx) and math.isnan(fy)), f


def test_quick_first_token_through_dask_equals_the_local_engine(tmp_path):
    """``--engine dask`` on a LocalCluster of two worker processes (each exports the bundled BERT
    itself, in a Dask worker thread) gives the local engine's tables."""
    import dask.distributed  # noqa: F401  (a test dependency: missing, the test fails, never skips)
    from gradgraph.cli import main
    files = ["first_token_sentences.csv", "first_token_summary.csv"]
    local, dask = str(tmp_path / "local"), str(tmp_path / "dask")
    assert main(["experiment", "first-token", "--quick", "--out", local]) == 0
    assert main(["experiment", "first-token", "--quick", "--out", dask, "--workers", "2",
                 "--engine", "dask"]) == 0
    _assert_same_tables(local, dask, files)


def test_experiment_rejects_bad_runner_options(capsys):
    from gradgraph.cli import main
    assert main(["experiment", "first-token", "--quick", "--workers", "0", "--out", "unused"]) == 2
    assert "--workers" in capsys.readouterr().err
