"""Smoke test of benchmarks/scale.py on a tiny GPT-2 (seconds): the script runs end to end, prints
a ratio for every query and writes its sweep plot and figures. It asserts nothing about speed
(performance claims live in docs/benchmarks.md)."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "scale.py")
ROWS = ("capture of a new input", "gradient", "top path", "entropy", "10 best paths", "flow")


def run(*args):
    out = subprocess.run([sys.executable, SCRIPT, "--model", "tiny", "--threads", "1", "--repeats", "1", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_queries_table_has_a_ratio_per_query():
    table = run("--tokens", "8").split("## ", 1)[1]
    for row in ROWS:
        m = re.search(rf"^{re.escape(row)}\s+\S+ m?s\s+\S+ m?s \((?:fwd \+ bwd|bwd)\)\s+([0-9.]+)x", table, re.M)
        assert m, f"no ratio for {row!r} in\n{table}"
        assert float(m.group(1)) > 0


def test_sweep_writes_plot_and_figures(tmp_path):
    plot = tmp_path / "scaling.png"
    run("--sweep", "--sweep-token-counts", "8", "--sweep-layer-counts", "1", "--sweep-tokens", "8",
        "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((tmp_path / "scaling.json").read_text())["points"]
    assert [(p["tokens"], p["layers"]) for p in points] == [(8, None), (8, 1)]
    for p in points:
        assert "error" not in p, p
        for key in ("torch backward", "torch forward + backward", "capture", "gradient", "top path", "entropy"):
            assert p[key] > 0
        assert p["torch peak"] > 0 and p["gradgraph peak"] > 0


def test_max_pass_profile_runs():
    """benchmarks/max_pass.py on the tiny GPT-2: a table of the pass's products per kind."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "max_pass.py"), "--model", "tiny",
                          "--tokens", "8", "--threads", "1"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr
    assert re.search(r"max pass [0-9.]+ s .*kept values [0-9]+ MB \['float32'\]", out.stdout), out.stdout
    assert "MatmulJacobian" in out.stdout
