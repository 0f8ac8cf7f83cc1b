"""Speed at scale: every query on GPT-2 small, a small-vocabulary BERT or a Llama-style 1 B model,
against torch's own backward measured paired in the same run; and a sweep over tokens and depth.

Models (random init, float32, eval mode, eager attention; the sink is a logit difference at the
last position, for BERT at the [MASK] position):

* ``gpt2``: GPT-2 small (``GPT2Config()``: 12 layers, 768 wide, 12 heads, 50,257 words);
* ``bert-small-vocab``: ``common.BERT_CONFIG`` (6 layers, 512 wide) with a 2,000-word vocabulary;
* ``llama-1b``: ``LlamaConfig`` with 16 layers, hidden 2048, intermediate 8192, 32 heads, 8
  key-value heads (grouped-query attention), 32,000 words (1.1 B parameters);
* ``tiny``: a 2-layer, 32-wide GPT-2 with 100 words (seconds; for the smoke test).

``--layers L`` overrides the depth. For each number of ``--tokens``, the script captures the graph
of one input (the first capture includes ``torch.export``), then reports:

* **capture** of a *new* input against torch's forward + backward (down to the word-embedding
  output, gradgraph's source), paired: each capture is timed right after a torch run;
* each **query** on the captured graph -- ``gradient`` (REAL), ``top path`` (``top_paths(k=1)``,
  signed, with path recovery), ``entropy``, ``10 best paths`` (``top_paths(k=10)``, signed) and
  ``flow`` (``flow(by="node")``) -- against torch's backward alone (the forward untimed), paired
  the same way (``common.paired``).

With ``--threads 1`` both sides are timed in process CPU time (``common.clock_for``), which other
processes on a shared machine do not inflate; otherwise in wall time (the default environment:
torch's and numpy's own thread pools).

``--sweep`` runs one fresh subprocess per point -- tokens 16 -> 1,024 at the model's depth, then
depth 2 -> 24 layers at ``--sweep-tokens`` (``--sweep-token-counts``, ``--sweep-layer-counts``) --
timing torch's backward and forward + backward, the capture of a new input and the queries of
``--sweep-queries`` (default: gradient, top path, entropy); and, unless ``--no-memory``, first the
peak resident memory above the loaded model and its input (``VmHWM``, reset in between): torch's
forward + backward, then gradgraph's capture of a new input (its shape exported before) plus a
gradient query. ``--point-timeout`` and ``--point-memory`` bound each point: one that runs out
of time or memory is recorded with what it measured until then and an ``"error"``, and the sweep
goes on. It writes a log-log plot to ``--plot`` (default ``docs/img/scaling.png``) and the
figures as JSON next to it, after every point.

Run::

    python benchmarks/scale.py --model gpt2 --tokens 64 256 1024 --threads 1
    python benchmarks/scale.py --model bert-small-vocab --tokens 32
    python benchmarks/scale.py --model gpt2 --sweep --threads 1 --repeats 1 --point-timeout 1800 --point-memory 14
    python benchmarks/scale.py --model llama-1b --tokens 128 --threads 1 --repeats 1
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BERT_CONFIG, THREADS, bert_inputs, clock_for, embedding_forward,  # noqa: E402
                    fmt_seconds, machine, paired, print_table, reset_peak, status_bytes, torch_backward,
                    trim_allocator)

import torch  # noqa: E402

import gradgraph as gg  # noqa: E402

#: query -> the issue's target ratio to torch's backward
TARGETS = {"gradient": 1.5, "top path": 3.0, "entropy": 3.0, "10 best paths": 5.0, "flow": 3.0}
#: target ratio of the capture of a new input to torch's forward + backward
TARGET_CAPTURE = 3.0
SWEEP_TOKENS = (16, 32, 64, 128, 256, 512, 1024)
SWEEP_LAYERS = (2, 4, 8, 12, 24)
SWEEP_QUERIES = ("gradient", "top path", "entropy")


def queries(g):
    return {
        "gradient": lambda: g.gradient(),
        "top path": lambda: g.top_paths(k=1, order="signed"),
        "entropy": lambda: g.entropy(),
        "10 best paths": lambda: g.top_paths(k=10, order="signed"),
        "flow": lambda: g.flow(by="node"),
    }


# ---------------------------------------------------------------------------- models
def _causal_inputs(vocab):
    def inputs(tokens, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, vocab, (1, tokens), generator=gen)}
    return inputs


def _last_logit_diff(a, b):
    return lambda out: out.logits[0, -1, a] - out.logits[0, -1, b]


def _gpt2(layers, tokens, **cfg):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_positions=max(1024, tokens), attn_implementation="eager", use_cache=False, **cfg)
    if layers:
        config.n_layer = layers
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    return model, _causal_inputs(config.vocab_size), _last_logit_diff(1, config.vocab_size - 2)


def _bert_small_vocab(layers, tokens):
    from transformers import BertConfig, BertForMaskedLM
    vocab = 2000
    config = BertConfig(**{**BERT_CONFIG, "vocab_size": vocab, "max_position_embeddings": max(512, tokens)})
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    mask_pos = 5

    def inputs(tokens, seed=0):
        return bert_inputs(tokens, seed=seed, vocab_size=vocab)
    return model, inputs, lambda out: out.logits[0, mask_pos, 1203] - out.logits[0, mask_pos, 1024]


def _llama_1b(layers, tokens):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=layers or 16, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=max(2048, tokens), attn_implementation="eager",
                         use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model, _causal_inputs(config.vocab_size), _last_logit_diff(1, config.vocab_size - 2)


MODELS = {
    "gpt2": ("GPT-2 small (12 x 768, 50,257 words)", _gpt2),
    "bert-small-vocab": ("BERT 6 x 512, 2,000 words", _bert_small_vocab),
    "llama-1b": ("Llama-style 1.1 B (16 x 2048, GQA 32/8 heads, 32,000 words)", _llama_1b),
    "tiny": ("GPT-2 2 x 32, 100 words", lambda layers, tokens: _gpt2(layers or 2, tokens, n_embd=32, n_head=2,
                                                                     vocab_size=100)),
}


def build(name, layers, tokens):
    """(model, inputs(tokens, seed) -> kwargs, output) of a model of :data:`MODELS`."""
    return MODELS[name][1](layers, tokens)


# ---------------------------------------------------------------------------- one configuration
def measure(model, inputs, output, tokens, repeats, clock, names=None, log=print, report=None):
    """Times of one configuration: {"torch backward", "torch forward + backward", "capture",
    "first capture", query...: seconds} and {"capture", query...: ratio to torch}.

    ``report``, if given, is called with the times measured so far after each of them (a sweep
    point keeps what it measured when a later query runs out of time or memory); a query that
    cannot allocate its memory is reported as ``"<query> error"`` and the next one runs."""
    kwargs = inputs(tokens, seed=0)
    bwd = torch_backward(model, kwargs, output)

    def fwd_bwd():
        return lambda: torch.autograd.grad(*embedding_forward(model, kwargs, output))

    t0 = time.perf_counter()
    graph = {"g": gg.capture(model, (), kwargs, output=output)}
    times = {"first capture": time.perf_counter() - t0}
    log(f"  first capture (with torch.export): {fmt_seconds(times['first capture'])} wall; {graph['g']}")
    seeds = iter(range(1, 10 ** 6))

    def capture_new():
        graph["g"] = None                     # the previous graph is not kept alive meanwhile
        graph["g"] = gg.capture(model, (), inputs(tokens, seed=next(seeds)), output=output)

    ratios = {}
    times["capture"], times["torch forward + backward"], _, _ = paired(capture_new, fwd_bwd, repeats, clock, warmup=0)
    ratios["capture"] = times["capture"] / times["torch forward + backward"]
    log(f"  capture {fmt_seconds(times['capture'])}, torch forward + backward "
        f"{fmt_seconds(times['torch forward + backward'])}: {ratios['capture']:.1f}x")
    report = report or (lambda t: None)
    report(times)
    backwards = []
    for name, fn in queries(graph["g"]).items():
        if names is not None and name not in names:
            continue
        try:
            times[name], t_ref, _, refs = paired(fn, bwd, repeats, clock)
        except (MemoryError, RuntimeError) as exc:       # numpy's and torch's allocation failures
            if isinstance(exc, RuntimeError) and "alloc" not in str(exc):
                raise
            times[f"{name} error"] = "out of memory"
            log(f"  {name}: out of memory")
            gc.collect()
            report(times)
            continue
        backwards += refs
        ratios[name] = times[name] / t_ref
        log(f"  {name}: {fmt_seconds(times[name])}, paired torch backward {fmt_seconds(t_ref)}: {ratios[name]:.1f}x")
        times["torch backward"] = sorted(backwards)[len(backwards) // 2]
        report(times)
    times.setdefault("torch backward", None)
    return times, ratios


def print_results(model_name, tokens, times, ratios):
    print(f"\n## {MODELS[model_name][0]}, {tokens} tokens")
    bwd = times["torch backward"]        # None when no query finished (every one out of memory)
    print(f"torch backward (median of all paired runs) {'not run' if bwd is None else fmt_seconds(bwd)}; "
          f"first capture (with torch.export, wall) {fmt_seconds(times['first capture'])}")
    rows = [("capture of a new input", fmt_seconds(times["capture"]),
             f"{fmt_seconds(times['torch forward + backward'])} (fwd + bwd)", f"{ratios['capture']:.1f}x",
             f"<= {TARGET_CAPTURE:g}x " + ("ok" if ratios["capture"] <= TARGET_CAPTURE else "MISSED"))]
    for name, target in TARGETS.items():
        if f"{name} error" in times:
            rows.append((name, times[f"{name} error"], "", "", f"<= {target:g}x MISSED"))
        if name in ratios:
            r = ratios[name]
            rows.append((name, fmt_seconds(times[name]), f"{fmt_seconds(times[name] / r)} (bwd)", f"{r:.1f}x",
                         f"<= {target:g}x " + ("ok" if r <= target else "MISSED")))
    print_table(rows, headers=("query", "time", "paired torch", "ratio", "target"))


# ---------------------------------------------------------------------------- sweep
def _child_cmd(args, *extra):
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--repeats", str(args.repeats)]
    if THREADS is not None:
        cmd += ["--threads", THREADS]
    return cmd + [str(a) for a in extra]


def _run_child(cmd, timeout=None, memory_limit=None):
    """The figures a sweep point's child printed (its last JSON line: what it measured so far),
    with ``"error"`` set when it failed, ran out of memory or did not finish in ``timeout`` s."""
    env = dict(os.environ)
    if memory_limit:
        env["GRADGRAPH_BENCH_MEMORY_LIMIT"] = str(int(memory_limit))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        stdout, stderr, error = out.stdout, out.stderr, None
        if out.returncode != 0:
            err = stderr.strip().splitlines()
            error = err[-1] if err else f"exit status {out.returncode}"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        error = f"did not finish within {timeout:g} s"
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    point = json.loads(lines[-1]) if lines else {}
    if error:
        point["error"] = error
    return point


def _limit_memory():
    """Cap this process's address space (``GRADGRAPH_BENCH_MEMORY_LIMIT`` bytes), so that a sweep
    point that needs more fails with a MemoryError instead of taking a shared machine's memory."""
    import resource
    limit = os.environ.get("GRADGRAPH_BENCH_MEMORY_LIMIT")
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))


