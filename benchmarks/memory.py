"""Memory benchmark: peak memory of capture + one query against torch's forward + backward.

Models (random init, float32, eager attention, one thread):

* GPT-2 small (12 layers, 768 wide, 50,257 words) at 64 and 256 tokens, sink = the difference of
  two logits at the last position;
* the 6-layer, 512-wide BERT of ``common.BERT_CONFIG`` with a 2,000-word vocabulary at 32 tokens,
  sink = the difference of two logits at the [MASK] position.

Every measurement runs in a fresh subprocess: it builds the model and its input, warms up (the
same job once on another input of the same length, so library code, numba's compiled kernels
and the program exported for this input shape are loaded, as for a user's second input; with
``--first``, on an 8-token input, so that the measured capture includes the export of its
shape), frees what the warm-up made, reads its resident set size (the loaded model and its
input), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the job once and
reads the peak (``VmHWM``). Before it measures, the allocator returns what the warm-up freed to
the system (``common.trim_allocator``): otherwise the measured job would reuse those pages
unseen. The weight transforms the warm-up kept in ``WEIGHT_CACHE`` are dropped too, so a query
that keeps them (entropy, flow, magnitude paths) is charged for them. The figure is peak minus
that resident size:

* torch: forward + ``torch.autograd.grad`` of the sink wrt the word-embedding output (gradgraph's
  source);
* gradgraph: ``gg.capture`` followed by one query -- ``gradient``, ``entropy``, ``top_paths(k=1)``,
  ``top_paths(k=10)`` or ``flow(by="node")`` -- with the graph held until the query ends.

The ratio is gradgraph's figure over torch's; the target is <= 2. ``--lazy`` adds rows for a
graph saved to a file and loaded again (``gg.load``, memory-mapped) in the subprocess: the peak of
load + query above the loaded model.

``--breakdown MODEL`` instead captures once in this process and prints where the graph's memory
goes: the RSS of the capture (peak and held), and the bytes of the graph's arrays by kind (node
values, each Jacobian kind's arrays, path recovery's column index), by op and by array, each byte
counted once (arrays sharing memory are attributed to their first user; the model's parameters,
which Jacobians reference, are counted apart).

Run: ``.venv/bin/python benchmarks/memory.py [--models gpt2-64,gpt2-256,bert-32] [--queries ...] [--lazy]``
or ``.venv/bin/python benchmarks/memory.py --breakdown gpt2-256``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (bert_inputs, bert_mlm, embedding_forward, fmt_bytes, machine, print_table,  # noqa: E402
                    trim_allocator)

QUERIES = {
    "gradient": lambda g: g.gradient(),
    "entropy": lambda g: g.entropy(),
    "top_paths(k=1)": lambda g: g.top_paths(k=1),
    "top_paths(k=10)": lambda g: g.top_paths(k=10),
    "flow": lambda g: g.flow(by="node"),
}
MODELS = ("gpt2-64", "gpt2-256", "bert-32")
TARGET = 2.0
GPT2_A, GPT2_B = 262, 1169          # arbitrary fixed tokens of the sink's logit difference


def _model(name):
    """(model, kwargs for a given token count, sink function, tokens)."""
    kind, tokens = name.split("-")
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()

        def inputs(t, seed=0):
            ids = torch.randint(0, 50257, (1, t), generator=torch.Generator().manual_seed(seed))
            return {"input_ids": ids}

        def sink(o):
            return o.logits[0, -1, GPT2_A] - o.logits[0, -1, GPT2_B]
        return model, inputs, sink, int(tokens)
    if kind == "bert":
        from common import MASK_POS
        model = bert_mlm(vocab_size=2000)

        def sink(o):
            return o.logits[0, MASK_POS, 1500] - o.logits[0, MASK_POS, 1600]
        return model, (lambda t, seed=0: bert_inputs(t, seed=seed, vocab_size=2000)), sink, int(tokens)
    raise SystemExit(f"unknown model {name!r}; one of {MODELS}")


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(job, warm_up):
    """Peak RSS of ``job()`` above the RSS before it (after ``warm_up()`` and a collection)."""
    warm_up()
    # what the warm-up left in the process-wide weight cache (|W|, -|W| log|W|) is dropped: the
    # job pays for the transforms it keeps, as a process's first query does
    from gradgraph.jacobians._weightcache import WEIGHT_CACHE
    WEIGHT_CACHE.clear()
    gc.collect()
    trim_allocator()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    job()
    return _status("VmHWM") - before


def child(model_name, what, graph_file=None, first=False, values=None):
    """Print the peak of one job; the warm-up runs it on another input of the same length (the
    program of this input shape exported, as for a user's second input), or with ``first`` on
    an 8-token input (the measured capture then includes the export of its shape)."""
    torch.set_num_threads(1)
    import gradgraph as gg
    model, inputs, sink, tokens = _model(model_name)
    kwargs, small = inputs(tokens), (inputs(8) if first else inputs(tokens, seed=1))
    if what == "torch":
        def run(kw):
            torch.autograd.grad(*embedding_forward(model, kw, sink))
        peak = _measure(lambda: run(kwargs), lambda: run(small))
    elif what.startswith("load:"):
        query = QUERIES[what[len("load:"):]]
        warm = gg.capture(model, (), small, output=sink)
        warm_file = graph_file + ".warm"
        warm.save(warm_file, overwrite=True)

        def run(path):
            query(gg.load(path))
        peak = _measure(lambda: run(graph_file), lambda: (run(warm_file), os.remove(warm_file)))
    else:
        query = QUERIES[what]

        def run(kw):
            query(gg.capture(model, (), kw, output=sink, **({} if values is None else {"values": values})))
        peak = _measure(lambda: run(kwargs), lambda: run(small))
    print(json.dumps({"peak": peak}))


def _extent(a):
    """(first, last + 1) address of array ``a``'s memory, or None when it has none."""
    import numpy as np
    if not isinstance(a, np.ndarray) or a.nbytes == 0:
        return None
    lo = a.__array_interface__["data"][0] + sum(min(0, (n - 1) * st) for n, st in zip(a.shape, a.strides))
    return lo, lo + sum((n - 1) * abs(st) for n, st in zip(a.shape, a.strides)) + a.itemsize


def _merged(intervals):
    """Disjoint sorted (start, end) intervals covering the same bytes as ``intervals``."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def breakdown(model_name, top=20, values="needed"):
    """Capture once here; print the RSS of the capture and the graph's bytes by kind, op and array."""
    import collections
    import gradgraph as gg
    torch.set_num_threads(1)
    model, inputs, sink, tokens = _model(model_name)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    g = gg.capture(model, (), inputs(tokens), output=sink, **({} if values is None else {"values": values}))
    print(f"{model_name}: {g}")
    print(f"capture: peak {fmt_bytes(_status('VmHWM') - before)}, held {fmt_bytes(_status('VmRSS') - before)} "
          f"above the loaded model")
    for name, query in QUERIES.items():      # path recovery's index is built by a query
        if name == "top_paths(k=1)":
            query(g)
    seen = _merged(e for e in (_extent(p.detach().numpy()) for p in model.parameters()) if e)
    params = sum(b - a for a, b in seen)
    items = [(("node value", n.op_name, "value"), n.value) for n in g.nodes]
    for e in g.edges:
        op = g.nodes[e.dst].op_name
        items += [((f"{e.jac.kind} Jacobian", op, k), a) for k, a in e.jac.state()[1].items()]
        csc = getattr(e.jac, "_csc", None)
        if csc:
            items += [(("path recovery index", op, "csc"), a) for a in csc]
    by_key, by_kind, shared = collections.Counter(), collections.Counter(), 0
    for key, a in items:
        ext = _extent(a)
        if ext is None:
            continue
        lo, hi = ext
        overlap = sum(max(0, min(hi, b) - max(lo, a_)) for a_, b in seen)
        new = (hi - lo) - overlap
        shared += overlap
        by_key[key] += new
        by_kind[key[0]] += new
        seen = _merged(seen + [ext])
    unheld = [n for n in g.nodes if n.value is None]
    print(f"node values: held by {len(g.nodes) - len(unheld)} of {len(g.nodes)} nodes; the {len(unheld)} not held (no "
          f"Jacobian references them, values={g.meta.get('values', 'all')!r}) have, views counted apart, "
          f"{fmt_bytes(sum(n.numel * torch.empty((), dtype=getattr(torch, n.dtype)).element_size() for n in unheld))}")
    print(f"graph arrays: {fmt_bytes(sum(by_kind.values()))} of their own; the model's parameters "
          f"({fmt_bytes(params)}) are referenced, not copied")
    print_table([(k, fmt_bytes(v)) for k, v in by_kind.most_common()], headers=("kind", "bytes"))
    print()
    print_table([(k, op, arr, fmt_bytes(v)) for (k, op, arr), v in by_key.most_common(top)],
                headers=("kind", "op", "array", "bytes"))


def _run_child(model_name, what, graph_file=None, first=False, values=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model_name, what]
    if values:
        cmd += ["--values", values]
    if graph_file:
        cmd += ["--graph", graph_file]
    if first:
        cmd += ["--first"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return None, lines[-1] if lines else f"exit {out.returncode}"
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"], ""


def _save_graph(model_name, path):
    import gradgraph as gg
    model, inputs, sink, tokens = _model(model_name)
    gg.capture(model, (), inputs(tokens), output=sink).save(path, overwrite=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--queries", default=",".join(QUERIES))
    ap.add_argument("--lazy", action="store_true", help="also measure gg.load (memory-mapped) + query")
    ap.add_argument("--json", help="append the results as JSON lines to this file")
    ap.add_argument("--breakdown", metavar="MODEL", help="where the graph's memory goes, for one model")
    ap.add_argument("--values", choices=["needed", "all"], default=None,
                    help="gg.capture's values option for the capture jobs and --breakdown "
                         "(default: the library's default)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    ap.add_argument("--graph", help=argparse.SUPPRESS)
    ap.add_argument("--first", action="store_true",
                    help="measure the first capture of the input's shape (with its torch.export)")
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child, graph_file=args.graph, first=args.first, values=args.values)
    if args.breakdown:
        return breakdown(args.breakdown, values=args.values)
    print(machine(), "| load:", os.getloadavg())
    queries = [q for q in args.queries.split(",") if q]
    for name in args.models.split(","):
        base, err = _run_child(name, "torch")
        rows = [("torch forward + backward", fmt_bytes(base) if base else err, "1.00")]
        results = {"model": name, "torch": base}
        whats = list(queries)
        tmp = None
        if args.lazy:
            tmp = tempfile.mkdtemp()
            graph_file = os.path.join(tmp, "g.safetensors")
            _save_graph(name, graph_file)
            whats += [f"load:{q}" for q in queries]
        for what in whats:
            peak, err = _run_child(name, what, graph_file if what.startswith("load:") else None, args.first,
                                   args.values)
            results[what] = peak
            label = (f"gg.load + {what[5:]}" if what.startswith("load:") else f"gg.capture + {what}")
            ratio = f"{peak / base:.2f}" if peak and base else "-"
            rows.append((label, fmt_bytes(peak) if peak else err, ratio))
        print(f"\n{name}: peak memory above the loaded model and input (target <= {TARGET:.0f}x torch)")
        print_table(rows, headers=("job", "peak above model", "ratio"))
        if tmp:
            for f in os.listdir(tmp):
                os.remove(os.path.join(tmp, f))
            os.rmdir(tmp)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
