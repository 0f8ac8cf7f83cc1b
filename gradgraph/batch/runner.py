"""``run``: capture and query many inputs on local processes or a Dask cluster, resumably.

The client (the process calling :func:`run`) hands items out and is the only writer of the
results folder: a worker computes one item's rows (and graph file) and returns them, so a worker
that dies, or a task Dask runs twice, can never leave a half-written or duplicated result, and a
cluster needs no shared filesystem.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import uuid
import warnings
import weakref
from dataclasses import dataclass, field

from ..errors import BatchError
from . import store
from .queries import answer, normalize_queries

__all__ = ["run", "BatchSummary", "ENGINES"]

ENGINES = ("local", "dask")


@dataclass
class BatchSummary:
    """What one :func:`run` call did; ``table()`` reads the whole results folder."""

    out: str
    items: int                      # items given
    computed: int                   # items computed in this call
    failed: int                     # of those, items with a failed query
    skipped: int                    # items already done
    seconds: float
    notes: list = field(default_factory=list)

    def table(self):
        """Every item's rows: ``pandas.read_parquet(out)``."""
        import pandas as pd
        return pd.read_parquet(self.out)


# ============================================================================ items and build
def _items(items):
    """``[(id as str, value)]`` from dicts with an "id" key or (id, value) pairs; ids unique."""
    out, seen = [], set()
    for it in items:
        if isinstance(it, dict):
            if "id" not in it:
                raise BatchError(f"an item dict has no 'id' key: {sorted(it)[:5]}; give every item a stable id")
            key, value = it["id"], it
        elif isinstance(it, (tuple, list)) and len(it) == 2:
            key, value = it
        else:
            raise BatchError(f"an item must be a dict with an 'id' key or an (id, value) pair, got "
                             f"{type(it).__name__}")
        key = str(key)
        if key in seen:
            raise BatchError(f"item id {key!r} occurs twice; ids must be unique (they name the results)")
        seen.add(key)
        out.append((key, value))
    return out


def _is_builder_object(build):
    return hasattr(build, "setup") and hasattr(build, "inputs")


def _check_build(build):
    if isinstance(build, type):
        raise BatchError(f"build is the class {build.__name__}; pass an instance ({build.__name__}())")
    if not _is_builder_object(build) and not callable(build):
        raise BatchError("build must be a function item -> (model, args, kwargs, output_fn), or an object "
                         "with setup() -> model and inputs(item) -> (args, kwargs, output_fn)")


