"""numba's CPU target (gradgraph/_cpu.py): full-width vectors on AVX-512 hosts, the user's choice
kept. Each case runs in a fresh interpreter, since the target is fixed once numba builds it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import llvmlite.binding as llvm
import pytest

AVX512 = bool(llvm.get_host_cpu_features().get("avx512f"))

PROBE = """
import json, sys
if sys.argv[1] == "numba-first":
    from numba import njit
    njit(lambda x: x + 1)(1)             # numba's CPU target built before gradgraph's import
import gradgraph, gradgraph._cpu as cpu
from numba.core import config
from gradgraph.jacobians.matmul import mm_maxmin_dot
import numpy as np
a = np.ones((1, 2, 16), np.float32)
y, z = np.full((1, 2, 3), -np.inf, np.float32), np.full((1, 2, 3), np.inf, np.float32)
mm_maxmin_dot(a, -a, np.full((1, 3, 16), 2, np.float32), y, z, 1)
print(json.dumps({"wide": cpu.WIDE_VECTORS, "features": config.CPU_FEATURES,
                  "max": y.tolist(), "min": z.tolist()}))
"""


def probe(mode="plain", **env):
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME",
                                                                                   "GRADGRAPH_VECTOR_WIDTH")}, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # the kernel computes the same in every setting: max / min of 16 products 2 x (+-1) per output
    assert out["max"] == [[[2.0] * 3] * 2] and out["min"] == [[[-2.0] * 3] * 2]
    return out


def test_full_width_vectors_exactly_on_avx512_hosts():
    out = probe()
    assert out["wide"] is AVX512
    if AVX512:
        assert out["features"].endswith(",-prefer-256-bit") and "+avx512f" in out["features"]
    else:
        assert out["features"] is None


def test_the_users_choice_is_kept():
    out = probe(GRADGRAPH_VECTOR_WIDTH="256")
    assert out["wide"] is False and out["features"] is None
    mine = "+64bit,+sse2"
    out = probe(NUMBA_CPU_FEATURES=mine)
    assert out["wide"] is False and out["features"] == mine


def test_a_target_numba_built_before_the_import_is_left_as_it_is():
    out = probe("numba-first")
    assert out["wide"] is False and out["features"] is None
