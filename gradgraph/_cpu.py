"""The CPU target of gradgraph's numba kernels: full-width vectors on CPUs with AVX-512.

LLVM tunes code for Intel CPUs with AVX-512 (Skylake-SP and later server parts) to prefer 256-bit
vectors (its ``prefer-256-bit`` tuning), a choice made for the first AVX-512 parts, whose clock
dropped under 512-bit instructions. numba compiles for the host with LLVM's tuning, so on those
CPUs the kernels use half the vector width the CPU has -- while torch's own kernels (oneDNN, MKL)
use all of it. The compute-bound kernels then run slower than they could: on an Intel Xeon (Emerald
Rapids) the signed (max, x) product of GPT-2's weights ran at 4.3-5.4 G pairs/s with 256-bit
vectors and 6.2-7.1 with 512 (``docs/benchmarks.md``, "A different CPU").

Imported by ``gradgraph/__init__`` before any kernel is defined, :func:`configure` asks numba to
compile for the host's own features without that preference, provided numba has not yet built its
CPU target (numba code compiled earlier in the process keeps it as it is) and the environment did
not choose: ``NUMBA_CPU_NAME`` or ``NUMBA_CPU_FEATURES`` set by the user are kept, and
``GRADGRAPH_VECTOR_WIDTH=256`` keeps LLVM's tuning. The setting is numba's, for the whole process.
Nothing changes on CPUs without AVX-512. Compiled kernels are cached per set of features, so the
cache of one setting does not serve the other.
"""
from __future__ import annotations

import os

__all__ = ["configure", "WIDE_VECTORS"]


def configure():
    """Let numba's kernels use 512-bit vectors on a CPU with AVX-512; True when it was set here."""
    if os.environ.get("GRADGRAPH_VECTOR_WIDTH") == "256":
        return False
    if "NUMBA_CPU_FEATURES" in os.environ or "NUMBA_CPU_NAME" in os.environ:
        return False
    from numba.core import config, registry
    if "_toplevel_target_context" in vars(registry.cpu_target):
        return False                      # numba's CPU target is built: too late to change it
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    if not features.get("avx512f"):
        return False
    config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"
    return True


#: Whether this process's numba kernels were set to full-width vectors by :func:`configure`.
WIDE_VECTORS = configure()