# ============================================================================ worker side
class _Worker:
    """Per-process state: the build (its model set up once), one Capturer per (model, output)."""

    def __init__(self, payload, job):
        import cloudpickle
        if job.get("threads"):
            _limit_threads(job["threads"])
        self.build = cloudpickle.loads(payload)
        self.job = job
        self.model = None
        self.capturers = weakref.WeakKeyDictionary()    # model -> {output key: Capturer}
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        # a build object's model is set up once and owned here: its graphs share weight transforms
        # (WEIGHT_CACHE); a build function may hand back a model it changes between items
        self.cache_owner = uuid.uuid4().hex if _is_builder_object(self.build) else None

    def _inputs(self, value):
        if _is_builder_object(self.build):
            if self.model is None:
                self.model = self.build.setup()
            args, kwargs, output = self.build.inputs(value)
            model = self.model
        else:
            built = self.build(value)
            if not isinstance(built, (tuple, list)) or len(built) != 4:
                raise BatchError("build(item) must return (model, args, kwargs, output_fn)")
            model, args, kwargs, output = built
        if not isinstance(args, (tuple, list)):
            args = (args,)
        return model, tuple(args), dict(kwargs or {}), output

    def _capturer(self, model, output, args, kwargs):
        import torch

        from ..capture.programs import _callable_key
        from ..capture.tracer import Capturer
        per_model = self.capturers.setdefault(model, {})
        key = _callable_key(output)
        cap = per_model.get(key)
        if cap is None:
            dynamic = self.job["dynamic"]
            if dynamic == "auto":    # token ids and masks: integer inputs (batch, sequence, ...)
                def seq(v):
                    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dim() >= 2
                dynamic = {i: [1] for i, a in enumerate(args) if seq(a)}
                dynamic.update({k: [1] for k, v in kwargs.items() if seq(v)})
            cap = per_model[key] = Capturer(model, output, sources=self.job["sources"],
                                            granularity=self.job["granularity"], progress=False,
                                            dynamic=dynamic or None)
        cap.output = output       # same code and values; keep the newest object
        return cap

    def compute(self, item_id, value):
        """``(item_id, rows, {relative path: bytes})``; never raises for a failing item."""
        from ..jacobians import WEIGHT_CACHE
        with WEIGHT_CACHE.active(self.cache_owner) if self.cache_owner else contextlib.nullcontext():
            return self._compute(item_id, value)

    def _compute(self, item_id, value):
        stem = store.item_stem(item_id)
        base = {"item": item_id, "worker": self.where}
        queries = self.job["queries"]

        def failed(exc, spec, **extra):
            return dict(base, query=spec["name"], kind=spec["query"], status="failed",
                        error_type=type(exc).__name__, error=" ".join(str(exc).split()) or type(exc).__name__,
                        value=math.nan, **extra)

        t0, c0 = time.perf_counter(), time.process_time()
        try:
            model, args, kwargs, output = self._inputs(value)
            cap = self._capturer(model, output, args, kwargs)
            n0 = cap.n_exports
            g = cap.capture(args, kwargs)
        except Exception as exc:      # recorded, never stops the run
            return item_id, [failed(exc, q) for q in queries], {}
        base.update(sink_value=g.sink_value, n_scalars=int(sum(n.numel for n in g.nodes)),
                    capture_seconds=time.perf_counter() - t0, exported=cap.n_exports > n0,
                    notes="; ".join(cap.notes) or None)
        rows, files = [], {}
        for spec in queries:
            t1 = time.perf_counter()
            try:
                rel = f"{store.GRAPHS}/{stem}.safetensors"
                v, res = answer(g, spec, artefact_dir=store.GRAPHS, item_file=rel)
                if spec["query"] == "save":
                    with tempfile.TemporaryDirectory() as d:
                        g.save(os.path.join(d, "g.safetensors"))
                        with open(os.path.join(d, "g.safetensors"), "rb") as f:
                            files[rel] = f.read()
                rows.append(dict(base, query=spec["name"], kind=spec["query"], status="ok", value=v,
                                 result=json.dumps(res), seconds=time.perf_counter() - t1))
            except Exception as exc:
                rows.append(failed(exc, spec, seconds=time.perf_counter() - t1))
        for r in rows:
            r["cpu_seconds"] = time.process_time() - c0
        return item_id, rows, files


def _limit_threads(n):
    """Every thread pool of this worker process (torch's, numba's, the BLAS numpy calls) to ``n``
    threads: a worker owns cores / workers cores, and a pool wider than that competes with the
    other workers (measured on a loaded 2-core machine: an entropy pass of the benchmark BERT, small
    GEMMs, took 1.6 s of CPU with OpenBLAS's default 2 threads spinning, 0.12 s with 1)."""
    from ..threads import set_num_threads
    set_num_threads(n)


_WORKERS = {}     # token -> _Worker, one per process and run configuration


def _worker(token, payload, job):
    w = _WORKERS.get(token)
    if w is None:
        w = _WORKERS[token] = _Worker(payload, job)
    return w


def _init_local(token, payload, job):
    _worker(token, payload, job)


def _local_task(token, item_id, value):
    return _WORKERS[token].compute(item_id, value)


def _dask_task(token, payload, job, item_id, value):
    return _worker(token, payload, job).compute(item_id, value)


