"""One thread policy for every pool a query uses.

A query runs code from three thread pools: torch's (OpenMP: its element-wise ops and the
contractions), numpy's BLAS (OpenBLAS, its own pthreads) and numba's (the kernels' ``prange``
loops). Each pool's idle threads spin for a while after a parallel call before they sleep --
OpenBLAS's for about 30 ms, OpenMP's for several ms -- so two pools used one after the other
fight over the same cores, and every pool's barriers stall as soon as one of its threads is
descheduled (another process on a 2-core machine is enough to make a two-thread product
ten times slower than one thread). The policy:

* one number of threads, :func:`set_num_threads` / :func:`get_num_threads`, which is torch's
  (the default follows ``torch.get_num_threads()``); setting it sets torch's, numba's and
  numpy's BLAS limit at once;
* while a query runs (:func:`query_threads`): numpy's BLAS is held to one thread, so its
  spinning pool never starts; the contractions go through torch's BLAS when more than one
  thread is used (the one spinning pool); numba uses the same number of threads;
* numba's parallel regions run on torch's own OpenMP pool where they can (:data:`LAYER`): torch
  ships GNU OpenMP on Linux and loads it into the process's global symbol scope, and numba's
  ``omp`` layer, built against GNU OpenMP, binds its calls there (it maps the system's copy of the
  library beside it; of that copy only ``omp_get_supported_active_levels``, a constant torch's
  older copy lacks, is bound) -- one set of worker
  threads for torch's operations and the kernels, and a region starts in 1-3 us. Where torch's
  runtime is another (Intel's or LLVM's OpenMP, which GNU's must not be mixed with, or none),
  numba's ``workqueue`` layer runs them instead: its idle threads sleep, but waking them costs
  0.1-0.6 ms per region on a virtual machine. A child forked after the OpenMP pool has run must
  stay at one thread (torch's own operations hang there otherwise, with either layer):
  gradgraph's worker processes are spawned;
* every kernel is compiled twice (:func:`kernel`): the serial compilation runs at one thread and
  for calls whose work is below :data:`PARALLEL_MIN_WORK` (``parallel(work=...)``), what a
  region's start costs on the layer in use;
* a query uses no more threads than there are cores not busy with other processes at its start
  (``/proc/loadavg``'s runnable count minus this process's own, as OpenMP's dynamic adjustment
  does with the load average): on a busy machine it runs on one thread rather than stalling at
  barriers (:func:`set_dynamic` switches this off).

:func:`parallel` serialises the kernels' parallel calls across Python threads (the ``workqueue``
layer runs one region at a time per process).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import types

import numba
import torch

from .errors import GradGraphError

__all__ = ["LAYER", "PARALLEL_MIN_WORK", "set_num_threads", "get_num_threads", "set_dynamic", "free_threads", "query_threads", "parallel",
           "kernel"]



def _torch_openmp_is_numbas():
    """Whether numba's ``omp`` layer would run on the OpenMP runtime torch loaded: torch has
    mapped GNU OpenMP (``libgomp``) into the process and numba's layer, built against GNU
    OpenMP, loads (its calls then bind to torch's copy, loaded into the global scope first)."""
    try:
        with open("/proc/self/maps") as f:
            if not any("libgomp" in line for line in f):
                return False
        from numba.np.ufunc import omppool
    except (OSError, ImportError):
        return False
    return getattr(omppool, "openmp_vendor", "") == "GNU"


#: numba's threading layer for the kernels: set before numba starts its pool (the first parallel
#: call); a choice made in the environment (``NUMBA_THREADING_LAYER``) is kept.
LAYER = os.environ.get("NUMBA_THREADING_LAYER", "").lower() or \
    ("omp" if _torch_openmp_is_numbas() else "workqueue")
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = LAYER

_NUMBA_MAX = numba.config.NUMBA_NUM_THREADS     # numba's pool size, fixed when it starts
_kernel_lock = threading.RLock()
_local = threading.local()
_controller = None
_dynamic = True


def _blas():
    """threadpoolctl's controller of the thread-pool libraries loaded in this process: made again
    when modules were imported since (one may have loaded another BLAS, e.g. scipy's)."""
    global _controller
    if _controller is None or _controller[0] != len(sys.modules):
        from threadpoolctl import ThreadpoolController
        _controller = (len(sys.modules), ThreadpoolController())
    return _controller[1]


def set_num_threads(n):
    """Use ``n`` threads in every pool: torch's, numba's and numpy's BLAS.

    Parameters
    ----------
    n : int
        At least 1. numba's share is capped at its pool size (``NUMBA_NUM_THREADS``, by default
        the number of cores).

    Examples
    --------
    >>> import gradgraph as gg
    >>> gg.set_num_threads(1)
    >>> gg.get_num_threads()
    1
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GradGraphError(f"the number of threads must be an integer >= 1, got {n!r}")
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, _NUMBA_MAX))
    _blas().limit(limits=n, user_api="blas")


def get_num_threads():
    """The number of threads a query may use: torch's (``torch.get_num_threads()``), which
    :func:`set_num_threads` sets."""
    return torch.get_num_threads()


def set_dynamic(on):
    """Whether a query takes fewer threads when other processes hold the cores (default True,
    like OpenMP's ``omp_set_dynamic``). Off, every query uses :func:`get_num_threads` threads
    (e.g. to test or time the parallel kernels on a busy machine). Returns the previous setting."""
    global _dynamic
    previous, _dynamic = _dynamic, bool(on)
    return previous


def _busy_elsewhere():
    """Threads of other processes running or waiting for a core right now (Linux; 0 elsewhere)."""
    try:
        # this process's running threads counted before and after the machine's count: a pool's
        # thread still spinning after its last parallel region (torch's OpenMP workers spin for
        # a few ms) may go to sleep between two reads, and must not count as another process's
        # -- on two cores that one thread would halve the query's threads
        own = _running_here()
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        own = max(own, _running_here())
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, runnable - max(own, 1))


def _running_here():
    """Threads of this process running or waiting for a core (state R)."""
    own = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                own += f.read().rpartition(")")[2].split()[0] == "R"
        except OSError:      # the thread ended meanwhile
            pass
    return own


def free_threads(n):
    """How many of ``n`` threads a query starting now gets: at most the cores of this process's
    CPU set that no other process is using, and at least one."""
    if n <= 1 or not _dynamic:
        return max(1, n)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(n, cores - _busy_elsewhere()))


@contextlib.contextmanager
def _query():
    if getattr(_local, "depth", 0):
        _local.depth += 1
        try:
            yield
        finally:
            _local.depth -= 1
        return
    n = get_num_threads()
    k = free_threads(n)
    limiter = _blas().limit(limits=1, user_api="blas")
    if k != n:
        torch.set_num_threads(k)
    _local.depth = 1
    try:
        yield
    finally:
        _local.depth = 0
        if k != n:
            torch.set_num_threads(n)
        limiter.restore_original_limits()


def query_threads(fn):
    """Decorator: ``fn`` (a query pass) runs under the policy of the module docstring; nested
    calls inherit the outermost one's setting."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _query():
            return fn(*args, **kwargs)
    return wrapper


#: Work (about one scalar operation a unit) below which a kernel call runs on one thread: what a
#: serial kernel does in the time a parallel region takes to start -- 1-3 us on the ``omp`` layer,
#: 0.1-0.6 ms on the ``workqueue`` layer (``benchmarks/kernel_launch.py``).
PARALLEL_MIN_WORK = 1 << 15 if LAYER == "omp" else 1 << 18


@contextlib.contextmanager
def parallel(work=None):
    """Around a call of a :func:`kernel`: one such call at a time per process (the ``workqueue``
    layer's rule), with as many numba threads as torch currently uses (the number is the
    context's value, for kernels that split their work into blocks themselves), or one when the
    caller's estimate of the call's ``work`` is below :data:`PARALLEL_MIN_WORK`. numba's count is
    put back on exit, so a call nested in another's block leaves that block's count as it was."""
    with _kernel_lock:
        n = min(get_num_threads(), _NUMBA_MAX)
        if work is not None and work < PARALLEL_MIN_WORK:
            n = 1
        before = numba.get_num_threads()
        numba.set_num_threads(n)
        try:
            yield n
        finally:
            numba.set_num_threads(before)


def kernel(**options):
    """Decorator for the query kernels: ``numba.njit(parallel=True, **options)``, and the same
    function compiled without ``parallel``, which a call takes when numba's thread count is 1
    (one-thread queries; :func:`parallel` sets the count for every kernel call).

    A parallel region costs 1-3 us to start on the ``omp`` layer, 0.1-0.6 ms on the
    ``workqueue`` layer, whose sleeping workers are woken for every call, even at one thread (see
    :data:`LAYER`); the same empty loop takes under a microsecond serially and a small kernel (a
    layer norm's rows at 32 tokens) about 10 us. A query makes hundreds of calls. The serial twin
    has its own name (``<name>_serial``), so numba's cache keeps the two apart. The two loop over
    the same iterations, so each computes every output the same way: the results are the same
    bits."""
    def wrap(fn):
        par = numba.njit(parallel=True, **options)(fn)
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        twin.__module__ = fn.__module__
        twin.__doc__ = fn.__doc__
        ser = numba.njit(parallel=False, **options)(twin)

        @functools.wraps(fn)
        def call(*args):
            return (ser if numba.get_num_threads() == 1 else par)(*args)
        call.parallel, call.serial = par, ser
        return call
    return wrap
