"""Shared helpers of the benchmark scripts: the benchmark BERT, timing, and table printing.

Every benchmark measures torch in the same run as gradgraph, so ratios are comparable across
machines; absolute times depend on the machine (``machine()`` says which).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

__all__ = ["BERT_CONFIG", "bert_mlm", "bert_inputs", "logit_diff", "median_time", "torch_fwd_bwd_time",
           "machine", "print_table", "fmt_seconds", "fmt_bytes"]

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