# ============================================================================ engines
def _run_local(todo, token, payload, job, workers):
    if not todo:
        return
    if workers == 0:          # in this process: a plain loop (debugging, profiling)
        w = _Worker(payload, job)
        for item_id, value in todo:
            yield w.compute(item_id, value)
        return
    job = dict(job, threads=job["threads"] or max(1, (os.cpu_count() or 1) // workers))
    ctx = multiprocessing.get_context("spawn")    # fork would copy torch's thread pools
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_local,
                                initargs=(token, payload, job)) as ex:
        futures = {ex.submit(_local_task, token, i, v): i for i, v in todo}
        for f in cf.as_completed(futures):
            try:
                yield f.result()
            except Exception as exc:     # the worker process died: record, redo on the next run
                yield _lost(futures[f], job, exc)


def _run_dask(todo, token, payload, job, workers, scheduler, notes):
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise BatchError("engine='dask' needs dask.distributed: pip install 'gradgraph[distributed]'") from None
    cluster = None
    try:
        if scheduler:
            client = Client(scheduler, timeout="30s")
        else:
            cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                                   processes=True, dashboard_address=None)
            client = Client(cluster)
    except Exception as exc:
        if cluster is not None:
            cluster.close()
        raise BatchError(f"cannot connect to the Dask scheduler {scheduler or '(local cluster)'}: "
                         f"{type(exc).__name__}: {exc}") from None
    try:
        if client.dashboard_link:
            notes.append(f"Dask dashboard: {client.dashboard_link}")
        shared = client.scatter(payload, broadcast=True)
        futures = {client.submit(_dask_task, token, shared, job, i, v, pure=False,
                                 key=f"gradgraph-{token[:10]}-{store.item_stem(i)}"): i for i, v in todo}
        for f in as_completed(futures):
            try:
                yield f.result()
            except Exception as exc:     # e.g. KilledWorker: the task's workers died too often
                yield _lost(futures[f], job, exc)
            f.release()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _lost(item_id, job, exc):
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return item_id, [{"item": item_id, "query": q["name"], "kind": q["query"], "status": "failed",
                      "error_type": type(exc).__name__, "error": f"worker lost: {msg}", "value": math.nan}
                     for q in job["queries"]], {}


