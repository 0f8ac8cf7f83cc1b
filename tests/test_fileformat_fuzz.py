"""Property-based fuzzing of the loader: whatever is done to a saved graph file -- truncation, byte
flips, edits of the safetensors header, of the graph's JSON structure, or of the sizes it declares --
loading gives either a ``GraphFormatError`` or a graph that answers correctly; loading takes less
than 2 s of CPU, and loading plus a gradient query less than 500 MB, per case.

"Answers correctly" is checked against an oracle independent of the semiring engine: the gradient
accumulated from the loaded Jacobians' dense matrices, node by node in reverse order. Memory is
measured per case with tracemalloc (numpy's arrays, which hold everything a graph and a query
allocate in proportion to the sizes a file declares, are traced). The CPU bound is on loading only:
the first query with new array dtypes also compiles numba kernels, a one-time cost of seconds.

The runs are derandomized (hypothesis draws the same cases every time), so CI is reproducible; the
example counts keep the whole file at about half a minute on one core.
"""
from __future__ import annotations

import json
import math
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradgraph as gg
from gradgraph.errors import GraphFormatError

MB = 2**20
#: per case: CPU seconds and traced bytes (the acceptance bounds of the loader's hardening)
CPU_LIMIT, MEMORY_LIMIT = 2.0, 500 * MB



def fuzz(examples):
    """Reproducible hypothesis settings: the same ``examples`` cases on every run."""
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                            HealthCheck.function_scoped_fixture])


class _Tiny(torch.nn.Module):
    """Convolution, linear layer, layer norm, softmax: every Jacobian kind in a few KB."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 2, 2)
        self.lin = torch.nn.Linear(6, 3)
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return torch.softmax(self.norm(self.lin(h)), -1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(file bytes, graph) of the saved tiny model, and a directory for the mutated files."""
    torch.manual_seed(0)
    model = _Tiny().double().eval()
    g = gg.capture(model, (torch.randn(1, 1, 4, dtype=torch.double),), output=lambda y: y[0, 1])
    assert {e.jac.kind for e in g.edges} == {"sparse", "matmul", "conv", "rowblock"}   # the premise
    d = tmp_path_factory.mktemp("fuzz")
    g.save(str(d / "base.safetensors"))
    data = (d / "base.safetensors").read_bytes()
    assert len(data) < 8000
    g.gradient()            # compile the kernels of its dtypes before anything is measured
    return data, g, d


def _header(data):
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def _with_header(header, body):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def _dense_gradient(g):
    """d(sink)/d(source) from the dense Jacobians, in reverse topological order: no semiring code."""
    adj = [None] * len(g.nodes)
    adj[g.sink] = np.ones(1)
    for i in range(len(g.nodes) - 1, -1, -1):
        if adj[i] is None:
            continue
        for k in g.in_edges[i]:
            e = g.edges[k]
            contrib = adj[i] @ e.jac.to_dense()
            adj[e.src] = contrib if adj[e.src] is None else adj[e.src] + contrib
    return {s: (np.zeros(g.nodes[i].numel) if adj[i] is None else adj[i]).reshape(g.nodes[i].shape)
            for s, i in g.sources.items()}


def _check_case(data, d):
    """Load ``data``: a GraphFormatError, or a graph whose gradient matches the dense oracle; within
    the CPU and memory bounds."""
    p = d / "case.safetensors"
    p.write_bytes(data)
    tracemalloc.start()       # traced per case only (hypothesis' own work is not the loader's)
    try:
        return _measured_case(p)
    finally:
        tracemalloc.stop()


def _measured_case(p):
    t0 = time.process_time()
    try:
        h = gg.load(str(p))
    except GraphFormatError:
        h = None
    cpu = time.process_time() - t0
    assert cpu < CPU_LIMIT, f"{cpu:.2f} s of CPU to load one file"
    if h is not None:
        grad = h.gradient()
        assert set(grad) == set(h.sources)
        small = sum(n.numel for n in h.nodes) < 10_000
        want = _dense_gradient(h) if small else None
        for s, i in h.sources.items():
            assert tuple(grad[s].shape) == tuple(h.nodes[i].shape)
            if want is not None:
                a, b = grad[s].double().numpy(), want[s]
                ok = np.isfinite(a) & np.isfinite(b) & (np.abs(b) < 1e100)
                np.testing.assert_allclose(a[ok], b[ok], rtol=1e-9, atol=1e-12 * max(1.0, np.abs(b[ok]).max(initial=0)))
    peak = tracemalloc.get_traced_memory()[1]
    assert peak < MEMORY_LIMIT, f"{peak / MB:.0f} MB traced for one case"
    return h


def test_unmodified_file_loads_and_matches(base):
    data, g, d = base
    h = _check_case(data, d)
    assert h is not None
    for s, v in g.gradient().items():
        assert torch.equal(h.gradient()[s], v)
        np.testing.assert_allclose(v.numpy(), _dense_gradient(g)[s], rtol=1e-10, atol=1e-14)


