"""The batch runner: engines agree with each other and with a plain loop over ``gg.capture``,
faults (a killed Dask worker, a SIGKILLed run, a failing build) leave exactly one complete result
per item after a re-run, and one export serves sentences of every length."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

import gradgraph as gg
from gradgraph.cli import main as cli_main
from gradgraph.errors import BatchError

from batch_cases import QUERIES, AttentionBuilder, MLPBuilder, attention_sink, build_mlp, sink, tiny_input, tiny_mlp
from models import autograd_gradient
from oracle import ScalarOracle

HERE = os.path.dirname(os.path.abspath(__file__))
#: columns that depend on timing and scheduling, not on the item
VOLATILE = ["capture_seconds", "seconds", "cpu_seconds", "worker", "exported", "notes"]


@pytest.fixture(scope="module")
def cluster():
    """A real dask.distributed LocalCluster: 2 worker processes, one thread each."""
    import dask.distributed as distributed
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c:
        yield c


def _sorted(df):
    return df.drop(columns=VOLATILE).sort_values(["item", "query"]).reset_index(drop=True)


def _close(a, b):
    """JSON answers equal, floats to rtol 1e-10."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-300)
    return a == b


def _assert_same_table(t1, t2):
    a, b = _sorted(t1), _sorted(t2)
    pd.testing.assert_frame_equal(a.drop(columns=["value", "result", "sink_value"]),
                                  b.drop(columns=["value", "result", "sink_value"]))
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-10)
    np.testing.assert_allclose(a["sink_value"], b["sink_value"], rtol=1e-10)
    for x, y in zip(a["result"], b["result"]):
        assert _close(json.loads(x), json.loads(y))


def _answers(table, item):
    rows = table[table["item"] == str(item)].set_index("query")
    return {q: (r["value"], json.loads(r["result"])) for q, r in rows.iterrows()}


def test_dask_cluster_local_pool_and_plain_loop_agree_on_200_items(cluster, tmp_path):
    items = [{"id": i} for i in range(200)]
    dask_run = gg.batch.run(items, MLPBuilder(), QUERIES, tmp_path / "dask", engine="dask",
                            scheduler=cluster.scheduler_address)
    local_run = gg.batch.run(items, build_mlp, QUERIES, tmp_path / "local", engine="local", workers=2)
    assert (dask_run.computed, dask_run.failed, local_run.computed, local_run.failed) == (200, 0, 200, 0)
    t_dask, t_local = pd.read_parquet(tmp_path / "dask"), pd.read_parquet(tmp_path / "local")
    assert len(t_dask) == 200 * len(QUERIES) and (t_dask["status"] == "ok").all()
    _assert_same_table(t_dask, t_local)
    # each worker process exported the model once
    for t in (t_dask, t_local):
        assert (t[t["query"] == "entropy"].groupby("worker")["exported"].sum() == 1).all()

    # a plain loop over gg.capture and the queries, and autograd for the gradient
    model = tiny_mlp()
    for i in range(200):
        x = tiny_input(i)
        g = gg.capture(model, (x,), output=sink)
        got = _answers(t_dask, i)
        paths = g.top_paths(k=3)
        assert got["top_paths"][0] == pytest.approx(paths[0].weight, rel=1e-10)
        assert [p["weight"] for p in got["top_paths"][1]] == pytest.approx([p.weight for p in paths], rel=1e-10)
        assert [p["index"] for p in got["top_paths"][1]] == [list(p.source[1]) for p in paths]
        mag = g.top_paths(k=2, order="magnitude")
        assert [p["weight"] for p in got["top_magnitude"][1]] == pytest.approx([p.weight for p in mag], rel=1e-10)
        assert got["entropy"][0] == pytest.approx(g.entropy(), rel=1e-10)
        assert got["entropy_per_row"][1]["input"] == pytest.approx(list(g.entropy(groups={"input": 0})["input"]),
                                                                   rel=1e-10)
        assert got["flow"][1] == pytest.approx(g.flow(by="module"), rel=1e-10)
        (br,) = got["branches"][1]
        b = g.branches(br["node"], groups=1)
        assert br["labels"] == b.labels and br["best"] == list(b.best)
        lengths = g.path_lengths()
        assert got["path_lengths"][1] == pytest.approx(list(lengths), rel=1e-10)
        want = autograd_gradient(model, (x,), {}, sink)["input"].numpy()
        np.testing.assert_allclose(np.array(got["gradient"][1]["input"]), want, rtol=1e-10, atol=1e-14)


