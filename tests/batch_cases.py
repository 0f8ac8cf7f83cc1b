"""Builds for the batch tests: importable by name, so that worker processes (spawned pools, Dask
workers) unpickle them by reference."""
from __future__ import annotations

import functools
import os

import torch

QUERIES = [
    {"query": "top_paths", "k": 3},
    {"query": "top_paths", "name": "top_magnitude", "k": 2, "order": "magnitude"},
    {"query": "entropy"},
    {"query": "entropy", "name": "entropy_per_row", "groups": 0},
    {"query": "flow", "by": "module"},
    {"query": "branches", "modules": ["2"], "groups": 1},
    {"query": "path_lengths"},
    {"query": "gradient"},
]


@functools.lru_cache(maxsize=None)
def tiny_mlp():
    """Linear(4, 6) -> tanh -> Linear(6, 3), float64, seeded; built once per process."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double().eval()


def tiny_input(i):
    g = torch.Generator().manual_seed(1000 + int(i))
    return torch.randn(2, 4, generator=g, dtype=torch.float64)


def sink(y):
    return y[0, 1] - y[1, 2]


def build_mlp(item):
    """A build function: item {"id": i} -> (model, args, kwargs, output_fn)."""
    return tiny_mlp(), (tiny_input(item["id"]),), {}, sink


class MLPBuilder:
    """A build object: the model once per worker, then only the inputs per item. Items whose id is in
    ``fail`` raise; ``slow`` seconds of sleep per item give fault tests time to strike."""

    def __init__(self, fail=(), slow=0.0):
        self.fail, self.slow = set(fail), slow

    def setup(self):
        return tiny_mlp()

    def inputs(self, item):
        if item["id"] in self.fail:
            raise ValueError(f"item {item['id']} cannot be built")
        if self.slow:
            import time
            time.sleep(self.slow)
        return (tiny_input(item["id"]),), {}, sink


def worker_pid(_item=None):
    return os.getpid()


class FailsOnS2(MLPBuilder):
    """A build class for the command line (instantiated without arguments); item "s2" raises."""

    def inputs(self, item):
        if item["id"] == "s2":
            raise KeyError("s2 has no input")
        return (tiny_input(int(item["id"][1:])),), {}, sink


def attention_sink(y):
    return y[-1, 0] - y[-1, 1]


class AttentionBuilder:
    """The one-layer self-attention model of tests/oracle.py (small enough for path enumeration);
    an item's "tokens" are its input ids."""

    def setup(self):
        from oracle import tiny_attention
        return tiny_attention(seed=1)[0]

    def inputs(self, item):
        return (torch.tensor(item["tokens"]),), {}, attention_sink
