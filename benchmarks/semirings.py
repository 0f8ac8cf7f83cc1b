"""Semiring query benchmark: each query on one captured graph, against torch's own backward.

Model: random-init BertForMaskedLM (6 layers, hidden 512, 8 heads, eager attention; see
``common.BERT_CONFIG``), one 32-token input, sink = a logit difference at the [MASK] position.
The graph is captured once; then every query is timed on it (median of ``--repeats`` runs after
one warm-up run that also loads numba's compiled kernels). Each query run is paired with a torch
backward run just before it, and the ratio is the query's median over the torch median of its
own pairs, so a machine whose load changes during the run still gives fair ratios. With
``--threads 1`` both sides are timed in process CPU time (equal to wall time on an idle machine,
and unaffected by other processes competing for the cores); otherwise in wall time:

* torch backward alone (``torch.autograd.grad`` of the sink wrt the word-embedding output, the
  forward run untimed beforehand) -- the yardstick; also torch forward + backward;
* gradient (REAL), entropy (ENTROPY), flow (MAGNITUDE backward + forward), the MAX_SIGNED
  backward pass, ``top_paths(k=1)`` (signed, with path recovery), ``top_paths(k=10)``.

Peak memory: each measurement runs in a fresh subprocess that builds its state (model + input,
or the graph loaded from a file), runs the operation once to warm up, resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``) and runs it again. torch's figures are forward + backward.
Three figures, each with its ratio to torch's:

* **footprint** (the target): VmHWM minus the RSS of the bare interpreter with torch and gradgraph
  imported -- everything the job holds at its peak: the model and its activations and gradients,
  or the graph (weights, activations, Jacobian factors) and the query's temporaries;
* **extra**: VmHWM minus the RSS just before the measured run -- the temporaries alone (small and
  noisy on torch's side: the allocator keeps blocks between runs);
* **total**: VmHWM itself, libraries included.

Run: ``.venv/bin/python benchmarks/semirings.py [--repeats N] [--threads T] [--no-memory] [--profile QUERY]``.
``--threads 1`` gives stable figures on a busy machine (multi-threaded OpenBLAS and OpenMP degrade
badly when the cores are oversubscribed); it applies to torch and gradgraph alike.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import os
import subprocess
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (THREADS, bert_inputs, bert_mlm, clock_for, fmt_bytes, fmt_seconds, logit_diff, machine,  # noqa: E402
                    median_time, paired, print_table, second_run_peak, status_bytes,
                    torch_backward)

import torch  # noqa: E402

import gradgraph as gg  # noqa: E402
from gradgraph.algorithms.dp import backward  # noqa: E402
from gradgraph.algorithms.semirings import MAX_SIGNED  # noqa: E402

#: query -> (target ratio to torch backward, or None)
TARGETS = {"gradient": None, "entropy": 3.0, "flow": None, "max_signed pass": 3.0,
           "top_paths(k=1)": 3.0, "top_paths(k=10)": 10.0}
TARGET_MEMORY = 3.0


def queries(g):
    return {
        "gradient": lambda: g.gradient(),
        "entropy": lambda: g.entropy(),
        "flow": lambda: g.flow(by="node"),
        "max_signed pass": lambda: backward(g, MAX_SIGNED),
        "top_paths(k=1)": lambda: g.top_paths(k=1, order="signed"),
        "top_paths(k=10)": lambda: g.top_paths(k=10, order="signed"),
    }


def torch_backward_time(model, kwargs, repeats):
    forward = torch_backward(model, kwargs)
    times = []
    for i in range(repeats + 2):
        bwd = forward()
        t0 = time.perf_counter()
        bwd()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------- memory (child side)
def child(what, graph_file, seq_len):
    base = status_bytes("VmRSS")            # the interpreter with torch and gradgraph imported
    if what == "torch":
        model = bert_mlm()
        kwargs = bert_inputs(seq_len)
        forward = torch_backward(model, kwargs)
        extra, total = second_run_peak(lambda: forward()())
    else:
        g = gg.load(graph_file)
        extra, total = second_run_peak(queries(g)[what])
    print(json.dumps({"extra": extra, "total": total, "footprint": total - base}))


def measure_memory(what, graph_file, seq_len):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--graph", graph_file,
           "--seq-len", str(seq_len)]
    if THREADS is not None:
        cmd += ["--threads", THREADS]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


# ---------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    ap.add_argument("--profile", metavar="QUERY", help="cProfile one run of this query and print the top")
    ap.add_argument("--threads", type=int, help="threads for torch and numpy's BLAS (both sides alike)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--graph", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args.graph, args.seq_len)

    model = bert_mlm()
    kwargs = bert_inputs(args.seq_len)
    t_bwd = torch_backward_time(model, kwargs, max(args.repeats, 5))
    fwd = torch_backward(model, kwargs)
    t_fwd_bwd = median_time(lambda: fwd()(), repeats=max(args.repeats, 5), warmup=1)

    t0 = time.perf_counter()
    g = gg.capture(model, (), kwargs, output=logit_diff)
    t_capture = time.perf_counter() - t0

    qs = queries(g)
    if args.profile:
        import cProfile
        import pstats
        qs[args.profile]()
        prof = cProfile.Profile(time.process_time if args.threads == 1 else time.perf_counter)
        prof.runctx("qs[args.profile]()", globals(), locals())
        prof.dump_stats("/tmp/semirings.prof")
        pstats.Stats("/tmp/semirings.prof").sort_stats("cumulative").print_stats(30)
        return

    clock = clock_for(args.threads)
    times, ratios = {}, {}
    torch_times = []
    for name, fn in qs.items():
        times[name], t_ref, _, pair_torch = paired(fn, fwd, args.repeats, clock)
        ratios[name] = times[name] / t_ref
        torch_times += pair_torch

    mem = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bert.safetensors")
            g.save(path)
            mem["torch"] = measure_memory("torch", path, args.seq_len)
            for name in qs:
                mem[name] = measure_memory(name, path, args.seq_len)

    print(f"# Semiring queries -- {datetime.date.today()} -- {machine()}")
    print(f"graph: {g}")
    print(f"capture (first, incl. torch.export): {fmt_seconds(t_capture)}")
    print(f"query timing: {'process CPU time (1 thread)' if clock is time.process_time else 'wall time'}")
    print(f"torch backward: {fmt_seconds(t_bwd)} (median of all paired runs: "
          f"{fmt_seconds(statistics.median(torch_times))})   torch forward + backward: {fmt_seconds(t_fwd_bwd)}")
    t_mem = mem.get("torch", (None, ""))[0]
    if t_mem is not None:
        print(f"torch forward + backward peak memory: {fmt_bytes(t_mem['footprint'])} footprint, "
              f"{fmt_bytes(t_mem['extra'])} extra, {fmt_bytes(t_mem['total'])} total resident")

    def mem_cells(m):
        """Peak footprint (the target), extra and total peak, each with its ratio to torch's."""
        if m is None or t_mem is None:
            return "n/a", "n/a", "n/a"
        cells = []
        for key in ("footprint", "extra", "total"):
            r = m[key] / t_mem[key]
            mark = (" ok" if r <= TARGET_MEMORY else " MISSED") if key == "footprint" else ""
            cells.append(f"{fmt_bytes(m[key])} = {r:.2f}x{mark}")
        return tuple(cells)

    rows = []
    for name in qs:
        t = times[name]
        target = TARGETS[name]
        ratio = ratios[name]
        m, err = mem.get(name, (None, ""))
        rows.append((name, "n/a" if t is None else fmt_seconds(t), "n/a" if ratio is None else f"{ratio:.1f}x",
                     "-" if target is None else f"<= {target:g}x" + ("" if ratio is None else
                                                                     (" ok" if ratio <= target else " MISSED")))
                    + mem_cells(m))
    print_table(rows, headers=("query", "time", "/ paired torch bwd", "target", "peak footprint / torch",
                               "extra peak / torch", "total peak RSS / torch"))


if __name__ == "__main__":
    main()