def _oracle_branches(g, o, name, labels, consumers, order):
    """Brute force: per element of tensor ``name`` and branch, the best path through both (the
    consumer found by looking through views, as branches does), and the best branch."""
    node = g.nodes[g.node_index(name)]
    consumer = {g.nodes[g.node_index(c)].fx_name: b for b, cs in enumerate(consumers) for c in cs}
    best = {}
    for p in o.paths():
        hit = [u for u in p.nodes if u[0] == node.fx_name]
        if not hit:
            continue
        pos = p.nodes.index(hit[0]) - 1
        while o.G.nodes[p.nodes[pos]]["is_view"] and pos > 0:
            pos -= 1
        key = (p.log_abs,) if order == "magnitude" else (p.sign, p.sign * p.log_abs)
        j, b = hit[0][1], consumer[p.nodes[pos][0]]
        if (j, b) not in best or key > best[(j, b)][0]:
            best[(j, b)] = (key, (p.sign if order == "signed" else 1) * math.exp(p.log_abs))
    values = np.full((node.numel, len(labels)), np.nan)
    for (j, b), (_, v) in best.items():
        values[j, b] = v
    winner = [max(((best[(j, b)][0], -b) for b in range(len(labels)) if (j, b) in best), default=None)
              for j in range(node.numel)]
    return values, [-w[1] if w is not None else -1 for w in winner]


@pytest.mark.parametrize("order", ["signed", "magnitude"])
def test_branches_of_many_nodes_from_one_pass_equal_per_node_queries_and_brute_force(tmp_path, order):
    """A branches query over several modules (q, k and v share their input) answers every node
    from one pair of passes: equal to g.branches node by node and to path enumeration."""
    items = [{"id": f"s{i}", "tokens": t} for i, t in enumerate([[1, 4, 2], [6, 0, 3], [5, 5, 1]])]
    spec = {"query": "branches", "modules": ["q", "k", "v", "head"], "order": order}
    s = gg.batch.run(items, AttentionBuilder(), [spec], tmp_path / "run", workers=0)
    assert (s.computed, s.failed) == (3, 0)
    table = pd.read_parquet(tmp_path / "run")
    model = AttentionBuilder().setup()
    for it in items:
        ids = torch.tensor(it["tokens"])
        (_, res), = _answers(table, it["id"]).values()
        assert [r["module"] for r in res] == ["q", "k", "v", "head"]
        g = gg.capture(model, (ids,), output=attention_sink)
        o = ScalarOracle(model, (ids,), {}, attention_sink,
                         source_fx_names=[g.nodes[i].fx_name for i in g.sources.values()])
        for r in res:
            b = g.branches(r["node"], order=order)
            assert r["labels"] == b.labels and r["best"] == [int(x) for x in b.best]
            np.testing.assert_allclose(np.array(r["log_abs"], dtype=float), b.log_abs, rtol=1e-10)
            assert r["sign"] == b.sign.tolist()
            values, winner = _oracle_branches(g, o, r["node"], b.labels, b.consumers, order)
            got = np.array(r["sign"]) * np.exp(np.array(r["log_abs"], dtype=float))
            np.testing.assert_allclose(got[~np.isnan(values)], values[~np.isnan(values)], rtol=1e-9)
            assert (np.array(r["sign"])[np.isnan(values)] == 0).all()
            assert r["best"] == winner


def test_killed_dask_worker_loses_and_duplicates_nothing(cluster, tmp_path):
    from dask.distributed import Client
    out = tmp_path / "run"
    items = [{"id": i} for i in range(40)]
    queries = QUERIES[:3]
    with Client(cluster.scheduler_address) as client:
        pids = list(client.run(os.getpid).values())
        killed = []

        def kill_one_worker():
            while not (out / "results").exists() or len(os.listdir(out / "results")) < 5:
                time.sleep(0.05)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        killer = threading.Thread(target=kill_one_worker, daemon=True)
        killer.start()
        first = gg.batch.run(items, MLPBuilder(slow=0.1), queries, out, engine="dask",
                             scheduler=cluster.scheduler_address)
        killer.join(timeout=60)
        assert killed, "the worker was not killed mid-run"
        assert first.computed == 40     # Dask reran the dead worker's tasks elsewhere (or recorded them failed)
        again = gg.batch.run(items, MLPBuilder(), queries, out, engine="dask", scheduler=cluster.scheduler_address)
        assert again.computed == first.failed
    t = pd.read_parquet(out)
    assert sorted(t.groupby(["item", "query"]).size().items()) == \
        sorted(((str(i), q["name"]), 1) for i in range(40) for q in gg.batch.normalize_queries(queries))
    assert (t["status"] == "ok").all()


