"""Dataset-scale studies: capture and query many inputs on local processes or Dask, resumably,
into a Parquet table (see ``docs/batch.md``).

>>> import gradgraph as gg
>>> summary = gg.batch.run(items, build, [{"query": "top_paths", "k": 3}, {"query": "entropy"}], "out/study")
>>> table = summary.table()          # == pandas.read_parquet("out/study")
"""
from .queries import QUERIES, load_queries, normalize_queries
from .runner import ENGINES, BatchSummary, run
from .store import COLUMNS, status

__all__ = ["run", "status", "load_queries", "normalize_queries", "BatchSummary", "QUERIES", "COLUMNS", "ENGINES"]