def child_point(args):
    """One sweep point in this (fresh) process: peak memory (unless ``--no-memory``), then times;
    prints its figures as a JSON line after each measurement."""
    _limit_memory()
    tokens, layers = args.tokens[0], args.layers
    model, inputs, output = build(args.model, layers, tokens)
    point = {}

    def report(times=None):
        print(json.dumps({**(times or {}), **point}), flush=True)
    if not args.no_memory:
        # peaks above the loaded model and its input: torch's forward + backward, then
        # gradgraph's capture of a new input (the program of this input shape exported by a
        # first capture before, as a user's second input would find it) and a gradient query
        kwargs = inputs(tokens, seed=0)
        gc.collect()
        trim_allocator()
        base = status_bytes("VmRSS")
        reset_peak()
        torch.autograd.grad(*embedding_forward(model, kwargs, output))
        point["torch peak"] = status_bytes("VmHWM") - base
        gc.collect()
        t0 = time.perf_counter()
        g = gg.capture(model, (), inputs(tokens, seed=1), output=output)
        point["first capture"] = time.perf_counter() - t0
        del g
        gc.collect()
        trim_allocator()        # what the first capture freed must not be reused unseen
        base = status_bytes("VmRSS")
        reset_peak()
        gg.capture(model, (), kwargs, output=output).gradient()
        point["gradgraph peak"] = status_bytes("VmHWM") - base
        gc.collect()
        report()
    times, _ = measure(model, inputs, output, tokens, args.repeats, clock_for(THREADS), names=args.sweep_queries,
                       log=lambda *a: None, report=report)
    if "first capture" in point:       # measure's first capture found the program exported
        times.pop("first capture")
    report(times)


