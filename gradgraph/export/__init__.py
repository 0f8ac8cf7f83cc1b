"""Getting graphs out: the safetensors file format (and views for other tools)."""
from .dot import render, to_dot
from .fileformat import load, save
from .graphjson import to_json, write_json
from .nx import to_networkx
from .report import report

__all__ = ["save", "load", "to_dot", "render", "to_networkx", "to_json", "write_json", "report"]
