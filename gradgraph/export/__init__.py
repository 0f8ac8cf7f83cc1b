"""Getting graphs out: the safetensors file format (and views for other tools)."""
from .dot import render, to_dot
from .fileformat import load, save
from .nx import to_networkx

__all__ = ["save", "load", "to_dot", "render", "to_networkx"]