def sweep(args):
    points = [(t, None) for t in args.sweep_token_counts] + [(args.sweep_tokens, n) for n in args.sweep_layer_counts]
    out = os.path.splitext(args.plot)[0] + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results = []
    for tokens, layers in points:
        extra = ["--tokens", tokens] + (["--layers", layers] if layers else []) + \
            (["--no-memory"] if args.no_memory else [])
        extra += ["--sweep-queries", *args.sweep_queries]
        point = {"tokens": tokens, "layers": layers,
                 **_run_child(_child_cmd(args, "--point", *extra), args.point_timeout,
                              args.point_memory * 2**30 if args.point_memory else None)}
        results.append(point)
        print(json.dumps(point), flush=True)
        # written after every point, so that a long sweep leaves what it has measured
        with open(out, "w") as f:
            json.dump({"model": args.model, "threads": THREADS, "date": str(datetime.datetime.now()),
                       "machine": machine(), "load": os.getloadavg(), "points": results}, f, indent=1)
        plot(results, args, args.plot)
    print(f"wrote {args.plot} and {out}")


def plot(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    default_layers = build_depth(args.model)
    # the tokens sweep's point at the depth sweep's tokens is a point of the depth sweep too
    by_depth = [r for r in results if r["layers"] is not None] + \
        [{**r, "layers": default_layers} for r in results if r["layers"] is None and r["tokens"] == args.sweep_tokens]
    panels = [("tokens", [r for r in results if r["layers"] is None], f"tokens ({default_layers} layers)"),
              ("layers", sorted(by_depth, key=lambda r: r["layers"]), f"layers ({args.sweep_tokens} tokens)")]
    memory = not args.no_memory
    fig, axes = plt.subplots(2 if memory else 1, 2, figsize=(11, 8.5 if memory else 4.5), squeeze=False)
    series = [("torch backward", "k-", "torch backward"), ("torch forward + backward", "k--", "torch fwd + bwd"),
              ("capture", "C0--", "capture (new input)"), ("gradient", "C1-", "gradient"),
              ("top path", "C2-", "top path (k=1, signed)"), ("entropy", "C3-", "entropy")]
    for col, (key, rows, label) in enumerate(panels):
        # a point that did not finish is drawn with what it measured
        ax = axes[0][col]
        for name, style, legend in series:
            pts = [(r[key] if key == "tokens" else r["layers"], r[name]) for r in rows if r.get(name)]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=legend)
        ax.set(xscale="log", yscale="log", xlabel=label,
               ylabel="seconds (" + ("CPU, 1 thread" if getattr(args, "saved_threads", THREADS) == "1" else "wall") + ")")
        _ticks(ax, rows, key)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        if memory:
            ax = axes[1][col]
            for name, style, legend in (("torch peak", "k-", "torch fwd + bwd"),
                                        ("gradgraph peak", "C1-", "capture (new input) + gradient")):
                pts = [(r[key] if key == "tokens" else r["layers"], r[name] / 2 ** 20) for r in rows if r.get(name)]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=legend)
            ax.set(xscale="log", yscale="log", xlabel=label, ylabel="peak RSS above the model (MB)")
            _ticks(ax, rows, key)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{MODELS[args.model][0]}: time and memory against torch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _ticks(ax, rows, key):
    """Label the measured x values plainly (log axes would label powers of ten)."""
    from matplotlib.ticker import NullFormatter
    xs = sorted({r[key] for r in rows})
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())


