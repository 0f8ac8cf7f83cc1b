"""The top path and the k best paths of one large graph, alone in a process: capture (with the
export), return the freed heap to the system, then each ``top_paths`` query -- process CPU time
and peak resident set (``VmHWM``, the loaded model included). No torch backward runs in the
process, so the peak is the graph's and the query's, not what torch's own backward left in the
heap. For ratios to torch use ``scale.py``.

Run: ``python benchmarks/paths_at_scale.py --model gpt2 --tokens 1024 --k 1 10``
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradgraph as gg  # noqa: E402
from common import status_bytes, trim_allocator  # noqa: E402
from scale import MODELS, build  # noqa: E402


def _mb(field):
    return f"{status_bytes(field) / 2**20:,.0f} MB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    gg.set_num_threads(args.threads)
    model, inputs, output = build(args.model, None, args.tokens)
    print("model loaded: RSS", _mb("VmRSS"), flush=True)
    t, w = time.process_time(), time.time()
    g = gg.capture(model, (), inputs(args.tokens), output=output)
    print(f"capture (with export) {time.process_time() - t:.1f} s CPU, {time.time() - w:.1f} s wall; {g}", flush=True)
    gc.collect()
    trim_allocator()
    print("graph held: RSS", _mb("VmRSS"), "peak so far", _mb("VmHWM"), flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                      # restart the peak counter
    for k in args.k:
        t, w = time.process_time(), time.time()
        paths = g.top_paths(k=k)
        print(f"top_paths(k={k}): {time.process_time() - t:.1f} s CPU, {time.time() - w:.1f} s wall; "
              f"peak RSS {_mb('VmHWM')}; best weight {paths[0].weight:.4g}, {len(paths)} paths, "
              f"length {paths[0].length}", flush=True)
        del paths
        gc.collect()
        trim_allocator()


if __name__ == "__main__":
    main()