@fuzz(100)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncations(base, cut):
    data, g, d = base
    assert _check_case(data[:int(cut * len(data))], d) is None


@fuzz(300)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_byte_flips(base, flips):
    data, g, d = base
    buf = bytearray(data)
    for where, mask in flips:
        buf[int(where * len(buf))] ^= mask
    _check_case(bytes(buf), d)


_ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
              "F8_E4M3", "C64", "x"]
_BIG = st.sampled_from([0, 1, 2, 3, 7, 2**31 - 1, 2**31, 3 * 10**8, 10**12, 2**63 - 1, 2**64, -1])
_JSON = st.recursive(st.none() | st.booleans() | _BIG | st.integers(-10, 10) | st.floats(allow_nan=False)
                     | st.text(max_size=6),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
                     max_leaves=6)


@fuzz(200)
@given(pick=st.data())
def test_header_edits(base, pick):
    """Edit the safetensors header: a tensor's dtype, shape or byte offsets, or the metadata."""
    data, g, d = base
    n, header = _header(data)
    body = data[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    target = pick.draw(st.sampled_from(names + ["__metadata__"]))
    if target == "__metadata__":
        key = pick.draw(st.sampled_from(["format", "version", "graph", "extra"]))
        header["__metadata__"][key] = pick.draw(st.sampled_from(["", "2", "0", "-1", "gradgraph", "{}", "[]",
                                                                 "null", "1e400", "99999999999999999999"]))
    else:
        field = pick.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop"]))
        if field == "drop":
            del header[target]
        elif field == "dtype":
            header[target]["dtype"] = pick.draw(st.sampled_from(_ST_DTYPES))
        elif field == "shape":
            header[target]["shape"] = pick.draw(st.lists(_BIG, max_size=3))
        else:
            header[target]["data_offsets"] = pick.draw(st.lists(_BIG | st.integers(0, len(body)), min_size=2, max_size=2))
    _check_case(_with_header(header, body), d)


def _paths(obj, prefix=()):
    """Every location in a JSON document, as key/index tuples."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _edited(data, edit):
    """``data`` with its graph JSON passed through ``edit(doc)``."""
    n, header = _header(data)
    doc = json.loads(header["__metadata__"]["graph"])
    doc = edit(doc)
    header["__metadata__"]["graph"] = json.dumps(doc)
    return _with_header(header, data[8 + n:])


def _set(doc, path, value, delete=False):
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    elif delete:
        parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return doc


@fuzz(300)
@given(pick=st.data())
def test_structure_edits(base, pick):
    """Replace or delete any one value of the graph's JSON structure."""
    data, g, d = base
    doc = json.loads(_header(data)[1]["__metadata__"]["graph"])
    path = pick.draw(st.sampled_from(_paths(doc)))
    delete = bool(path) and pick.draw(st.booleans())
    value = None if delete else pick.draw(_JSON)
    _check_case(_edited(data, lambda doc: _set(doc, path, value, delete)), d)


#: the places where the structure declares a size or an index
_SIZE_KEYS = {"shape", "out_shape", "in_shape", "n", "outer", "d", "inner", "arange", "src", "dst", "sink",
              "groups", "stride", "padding", "dilation", "axes"}


@fuzz(300)
@given(pick=st.data())
def test_declared_size_edits(base, pick):
    """Set declared sizes and indices (shapes, entry counts, aranges, row layouts) to values from 0
    to 2**64; several at once, so that consistent lies (a node and its edges) are tried too."""
    data, g, d = base
    doc = json.loads(_header(data)[1]["__metadata__"]["graph"])
    places = [p for p in _paths(doc) if any(k in _SIZE_KEYS for k in p if isinstance(k, str))
              and isinstance(_get(doc, p), int) and not isinstance(_get(doc, p), bool)]
    chosen = pick.draw(st.lists(st.sampled_from(places), min_size=1, max_size=4, unique=True))
    values = [pick.draw(_BIG) for _ in chosen]

    def edit(doc):
        for p, v in zip(chosen, values):
            doc = _set(doc, p, v)
        return doc
    _check_case(_edited(data, edit), d)


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


@fuzz(40)
@given(node=st.integers(0, 100), size=st.sampled_from([3 * 10**8, 10**12]), null=st.booleans())
def test_consistent_huge_node(base, node, size, null):
    """The cheapest attack: a node declaring a huge size, its value dropped or its reference and the
    shapes of its edges made consistent with it -- never loads."""
    data, g, d = base
    k = node % len(g.nodes)

    def edit(doc):
        nd = doc["nodes"][k]
        nd["shape"] = [size]
        if null:
            nd["value"] = None
        elif isinstance(nd["value"], dict):
            nd["value"]["shape"] = [size]
            nd["value"].pop("axes", None)
        for e in doc["edges"]:
            if e["src"] == k:
                e["in_shape"] = [size]
            if e["dst"] == k:
                e["out_shape"] = [size]
        return doc
    assert _check_case(_edited(data, edit), d) is None
    assert math.prod([size]) > 10**8