def test_sigkilled_local_run_resumes_without_loss_or_duplicates(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "study.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        import gradgraph as gg
        from batch_cases import QUERIES, MLPBuilder
        if __name__ == "__main__":
            gg.batch.run([{{"id": i}} for i in range(60)], MLPBuilder(slow=0.2), QUERIES[:3], {str(out)!r},
                         engine="local", workers=2)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = [f for f in os.listdir(out / "results")] if (out / "results").exists() else []
            if len([f for f in done if f.endswith(".parquet")]) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)        # the run and its worker processes
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = pd.read_parquet(out)                 # every file written so far is complete
    n_done = partial["item"].nunique()
    assert 5 <= n_done < 60 and len(partial) == 3 * n_done
    again = gg.batch.run([{"id": i} for i in range(60)], MLPBuilder(), QUERIES[:3], out, workers=0)
    assert again.skipped == n_done and again.computed == 60 - n_done
    t = pd.read_parquet(out)
    assert sorted(t.groupby(["item", "query"]).size().items()) == \
        sorted(((str(i), q["name"]), 1) for i in range(60) for q in gg.batch.normalize_queries(QUERIES[:3]))
    assert (t["status"] == "ok").all()
    assert not [f for f in os.listdir(out / "results") if f.startswith(".tmp-")]


def test_failing_build_is_recorded_and_the_rest_complete(tmp_path):
    out = tmp_path / "run"
    items = [{"id": i} for i in range(10)]
    queries = [{"query": "entropy"}, {"query": "save"}]
    s = gg.batch.run(items, MLPBuilder(fail={3, 7}), queries, out, workers=0)
    assert (s.computed, s.failed) == (10, 2)
    t = pd.read_parquet(out)
    bad = t[t["status"] == "failed"]
    assert sorted(bad["item"].unique()) == ["3", "7"] and len(bad) == 4
    assert (bad["error_type"] == "ValueError").all()
    assert set(bad["error"]) == {"item 3 cannot be built", "item 7 cannot be built"}
    st = gg.batch.status(out)
    assert (st["done"], st["failed"], st["missing"]) == (8, 2, 0)
    assert st["failures"][0] == ("3", "ValueError", "item 3 cannot be built")
    # the saved graph files are complete graphs of their items
    ok = t[(t["status"] == "ok") & (t["query"] == "save")]
    for item, rel in zip(ok["item"], ok["result"]):
        g = gg.load(os.path.join(out, json.loads(rel)))
        want = autograd_gradient(tiny_mlp(), (tiny_input(item),), {}, sink)["input"]
        torch.testing.assert_close(g.gradient()["input"], want, rtol=1e-10, atol=1e-14)
    # a re-run computes only the failed items
    s2 = gg.batch.run(items, MLPBuilder(), queries, out, workers=0)
    assert (s2.computed, s2.failed, s2.skipped) == (2, 0, 8)
    assert gg.batch.status(out)["done"] == 10 and len(pd.read_parquet(out)) == 20


