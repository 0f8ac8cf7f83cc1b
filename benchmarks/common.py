"""Shared helpers of the benchmark scripts: the benchmark BERT, timing, and table printing.

Every benchmark measures torch in the same run as gradgraph, so ratios are comparable across
machines; absolute times depend on the machine (``machine()`` says which).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time


def threads_from_argv(argv):
    """The value of ``--threads T`` (or ``--threads=T``) in ``argv``, or None."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return None


#: ``--threads T`` of the running script. It must act before numpy and torch load their thread
#: pools, so importing this module (before torch or numpy) sets it in the environment, which
#: subprocesses inherit, for OpenBLAS (numpy's GEMMs), OpenMP, MKL and numba.
THREADS = threads_from_argv(sys.argv)
if THREADS is not None:
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = THREADS

import torch  # noqa: E402

__all__ = ["BERT_CONFIG", "THREADS", "bert_mlm", "bert_inputs", "logit_diff", "median_time", "torch_fwd_bwd_time",
           "torch_backward", "clock_for", "paired", "status_bytes", "reset_peak", "second_run_peak", "machine", "print_table", "fmt_seconds", "fmt_bytes"]

#: The benchmark model: a random-init BertForMaskedLM of BERT-small-like size.
BERT_CONFIG = dict(vocab_size=30522, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                   intermediate_size=2048, max_position_embeddings=512, type_vocab_size=2,
                   attn_implementation="eager")

#: Token ids of the sink's logit difference (arbitrary, fixed): logits[0, MASK_POS, A] - logits[0, MASK_POS, B].
MASK_POS, TOKEN_A, TOKEN_B = 5, 2003, 2024
MASK_ID = 103


def bert_mlm(seed=0, **overrides):
    """Random-init ``BertForMaskedLM`` (eval mode, float32) with :data:`BERT_CONFIG` (+ overrides)."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(**{**BERT_CONFIG, **overrides})).eval()


def bert_inputs(seq_len=32, seed=0, vocab_size=BERT_CONFIG["vocab_size"]):
    """``{"input_ids", "attention_mask"}`` for one random sequence with [MASK] at :data:`MASK_POS`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab_size, (1, seq_len), generator=g)
    ids[0, 0], ids[0, -1], ids[0, MASK_POS] = 101, 102, MASK_ID
    return {"input_ids": ids, "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}


def logit_diff(out):
    """The benchmark sink: logits[0, MASK_POS, TOKEN_A] - logits[0, MASK_POS, TOKEN_B]."""
    return out.logits[0, MASK_POS, TOKEN_A] - out.logits[0, MASK_POS, TOKEN_B]


def median_time(fn, repeats=5, warmup=1):
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def embedding_forward(model, kwargs, output=logit_diff):
    """torch forward of ``output(model(**kwargs))`` with the word-embedding output (gradgraph's
    source) made to require grad: returns (sink, embedding output)."""
    holder = {}

    def hook(mod, inp, out):
        out.requires_grad_(True)
        holder["e"] = out
        return out
    h = model.get_input_embeddings().register_forward_hook(hook)
    try:
        y = output(model(**kwargs))
    finally:
        h.remove()
    return y, holder["e"]


def torch_fwd_bwd_time(model, kwargs, output=logit_diff, repeats=7):
    """Median seconds of one torch forward + backward of ``output(model(**kwargs))`` down to the
    word-embedding output (gradient wrt the embeddings, as gradgraph's source)."""
    def run():
        torch.autograd.grad(*embedding_forward(model, kwargs, output))
    return median_time(run, repeats=repeats, warmup=2)


def torch_backward(model, kwargs, output=logit_diff):
    """``forward()`` runs torch's forward of ``output(model(**kwargs))`` and returns a closure that
    runs its backward down to the word-embedding output (gradgraph's source), so that a caller can
    time the backward alone."""
    def forward():
        y, emb = embedding_forward(model, kwargs, output)
        return lambda: torch.autograd.grad(y, emb)
    return forward


def clock_for(threads):
    """Process CPU time with one thread (other processes competing for the cores do not inflate
    it; on an idle machine it equals wall time), wall time otherwise (CPU time would add up the
    threads)."""
    return time.process_time if str(threads) == "1" else time.perf_counter


def paired(fn, make_reference, repeats, clock, warmup=1, cpu_out=None):
    """Time ``fn()`` and a reference run in pairs: each repeat calls ``make_reference()`` untimed
    (e.g. torch's forward), times the callable it returns, then times ``fn()``. A load that drifts
    during the run hits both sides of a pair alike.

    ``cpu_out``, a dict if given, receives the process CPU times of every run (all threads:
    what each side costs the machine, however loaded) under ``"fn"`` and ``"reference"``.

    Returns
    -------
    (fn_median, reference_median, fn_times, reference_times) : seconds by ``clock``
    """
    for _ in range(warmup):
        fn()
    ref_times, fn_times, ref_cpu, fn_cpu = [], [], [], []
    for _ in range(repeats):
        ref = make_reference()
        t0, c0 = clock(), time.process_time()
        ref()
        t1, c1 = clock(), time.process_time()
        fn()
        fn_times.append(clock() - t1)
        fn_cpu.append(time.process_time() - c1)
        ref_times.append(t1 - t0)
        ref_cpu.append(c1 - c0)
    if cpu_out is not None:
        cpu_out.update(fn=fn_cpu, reference=ref_cpu)
    return statistics.median(fn_times), statistics.median(ref_times), fn_times, ref_times


def status_bytes(field):
    """A size field of ``/proc/self/status`` in bytes: ``VmRSS`` (resident now) or ``VmHWM`` (peak
    resident since start or since the last :func:`reset_peak`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def trim_allocator():
    """Return the memory the allocator holds free to the system (glibc's ``malloc_trim``), so that
    a peak measured next counts the pages a job touches, not only those beyond what an earlier
    job left free in the heap (glibc keeps large freed blocks once it has raised its memory-map
    threshold)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak():
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def second_run_peak(fn):
    """(extra, total): the second run's peak RSS above the RSS before it, and the peak itself
    (which includes the interpreter, torch and the resident graph or model)."""
    fn()
    reset_peak()
    before = status_bytes("VmRSS")
    fn()
    peak = status_bytes("VmHWM")
    return peak - before, peak


def machine():
    """One line describing where the benchmark ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


def fmt_seconds(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_table(rows, headers=("quantity", "value")):
    """Print ``rows`` (sequences of cells) as an aligned plain-text table."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