# ============================================================================ run
def run(items, build, queries, out, *, engine="local", workers=None, scheduler=None, resume=True,
        force=False, sources=None, granularity="function", dynamic="auto", progress=None, threads=None):
    """Capture and query every item; results in a resumable folder of Parquet files.

    Parameters
    ----------
    items : iterable
        Dicts with an ``"id"`` key (the dict is the item), or ``(id, value)`` pairs. Ids are
        stored as text and must be unique.
    build : callable or object
        ``build(item) -> (model, args, kwargs, output_fn)``; or an object with ``setup() -> model``
        (called once per worker process) and ``inputs(item) -> (args, kwargs, output_fn)``. It is
        sent to the workers with cloudpickle. The exported program is reused for every item with
        the same model and ``output_fn`` (same code and captured values, see ``docs/capture.md``):
        an ``output_fn`` closing over per-item values exports once per distinct value.
    queries : list[dict]
        Query specs (:mod:`gradgraph.batch.queries`), e.g. ``[{"query": "top_paths", "k": 5},
        {"query": "entropy"}]``.
    out : str
        Results folder (created). ``pandas.read_parquet(out)`` reads the table.
    engine : {"local", "dask"}
        ``"local"``: a pool of ``workers`` processes (default: one per CPU; ``0`` runs in this
        process). ``"dask"``: ``dask.distributed`` on ``scheduler`` (``"tcp://host:port"``) or, by
        default, on a ``LocalCluster`` of ``workers`` processes started and stopped here.
    resume : bool
        Skip items whose result is complete (every query ok); ``False`` recomputes every item.
    force : bool
        Accept a folder written with other queries or capture options: every item is then
        recomputed with these, and the folder's configuration replaced.
    sources, granularity :
        As for :func:`gradgraph.capture`.
    dynamic : "auto", dict or None
        Dimensions whose size varies between items, exported once symbolically (see
        :class:`~gradgraph.Capturer`). ``"auto"``: dimension 1 (the sequence) of every integer
        input of rank >= 2 (token ids, attention masks); where the model fixes that size, one
        export per size (the ``notes`` column says so). Name float inputs explicitly, e.g.
        ``{"inputs_embeds": [1]}``.
    progress : bool, optional
        tqdm progress bar (items/s, ETA); default when stderr is a terminal.
    threads : int, optional
        Threads of each worker's pools (torch, numba, BLAS). Default: for the local engine, the CPUs
        divided among the workers; Dask workers keep the threads their cluster gives them.

    Returns
    -------
    BatchSummary

    Raises
    ------
    BatchError
        Bad items, build or queries, an unknown engine, or a folder written with other queries
        (without ``force``).
    """
    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise BatchError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise BatchError(f"workers must be a non-negative integer, got {workers!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise BatchError(f"threads must be a positive integer, got {threads!r}")
    if scheduler and engine != "dask":
        raise BatchError("scheduler= is for engine='dask'")
    queries = normalize_queries(queries)
    items = _items(items)
    _check_build(build)
    try:
        import cloudpickle
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise BatchError(f"gradgraph.batch needs pyarrow and cloudpickle ({exc}): "
                         f"pip install 'gradgraph[distributed]'") from None
    import torch

    from .._version import __version__
    capture_opts = {"sources": sources, "granularity": granularity,
                    "dynamic": dynamic if dynamic in (None, "auto") else {str(k): list(v) if not isinstance(v, int)
                                                                          else [v] for k, v in dynamic.items()}}
    os.makedirs(os.path.join(out, store.RESULTS), exist_ok=True)
    os.makedirs(os.path.join(out, store.GRAPHS), exist_ok=True)
    store.remove_temporaries(out)       # left by a run that was killed while writing
    old = store.read_config(out)
    if old is None and any(f.endswith(".parquet") for f in os.listdir(os.path.join(out, store.RESULTS))):
        raise BatchError(f"{out} holds results but no {store.CONFIG}; choose another out")
    changed = old is not None and (old.get("queries") != queries or old.get("capture") != capture_opts)
    if changed and not force:
        what = "queries" if old.get("queries") != queries else "capture options"
        raise BatchError(f"{out} was written with different {what}; pass force=True (--force) to recompute "
                         f"every item with these, or choose another out")
    notes = []
    if old is not None and (old.get("gradgraph"), old.get("torch")) != (__version__, torch.__version__):
        notes.append(f"{out} was written by gradgraph {old.get('gradgraph')} / torch {old.get('torch')}; "
                     f"this run uses {__version__} / {torch.__version__}")
        warnings.warn(notes[-1])
    ids = [i for i, _ in items]
    known = [] if (old is None or changed) else [i for i in old.get("items", []) if i not in set(ids)]
    config = {"format": store.FORMAT, "queries": queries, "capture": capture_opts, "gradgraph": __version__,
              "torch": torch.__version__, "items": known + ids}
    store.write_config(out, config)

    redo = changed or not resume
    todo = [(i, v) for i, v in items if redo or store.item_status(out, i) != "ok"]
    skipped = len(items) - len(todo)
    payload = cloudpickle.dumps(build)
    job = {"queries": queries, **capture_opts, "dynamic": dynamic, "threads": threads}
    token = hashlib.sha1(payload + json.dumps(queries).encode() + repr(capture_opts).encode()).hexdigest()
    if not todo:
        results = iter(())
    elif engine == "local":
        n = min(workers if workers is not None else (os.cpu_count() or 1), len(todo))
        results = _run_local(todo, token, payload, job, n)
    else:
        results = _run_dask(todo, token, payload, job, workers, scheduler, notes)

    show = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if show and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), unit="item", desc=f"gradgraph batch ({engine})")
    computed = failed = 0
    seen_notes = set()
    try:
        for item_id, rows, files in results:
            for rel, data in files.items():
                store.write_atomic(os.path.join(out, rel), data)
            store.write_rows(out, item_id, rows)
            computed += 1
            failed += any(r["status"] != "ok" for r in rows)
            for r in rows:
                if r.get("notes") and r["notes"] not in seen_notes:
                    seen_notes.add(r["notes"])
                    notes.append(r["notes"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=failed)
    finally:
        if bar is not None:
            bar.close()
    return BatchSummary(out=out, items=len(items), computed=computed, failed=failed, skipped=skipped,
                        seconds=time.perf_counter() - t0, notes=notes)
