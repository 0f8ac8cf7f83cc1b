"""Smoke test of benchmarks/cores.py on a tiny GPT-2 (seconds): the script runs end to end and
prints, for every query, the wall and CPU time of each part. It asserts nothing about speed
(performance claims live in docs/benchmarks.md)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "cores.py")
QUERIES = ("gradient", "top path", "entropy", "10 best paths", "flow")


def test_every_query_has_its_parts_timed():
    out = subprocess.run([sys.executable, SCRIPT, "--model", "tiny", "--tokens", "8", "--repeats", "1",
                          "--threads", "1"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr
    sections = out.stdout.split("\n### ")[1:]
    assert [s.split(":", 1)[0] for s in sections] == list(QUERIES)
    for s in sections:
        assert re.search(r"^product \S+ / \w+Jacobian", s, re.M), s
        assert re.search(r"^add \(\+\) into a node\s+\d+", s, re.M) or "normalize" in s, s
        rest = re.search(r"^\(rest of the query\)\s+1\s+(-?[0-9.]+)\s+(-?[0-9.]+)", s, re.M)
        assert rest, s