def build_depth(name):
    """The model's default number of layers (for labels)."""
    return {"gpt2": 12, "bert-small-vocab": 6, "llama-1b": 16, "tiny": 2}[name]


# ---------------------------------------------------------------------------- profile
def profile(model, inputs, output, tokens, clock, top=25, names=None):
    """Where each query's time goes: per Jacobian kind (the semiring products, timed by wrapping
    the product dispatch) and a cProfile of one run (sorted by internal time)."""
    import collections
    import cProfile
    import pstats

    from gradgraph.algorithms import semirings
    g = gg.capture(model, (), inputs(tokens, seed=0), output=output)
    g = gg.capture(model, (), inputs(tokens, seed=1), output=output)
    prof = cProfile.Profile(clock)
    prof.enable()
    gg.capture(model, (), inputs(tokens, seed=2), output=output)
    prof.disable()
    print("\n### capture of a new input")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    inner = semirings.product
    per_kind = collections.defaultdict(lambda: [0, 0.0])

    def timed(sr, jac, x, transpose):
        t0 = clock()
        try:
            return inner(sr, jac, x, transpose)
        finally:
            cell = per_kind[(sr.name, type(jac).__name__)]
            cell[0] += 1
            cell[1] += clock() - t0
    for name, fn in queries(g).items():
        if names is not None and name not in names:
            continue
        fn()                                   # warm-up: numba kernels, cached transposes
        per_kind.clear()
        semirings.product = timed
        t0 = clock()
        try:
            fn()
        finally:
            semirings.product = inner
        total = clock() - t0
        print(f"\n### {name}: {fmt_seconds(total)}")
        rows = sorted(per_kind.items(), key=lambda kv: -kv[1][1])
        print_table([(sr, kind, n, fmt_seconds(t), f"{100 * t / total:.0f}%") for (sr, kind), (n, t) in rows]
                    + [("(outside products)", "", "", fmt_seconds(total - sum(t for _, t in per_kind.values())), "")],
                    headers=("semiring", "Jacobian kind", "calls", "time", "share"))
        prof = cProfile.Profile(clock)
        prof.enable()
        fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)


