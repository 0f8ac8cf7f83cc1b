"""The results folder of a batch run.

::

    out/
      _run.json                  the run's configuration: queries, gradgraph and torch versions
      results/item-<id>-<hash>.parquet   one file per item: one row per query
      _graphs/item-<id>-<hash>.safetensors   graph files of the ``save`` query

``pandas.read_parquet(out)`` reads every item's rows (pyarrow skips names starting with ``_`` or
``.``, such as the configuration and temporary files). Every file is written to a temporary name
in the same folder and renamed into place, so a crash never leaves half a result.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

from ..errors import BatchError

__all__ = ["COLUMNS", "CONFIG", "item_stem", "write_atomic", "write_rows", "read_config", "write_config",
           "item_status", "status"]

CONFIG = "_run.json"
RESULTS = "results"
GRAPHS = "_graphs"
FORMAT = 1

#: column -> pyarrow type name, in table order
COLUMNS = {
    "item": "string",            # the item's id (as text)
    "query": "string",           # the query's name
    "kind": "string",            # top_paths, entropy, ...
    "status": "string",          # "ok" or "failed"
    "error_type": "string",      # exception class of a failure (None when ok)
    "error": "string",           # its message
    "value": "float64",          # the query's headline number (NaN where it has none)
    "result": "string",          # the full answer as JSON
    "sink_value": "float64",     # the explained scalar's value
    "n_scalars": "int64",        # scalar nodes of the captured graph
    "capture_seconds": "float64",
    "seconds": "float64",        # time of this query
    "cpu_seconds": "float64",    # CPU time of the whole item in its worker (all threads)
    "exported": "bool_",         # this item's capture ran torch.export (depends on scheduling)
    "notes": "string",           # e.g. why the program could not serve every sentence length
    "worker": "string",          # host:pid that computed the row
}


def _schema():
    import pyarrow as pa
    return pa.schema([(name, getattr(pa, typ)()) for name, typ in COLUMNS.items()])


def item_stem(item_id):
    """A file name for an item id: readable, safe on every filesystem, unique (hash of the id)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", item_id)[:48]
    return f"item-{safe}-{hashlib.sha1(item_id.encode()).hexdigest()[:12]}"


def write_atomic(path, data):
    """Write bytes to ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_temporaries(out):
    """Delete temporary files a killed run left behind (never a complete result)."""
    for folder in (out, os.path.join(out, RESULTS), os.path.join(out, GRAPHS)):
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(folder, name))


def write_rows(out, item_id, rows):
    """One item's rows as ``out/results/<stem>.parquet`` (replacing an earlier result of it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=_schema())
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(os.path.join(out, RESULTS, item_stem(item_id) + ".parquet"), sink.getvalue().to_pybytes())


def read_config(out):
    path = os.path.join(out, CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BatchError(f"{path} is not a readable batch configuration ({exc}); move the folder aside "
                         f"or pass another out") from None


def write_config(out, config):
    write_atomic(os.path.join(out, CONFIG), json.dumps(config, indent=2).encode())


def item_status(out, item_id):
    """"ok" (every row ok), "failed" (a row failed) or "missing" for one item."""
    import pyarrow.parquet as pq
    path = os.path.join(out, RESULTS, item_stem(item_id) + ".parquet")
    if not os.path.exists(path):
        return "missing"
    try:
        st = pq.read_table(path, columns=["status"]).column("status").to_pylist()
    except Exception:      # unreadable (it cannot be half-written; a disk error): redo it
        return "missing"
    return "ok" if st and all(s == "ok" for s in st) else "failed"


def status(out):
    """Counts of a results folder and its failures.

    Returns
    -------
    dict
        ``{"items": n, "done": n, "failed": n, "missing": n, "failures": [(item, error_type,
        error), ...]}``; ``items`` and ``missing`` count the item ids recorded in the configuration.
    """
    import pyarrow.dataset as ds
    config = read_config(out)
    if config is None:
        raise BatchError(f"{out} is not a batch results folder (no {CONFIG})")
    ids = config.get("items") or []
    done, failures = set(), {}
    folder = os.path.join(out, RESULTS)
    if os.path.isdir(folder) and any(f.endswith(".parquet") for f in os.listdir(folder)):
        t = ds.dataset(folder, format="parquet").to_table(columns=["item", "status", "error_type", "error"])
        bad = {}
        for item, st, et, err in zip(*(t.column(c).to_pylist() for c in ("item", "status", "error_type", "error"))):
            if st == "ok":
                done.add(item)
            else:
                bad.setdefault(item, (et, err))
        failures = bad
        done -= set(bad)
    missing = [i for i in ids if i not in done and i not in failures]
    return {"items": len(ids), "done": len(done), "failed": len(failures), "missing": len(missing),
            "failures": [(i, et, err) for i, (et, err) in sorted(failures.items())]}
