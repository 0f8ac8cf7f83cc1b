"""Batch study throughput: sentences of 8-24 tokens on a random-init BERT (6 layers, hidden 512,
8 heads), queries top path, entropy and branch choice at every layer's attention input, with 1 and 2
local worker processes; per-item time against torch forward + backward on the same items.

    python benchmarks/batch.py --n 1000          # the full study
    python benchmarks/batch.py --n 100           # a sample; the 1,000-item time is extrapolated

Items per second include each worker's start-up (import, model set-up, the one export); the
extrapolation adds the measured start-up once to 1,000 items at the steady rate.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import MASK_ID, MASK_POS, bert_mlm, logit_diff, machine, print_table, torch_fwd_bwd_time  # noqa: E402

QUERIES = [
    {"query": "top_paths", "k": 1},
    {"query": "entropy"},
    {"query": "branches", "modules": "bert.encoder.layer.*.attention", "groups": 1},
]


def sentences(n, seed=0):
    """``n`` items: random token ids, 8-24 tokens, [CLS] ... [MASK] at MASK_POS ... [SEP]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(8, 25, (1,), generator=g))
        ids = torch.randint(1000, 30522, (length,), generator=g)
        ids[0], ids[-1], ids[MASK_POS] = 101, 102, MASK_ID
        out.append({"id": i, "tokens": ids.tolist()})
    return out


class Study:
    """The model once per worker; per item only its inputs. The sink (a logit difference at the
    [MASK] position) is the same function for every item, so one export serves them all."""

    def setup(self):
        return bert_mlm()

    def inputs(self, item):
        ids = torch.tensor([item["tokens"]])
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, logit_diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="number of sentences (default 1000)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default 1 2)")
    ap.add_argument("--engine", choices=["local", "dask"], default="local")
    ap.add_argument("--torch-sample", type=int, default=20, help="items timed with torch forward + backward")
    a = ap.parse_args(argv)
    import gradgraph as gg
    items = sentences(a.n)
    print(machine())
    print(f"{a.n} sentences of 8-24 tokens, BERT 6 x 512, queries: top path, entropy, branch choice at the "
          f"6 attention inputs; engine {a.engine}")
    rows, per_item = [], None
    for w in a.workers:
        out = tempfile.mkdtemp(prefix="gg-batch-bench-")
        try:
            t0 = time.perf_counter()
            s = gg.batch.run(items, Study(), QUERIES, out, engine=a.engine, workers=w, progress=False)
            wall = time.perf_counter() - t0
            t = s.table()
        finally:
            shutil.rmtree(out, ignore_errors=True)
        assert s.failed == 0, t[t["status"] != "ok"]["error"].iloc[0]
        first = t[t["query"] == QUERIES[0]["query"]]
        per = t.groupby("item")["seconds"].sum() + first.set_index("item")["capture_seconds"]
        startup = first[first["exported"]]["capture_seconds"].max()
        steady = [v for k, v in per.items() if not first.set_index("item").loc[k, "exported"]]
        worker_rate = 1 / statistics.mean(steady)                  # one worker, after its export
        est_1000 = startup + 1000 / (worker_rate * w)
        rows.append((w, f"{wall:.0f} s", f"{a.n / wall:.2f}", f"{statistics.median(steady):.2f} s",
                     f"{startup:.0f} s", f"{est_1000 / 60:.1f} min", t["exported"].sum() // len(QUERIES)))
        if per_item is None:
            per_item = per
    print_table(rows, ("workers", "wall", "items/s", "median per item", "export", "1,000 items (est.)",
                       "exports"))
    # torch forward + backward (to the word embeddings) on the same items, with the threads of a
    # worker of the first run (the local engine gives each worker cores / workers threads)
    threads = max(1, (os.cpu_count() or 1) // a.workers[0])
    torch.set_num_threads(threads)
    model = Study().setup()
    ratios = []
    for it in items[:a.torch_sample]:
        args, kwargs, out = Study().inputs(it)
        ref = torch_fwd_bwd_time(model, kwargs, out, repeats=3)
        ratios.append(per_item.loc[str(it["id"])] / ref)
    print(f"per item (capture + 3 queries) / torch forward + backward, median over {len(ratios)} items: "
          f"{statistics.median(ratios):.1f}x (run with {a.workers[0]} worker(s); {threads} torch thread(s))")


if __name__ == "__main__":
    main()