# ---------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--layers", type=int, help="override the model's depth")
    ap.add_argument("--repeats", type=int, default=3, help="paired runs per measurement (median)")
    ap.add_argument("--threads", type=int, help="threads of every pool (torch, OpenBLAS, OpenMP, numba) on both "
                                                "sides; default: the environment's")
    ap.add_argument("--sweep", action="store_true", help="tokens 16 -> 1,024 and depth 2 -> 24, plotted")
    ap.add_argument("--sweep-tokens", type=int, default=64, help="tokens of the depth sweep")
    ap.add_argument("--sweep-token-counts", type=int, nargs="*", default=list(SWEEP_TOKENS),
                    help="numbers of tokens of the tokens sweep (default: %(default)s)")
    ap.add_argument("--sweep-layer-counts", type=int, nargs="*", default=list(SWEEP_LAYERS),
                    help="numbers of layers of the depth sweep (default: %(default)s)")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "docs", "img", "scaling.png"))
    ap.add_argument("--no-memory", action="store_true", help="sweep: skip the peak-memory measurements")
    ap.add_argument("--sweep-queries", nargs="*", default=list(SWEEP_QUERIES), choices=list(TARGETS),
                    help="queries timed at each sweep point (default: %(default)s)")
    ap.add_argument("--point-timeout", type=float, default=None,
                    help="sweep: seconds a point may take; one that takes longer is recorded as not "
                         "finished, with what it measured until then")
    ap.add_argument("--point-memory", type=float, default=None,
                    help="sweep: GB of address space a point may use; a query that needs more is recorded "
                         "as out of memory")
    ap.add_argument("--profile", action="store_true", help="where the time goes, for the first --tokens")
    ap.add_argument("--queries", nargs="+", choices=sorted(TARGETS),
                    help="measure only these queries (the capture is always measured); default: all")
    ap.add_argument("--replot", metavar="JSON", help="redraw --plot from the figures a sweep wrote")
    ap.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        return child_point(args)
    if args.sweep:
        return sweep(args)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        args.model = saved["model"]
        args.saved_threads = saved.get("threads")     # the sweep's clock, for the axis label
        return plot(saved["points"], args, args.plot)
    if args.profile:
        model, inputs, output = build(args.model, args.layers, args.tokens[0])
        return profile(model, inputs, output, args.tokens[0], clock_for(THREADS), names=args.queries)
    print(f"# Speed at scale -- {datetime.datetime.now():%Y-%m-%d %H:%M} -- {machine()}")
    print(f"timing: {'process CPU time (1 thread)' if THREADS == '1' else 'wall time'}; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    for tokens in args.tokens:
        model, inputs, output = build(args.model, args.layers, tokens)
        print(f"\n{MODELS[args.model][0]}, {tokens} tokens:", flush=True)
        times, ratios = measure(model, inputs, output, tokens, args.repeats, clock_for(THREADS),
                                names=args.queries, log=lambda *a: print(*a, flush=True))
        print_results(args.model, tokens, times, ratios)
        del model
        gc.collect()
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
