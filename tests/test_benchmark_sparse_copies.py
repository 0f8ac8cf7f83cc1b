"""Smoke test of benchmarks/sparse_copies.py on small index maps (seconds): the script runs end to
end, times both paths of every map, semiring and dtype, and reports that the strided copy and the
numba scatter give the same values (it compares them itself, bit for bit). Nothing about speed
is asserted (performance claims live in docs/benchmarks.md)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "sparse_copies.py")


def test_copy_and_scatter_are_timed_and_agree_for_every_map():
    out = subprocess.run([sys.executable, SCRIPT, "--threads", "1", "--tokens", "16", "--width", "64", "--heads", "4",
                          "--vocab", "300", "--budget", "0.01"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[-1:] in (["yes"], ["NO"])]
    # 4 index maps x 2 dtypes x 4 products
    assert len(rows) == 32, out.stdout
    assert all(r[-1] == "yes" for r in rows), out.stdout
    assert {r[-7] for r in rows} == {"real", "magnitude", "entropy", "max_signed"}
