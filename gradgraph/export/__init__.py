"""Getting graphs out: the safetensors file format (and views for other tools)."""
from .fileformat import load, save

__all__ = ["save", "load"]