def test_resume_with_other_queries_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    items = [{"id": i} for i in range(3)]
    gg.batch.run(items, build_mlp, [{"query": "entropy"}], out, workers=0)
    with pytest.raises(BatchError, match="different queries") as e:
        gg.batch.run(items, build_mlp, [{"query": "top_paths", "k": 2}], out, workers=0)
    assert "\n" not in str(e.value)
    qfile, ifile = tmp_path / "q.json", tmp_path / "items.json"
    qfile.write_text(json.dumps([{"query": "top_paths", "k": 2}]))
    ifile.write_text(json.dumps(items))
    spec = os.path.join(HERE, "batch_cases.py") + ":build_mlp"
    assert cli_main(["batch", spec, "--items", str(ifile), "--queries", str(qfile), "--out", str(out),
                     "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different queries" in err and "--force" in err
    # told to: every item is recomputed with the new queries
    s = gg.batch.run(items, build_mlp, [{"query": "top_paths", "k": 2}], out, workers=0, force=True)
    assert s.computed == 3 and set(pd.read_parquet(out)["query"]) == {"top_paths"}


def test_cli_batch_and_status(tmp_path, capsys):
    out = tmp_path / "run"
    qfile, ifile = tmp_path / "q.json", tmp_path / "items.jsonl"
    qfile.write_text(json.dumps({"queries": [{"query": "entropy"}, {"query": "flow", "by": "node", "top": 2}]}))
    ifile.write_text("\n".join(json.dumps({"id": f"s{i}"}) for i in range(4)))
    # a class SPEC: instantiated, its model set up once
    spec = os.path.join(HERE, "batch_cases.py") + ":FailsOnS2"
    assert cli_main(["batch", spec, "--items", str(ifile), "--queries", str(qfile), "--out", str(out),
                     "--workers", "0"]) == 0
    assert "4 computed (1 failed)" in capsys.readouterr().out
    assert cli_main(["batch-status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 items: 3 done, 1 failed, 0 missing" in text and "failed s2: KeyError" in text
    t = pd.read_parquet(out)
    row = t[(t["item"] == "s0") & (t["query"] == "flow")].iloc[0]
    assert len(json.loads(row["result"])) == 2
    # bad input: one line, exit 2
    qfile.write_text('[{"query": "entropy", "k": 3}]')
    assert cli_main(["batch", spec, "--items", str(ifile), "--queries", str(qfile), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no parameter 'k'" in err
    assert cli_main(["batch-status", str(tmp_path)]) == 2


class _SentenceBert:
    """A tiny random BERT (tests/models.py's configuration); sentences of any length; the sink is
    a logit difference at the last token."""

    def setup(self):
        from transformers import BertConfig, BertForMaskedLM
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16, attn_implementation="eager")
        return BertForMaskedLM(cfg).double().eval()

    def inputs(self, item):
        ids = torch.tensor([item["tokens"]])
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, _last_token_logit_difference


def _last_token_logit_difference(out):
    return out.logits[0, -1, 5] - out.logits[0, -1, 7]


def test_sentences_of_many_lengths_share_one_export_and_match_autograd(tmp_path):
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 5, 8, 11, 14, 6, 3, 9]
    items = [{"id": f"s{i}", "tokens": torch.randint(1, 40, (n,), generator=gen).tolist()}
             for i, n in enumerate(lengths)]
    builder = _SentenceBert()
    s = gg.batch.run(items, builder, [{"query": "gradient"}, {"query": "top_paths"}], tmp_path / "run", workers=0)
    assert (s.computed, s.failed) == (8, 0)
    t = pd.read_parquet(tmp_path / "run")
    grads = t[t["query"] == "gradient"].set_index("item")
    assert grads["exported"].sum() == 1 and grads["notes"].isna().all()
    model = builder.setup()
    for it in items:
        args, kwargs, out = builder.inputs(it)
        want = autograd_gradient(model, args, kwargs, out)["bert.embeddings.word_embeddings"]
        got = np.array(json.loads(grads.loc[it["id"], "result"])["bert.embeddings.word_embeddings"])
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-13)


class _FixedLength(torch.nn.Module):
    """Token embeddings flattened into one linear layer: the sentence length is fixed by the weights."""

    def __init__(self, length):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 3)
        self.head = torch.nn.Linear(3 * length, 1)

    def forward(self, ids):
        return self.head(self.emb(ids).flatten(1))


def test_a_model_that_fixes_the_length_is_exported_per_length_with_a_note(tmp_path):
    torch.manual_seed(0)
    models = {n: _FixedLength(n).double().eval() for n in (4, 6)}

    def build(item):
        ids = torch.arange(item["n"]).remainder(10).unsqueeze(0)
        return models[item["n"]], (ids,), {}, lambda y: y[0, 0]
    items = [{"id": i, "n": n} for i, n in enumerate([4, 6, 4])]
    gg.batch.run(items, build, [{"query": "gradient"}], tmp_path / "run", workers=0)
    t = pd.read_parquet(tmp_path / "run").set_index("item")
    assert (t["status"] == "ok").all() and t["exported"].tolist() == [True, True, False]
    assert "fixed the size of positional input 0 dim 1" in t.loc["0", "notes"]
    for it in items:
        m = models[it["n"]]
        ids = torch.arange(it["n"]).remainder(10).unsqueeze(0)
        want = autograd_gradient(m, (ids,), {}, lambda y: y[0, 0])["emb"]
        np.testing.assert_allclose(np.array(json.loads(t.loc[str(it["id"]), "result"])["emb"]), want.numpy(),
                                   rtol=1e-10)


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(BatchError, match="'id'"):
        gg.batch.run([{"x": 1}], build_mlp, ["entropy"], tmp_path / "a", workers=0)
    with pytest.raises(BatchError, match="twice"):
        gg.batch.run([(1, None), ("1", None)], build_mlp, ["entropy"], tmp_path / "a", workers=0)
    with pytest.raises(BatchError, match="unknown query"):
        gg.batch.run([{"id": 1}], build_mlp, ["entropies"], tmp_path / "a", workers=0)
    with pytest.raises(BatchError, match="engine"):
        gg.batch.run([{"id": 1}], build_mlp, ["entropy"], tmp_path / "a", engine="ray")
    with pytest.raises(BatchError, match="instance"):
        gg.batch.run([{"id": 1}], MLPBuilder, ["entropy"], tmp_path / "a", workers=0)
