"""Batch study throughput: sentences of 8-24 tokens on a random-init BERT (6 layers, hidden 512,
8 heads), queries top path, entropy and branch choice at every layer's attention input, with 1 and 2
local worker processes; per-item time against torch forward + backward on the same items.

    python benchmarks/batch.py --n 1000          # the full study
    python benchmarks/batch.py --n 100           # a sample; the 1,000-item time is extrapolated

Items per second (wall) include each worker's start-up (import, model set-up, the one export) and
whatever else runs on the machine (the load average is printed); the 1,000-item estimate is for an
idle machine: the export plus 1,000 items at the mean CPU time per item (from the table's
cpu_seconds, items after the worker's export) shared by the workers.
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

from common import MASK_ID, MASK_POS, bert_mlm, embedding_forward, logit_diff, machine, print_table  # noqa: E402

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
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per worker (default: the CPUs divided among the workers)")
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
            load0 = os.getloadavg()
            s = gg.batch.run(items, Study(), QUERIES, out, engine=a.engine, workers=w, progress=False,
                             threads=a.threads)
            wall = time.perf_counter() - t0
            t = s.table()
        finally:
            shutil.rmtree(out, ignore_errors=True)
        assert s.failed == 0, t[t["status"] != "ok"]["error"].iloc[0]
        first = t[t["query"] == QUERIES[0]["query"]].set_index("item")
        steady = first[~first["exported"]]
        cpu = statistics.median(steady["cpu_seconds"])          # one item, after the worker's export
        mean_cpu = steady["cpu_seconds"].mean()
        export = first[first["exported"]]["capture_seconds"].max()
        # on an idle machine the study is CPU-bound: 1,000 items share w workers
        est = export + 1000 * mean_cpu / w
        load1 = os.getloadavg()
        rows.append((w, f"{wall:.0f} s", f"{a.n / wall:.3f}", f"{cpu:.2f} / {mean_cpu:.2f} s", f"{export:.0f} s",
                     f"{est / 60:.1f} min", int(first["exported"].sum()),
                     f"{load0[0]:.1f} -> {load1[0]:.1f}"))
        print("done:", " | ".join(str(c) for c in rows[-1]), flush=True)
        if per_item is None:
            per_item = steady["cpu_seconds"]
    print_table(rows, ("workers", "wall", "items/s (wall)", "CPU per item (median / mean)", "export (wall)",
                       "1,000 items, idle (est.)", "exports", "load average (1 min)"))
    # torch forward + backward (to the word embeddings) on the same items, CPU time, with the
    # threads of a worker of the first run (the local engine gives each worker cores / workers)
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers[0])
    torch.set_num_threads(threads)
    model = Study().setup()
    ratios = []
    for it in [it for it in items if str(it["id"]) in per_item.index][:a.torch_sample]:
        args, kwargs, out = Study().inputs(it)
        torch.autograd.grad(*embedding_forward(model, kwargs, out))      # warm-up
        c0 = time.process_time()
        for _ in range(3):
            torch.autograd.grad(*embedding_forward(model, kwargs, out))
        ratios.append(per_item.loc[str(it["id"])] / ((time.process_time() - c0) / 3))
    print(f"per item (capture + 3 queries) / torch forward + backward, CPU time, median over "
          f"{len(ratios)} items: {statistics.median(ratios):.0f}x ({threads} torch thread(s) on both sides; "
          f"items after the worker's export)")


if __name__ == "__main__":
    main()
