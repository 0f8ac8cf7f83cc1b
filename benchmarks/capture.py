"""Capture benchmark: how long capturing a gradient graph takes, and how large its file is.

Model: random-init BertForMaskedLM (6 layers, hidden 512, 8 heads, intermediate 2048, eager
attention, vocab 30522), one 32-token input, sink = a logit difference at the [MASK] position.

Reported, all measured in this run:

* torch forward + backward (median of several runs) -- the yardstick;
* the first capture (includes ``torch.export``), and repeated captures on NEW inputs of the same
  shape (the export is cached; median of a few), with the ratio repeated / (forward + backward);
* the saved file's size against the bytes the graph references (distinct weight blocks plus node
  values), and save / load times.

Run: ``.venv/bin/python benchmarks/capture.py [--repeats N] [--threads T] [--profile]``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (bert_inputs, bert_mlm, fmt_bytes, fmt_seconds, logit_diff, machine,  # noqa: E402
                    print_table, torch_fwd_bwd_time)

import gradgraph as gg  # noqa: E402

TARGET_CAPTURE_RATIO = 10.0
TARGET_SIZE_RATIO = 1.5


def _param_blocks(model):
    """(start address, end address, nbytes) of every parameter and buffer of the model."""
    blocks = []
    for t in list(model.parameters()) + list(model.buffers()):
        a = t.data_ptr()
        blocks.append((a, a + t.numel() * t.element_size(), t.numel() * t.element_size()))
    return blocks


def referenced_bytes(g, model):
    """(weight bytes, value bytes): the distinct model parameters some Jacobian array lies in,
    and the node values -- what the graph must keep at the least."""
    blocks = _param_blocks(model)
    used = set()
    for e in g.edges:
        for a in e.jac.state()[1].values():
            addr = a.__array_interface__["data"][0]
            for k, (lo, hi, _) in enumerate(blocks):
                if lo <= addr < hi:
                    used.add(k)
    weights = sum(blocks[k][2] for k in used)
    values = sum(n.value.nbytes for n in g.nodes if n.value is not None)
    return weights, values


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="repeated captures to take the median of")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="cProfile one repeated capture")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for torch and capture alike (default: torch's own choice); "
                         "1 gives stable figures on a machine shared with other work")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = bert_mlm()
    inputs = [bert_inputs(args.seq_len, seed=s) for s in range(args.repeats + 2)]
    t_torch = torch_fwd_bwd_time(model, inputs[0])

    t0 = time.perf_counter()
    g = gg.capture(model, (), inputs[0], output=logit_diff)
    t_first = time.perf_counter() - t0

    repeated = []
    for kw in inputs[1:args.repeats + 1]:
        t0 = time.perf_counter()
        g2 = gg.capture(model, (), kw, output=logit_diff)
        repeated.append(time.perf_counter() - t0)
    t_rep = statistics.median(repeated)

    # the checks every capture makes (docs/capture.md, "Guarantees"): the eager run compared with
    # the cached program's output, and the scan for non-finite values and dense / lower-precision
    # nodes
    from gradgraph.capture.diagnostics import diagnostics
    eager = []
    for kw in inputs[1:args.repeats + 1]:
        t0 = time.perf_counter()
        with torch.no_grad():
            logit_diff(model(**kw))
        eager.append(time.perf_counter() - t0)
    t_eager = statistics.median(eager)
    t0 = time.perf_counter()
    diagnostics(g2.nodes, g2.edges, list(g2.sources.values()), [])
    t_diag = time.perf_counter() - t0

    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        gg.capture(model, (), inputs[-1], output=logit_diff)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)

    weights, values = referenced_bytes(g2, model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bert.safetensors")
        t0 = time.perf_counter()
        g2.save(path)
        t_save = time.perf_counter() - t0
        size = os.path.getsize(path)
        t0 = time.perf_counter()
        h = gg.load(path)
        t_load = time.perf_counter() - t0
        same = all(np.array_equal(a.numpy(), b.numpy()) for a, b in
                   zip(g2.gradient().values(), h.gradient().values()))

    ratio = t_rep / t_torch
    size_ratio = size / (weights + values)
    ok = lambda good: "ok" if good else "MISSED"   # noqa: E731
    print(f"gradgraph capture benchmark, {datetime.date.today()}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"model: BertForMaskedLM 6 layers, hidden 512, 8 heads, vocab 30522; {args.seq_len} tokens; "
          f"graph: {len(g2.nodes)} tensors, {len(g2.edges)} Jacobians")
    print()
    print_table([
        ("torch forward + backward (median)", fmt_seconds(t_torch), ""),
        ("first capture (with torch.export)", fmt_seconds(t_first), ""),
        (f"repeated capture, new input (median of {len(repeated)})", fmt_seconds(t_rep), ""),
        ("  of which the eager check run (median)", fmt_seconds(t_eager), ""),
        ("  of which the non-finite / precision scan", fmt_seconds(t_diag), ""),
        ("repeated capture / (forward + backward)", f"{ratio:.1f}x",
         f"target <= {TARGET_CAPTURE_RATIO:.0f}x: {ok(ratio <= TARGET_CAPTURE_RATIO)}"),
        ("weights referenced", fmt_bytes(weights), ""),
        ("node values (activations)", fmt_bytes(values), ""),
        ("saved file", fmt_bytes(size), ""),
        ("file / (weights + activations)", f"{size_ratio:.2f}x",
         f"target <= {TARGET_SIZE_RATIO}x: {ok(size_ratio <= TARGET_SIZE_RATIO)}"),
        ("save", fmt_seconds(t_save), ""),
        ("load", fmt_seconds(t_load), ""),
        ("gradient after load identical", "yes" if same else "NO", ""),
    ], headers=("quantity", "value", "note"))


if __name__ == "__main__":
    main()
