"""HTML report benchmark: how long writing the report of a BERT-base-sized graph takes, how large
the file is, and how fast it opens in headless Chromium.

Model: random-init BertForMaskedLM with 12 layers, hidden size 768, 12 heads, intermediate 3072,
eager attention, vocabulary 30522 (float32, eval mode), one 64-token input; sink = a logit
difference at the [MASK] position (see ``common.py``).

Reported, all measured in this run: the capture (for context), ``gg.report`` wall time (target:
< 30 s) and CPU time (which other processes on a shared machine do not inflate), the report's file
size, and the page load time in headless Chromium (navigation start to the load event, target:
< 5 s; median of ``--loads`` fresh page loads) and the time until the page has drawn its last
figure (it draws them after the load event). ``--threads`` sets torch's threads and, through the
environment, numpy's BLAS threads (default 1); the CPU time of each section of the report is
printed too.

Run: ``.venv/bin/python benchmarks/report.py [--layers 12] [--hidden 768] [--tokens 64] [--k 20]
[--threads 1] [--loads 3] [--graph FILE]``. Needs ``chromium`` and ``chromedriver`` on PATH for the load time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time


def _threads_from_argv(argv):
    """``--threads T`` must act before numpy and torch load their thread pools: set it in the
    environment for OpenBLAS (numpy's GEMMs: with its default of one thread per core it spins on
    a busy machine and multiplies the CPU time of the report's small products), OpenMP and MKL."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"      # the default of --threads


for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = _threads_from_argv(sys.argv)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bert_inputs, bert_mlm, fmt_bytes, fmt_seconds, logit_diff, machine, print_table  # noqa: E402

import gradgraph as gg  # noqa: E402

TARGET_WRITE_S = 30.0
TARGET_LOAD_S = 5.0


def cpu_seconds():
    """CPU time of this process and its finished children (Graphviz runs as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def page_load_seconds(path, loads):
    """Seconds from navigation start to the load event, and to the last figure drawn (the page
    draws its figures after the load event), over ``loads`` fresh loads: (median load, median
    drawn, loads, drawn, console errors)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1800"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        from selenium.webdriver.support.ui import WebDriverWait
        times, drawn, errors = [], [], []
        for _ in range(loads):
            drv.get("about:blank")
            drv.get("file://" + os.path.abspath(path))     # returns after the load event
            ms = drv.execute_script(
                "var t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;")
            times.append(ms / 1e3)
            # performance.now() counts from navigation start
            done = WebDriverWait(drv, 600, poll_frequency=0.05).until(
                lambda d: d.execute_script("return window.gradgraphReport.drawn;"))
            drawn.append(done / 1e3)
            errors += [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
        return statistics.median(times), statistics.median(drawn), times, drawn, errors
    finally:
        drv.quit()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--out", default=None, help="keep the report here (default: a temporary folder)")
    ap.add_argument("--graph", default=None,
                    help="report this saved graph (gg.load) instead of capturing the model, e.g. to "
                         "compare two versions of the library on one graph; saved there if missing")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(machine())
    print("load average (1, 5, 15 min) at the start: %.1f %.1f %.1f" % os.getloadavg())
    t0 = time.perf_counter()
    if a.graph and os.path.exists(a.graph):
        g = gg.load(a.graph)
        t_capture = None
        print(f"loaded {a.graph} (the --layers/--hidden/--tokens options do not apply): {g}")
    else:
        model = bert_mlm(num_hidden_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                         intermediate_size=4 * a.hidden)
        g = gg.capture(model, (), bert_inputs(a.tokens), output=logit_diff)
        t_capture = time.perf_counter() - t0
        print(f"captured in {fmt_seconds(t_capture)}: {g}")
        if a.graph:
            g.save(a.graph)

    folder = a.out or tempfile.mkdtemp(prefix="gradgraph-report-")
    out = os.path.join(folder, "report.html")
    sections = {}
    t0, c0 = time.perf_counter(), cpu_seconds()
    gg.report(g, out, k=a.k, overwrite=True, timings=sections)
    t_write, c_write = time.perf_counter() - t0, cpu_seconds() - c0
    size = os.path.getsize(out)
    print(f"report sections (CPU / wall), {os.getloadavg()[0]:.1f} load average at the end:")
    print_table([(name, fmt_seconds(c), fmt_seconds(w)) for name, (c, w) in sections.items()],
                headers=("section", "CPU", "wall"))
    print()
    rows = [("graph", (f"{a.graph}" if t_capture is None else f"{a.layers} layers, hidden {a.hidden}, "
                       f"{a.tokens} tokens") + f": {len(g.nodes)} tensors, {sum(n.numel for n in g.nodes):,} scalars"),
            ("capture (with torch.export)", "-- (loaded)" if t_capture is None else fmt_seconds(t_capture)),
            ("report written, wall time", f"{fmt_seconds(t_write)} (target < {TARGET_WRITE_S:.0f} s: "
                                          f"{'met' if t_write < TARGET_WRITE_S else 'NOT met'})"),
            ("report written, CPU time (process + Graphviz)", f"{fmt_seconds(c_write)} (equals the wall time "
             f"on an idle machine with --threads 1)"),
            ("report file size", f"{fmt_bytes(size)} ({size:,} bytes)")]
    if shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser")):
        med, med_drawn, times, drawn, errors = page_load_seconds(out, a.loads)
        rows.append(("page load (navigation start -> load event)",
                     f"{fmt_seconds(med)} median of {', '.join(fmt_seconds(t) for t in times)} "
                     f"(target < {TARGET_LOAD_S:.0f} s: {'met' if med < TARGET_LOAD_S else 'NOT met'})"))
        rows.append(("every figure drawn (navigation start -> last figure)",
                     f"{fmt_seconds(med_drawn)} median of {', '.join(fmt_seconds(t) for t in drawn)}"))
        rows.append(("browser console errors", str(len(errors))))
    else:
        rows.append(("page load", "not measured: chromium / chromedriver not found"))
    print_table(rows)
    print("load average (1, 5, 15 min) at the end: %.1f %.1f %.1f" % os.getloadavg())
    print(f"report: {out}")


if __name__ == "__main__":
    main()
