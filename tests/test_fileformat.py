"""The safetensors file format: exact round trips, weights stored once, every defect reported.

Oracles: ``torch.autograd.grad`` (a loaded graph's gradient), the captured graph itself (fields and
Jacobians must survive bit for bit), and the raw safetensors reader (what the file really holds).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from numpy.lib.array_utils import byte_bounds
from safetensors.numpy import save_file

import gradgraph as gg
from gradgraph.errors import GradGraphError, GraphFormatError
from gradgraph.export import filewriter
from gradgraph.export.fileformat import GraphFileExistsError
from gradgraph.jacobians import WeightMap

sys.path.insert(0, os.path.dirname(__file__))
from models import ZOO, autograd_gradient  # noqa: E402

ROUND_TRIP = ["mlp_tanh", "cnn", "bert_mlm_mask"]


@pytest.fixture(scope="module")
def captured():
    """name -> (graph, model, args, kwargs, output) for the round-trip models, captured once."""
    out = {}
    for name in ROUND_TRIP:
        model, args, kwargs, fn = ZOO[name]()
        out[name] = (gg.capture(model, args, kwargs, output=fn), model, args, kwargs, fn)
    return out


@pytest.fixture(scope="module")
def saved(captured, tmp_path_factory):
    """name -> path of the saved round-trip graph."""
    d = tmp_path_factory.mktemp("graphs")
    paths = {}
    for name, (g, *_) in captured.items():
        paths[name] = str(d / f"{name}.safetensors")
        g.save(paths[name])
    return paths


def _raw(path):
    with safe_open(path, framework="np") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src, dst, metadata=None, arrays=None, edit_doc=None):
    """Copy a saved graph with its metadata / arrays / JSON description altered."""
    meta, arrs = _raw(src)
    if edit_doc is not None:
        doc = json.loads(meta["graph"])
        edit_doc(doc)
        meta["graph"] = json.dumps(doc)
    if metadata is not None:
        meta.update(metadata)
    if arrays is not None:
        arrs = arrays(arrs)
    save_file(arrs, dst, metadata=meta)
    return dst


# ============================================================================ round trip
@pytest.mark.parametrize("name", ROUND_TRIP)
def test_gradient_identical_after_load(name, captured, saved):
    g, model, args, kwargs, fn = captured[name]
    h = gg.load(saved[name])
    before, after = g.gradient(), h.gradient()
    assert before.keys() == after.keys()
    for s in before:
        assert torch.equal(before[s], after[s]), s
        assert after[s].dtype == before[s].dtype
    oracle = autograd_gradient(model, args, kwargs, fn)
    for s, v in oracle.items():
        torch.testing.assert_close(after[s].to(v.dtype), v, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_every_field_round_trips(name, captured, saved):
    g = captured[name][0]
    h = gg.load(saved[name])
    assert (h.sink, h.sources, h.granularity) == (g.sink, g.sources, g.granularity)
    assert h.meta == json.loads(json.dumps(g.meta))
    assert len(h.nodes) == len(g.nodes)
    for a, b in zip(g.nodes, h.nodes):
        for f in ("name", "op", "shape", "dtype", "module", "module_type", "source_line", "role", "fx_name"):
            assert getattr(a, f) == getattr(b, f), (a.name, f)
        assert (a.value is None) == (b.value is None), a.name      # a value not held stays so
        if a.value is not None:
            assert b.value.dtype == a.value.dtype and b.value.shape == a.value.shape
            assert np.array_equal(a.value, b.value, equal_nan=True), a.name
    assert [(e.src, e.dst, e.arg, e.jac.kind) for e in g.edges] == \
        [(e.src, e.dst, e.arg, e.jac.kind) for e in h.edges]


def test_loaded_jacobians_work_like_the_captured_ones(captured, saved):
    """Every loaded Jacobian (sparse, matmul, conv, row block) gives the same products as the captured
    one, in both directions, for the sum and max interfaces."""
    rng = np.random.default_rng(0)
    kinds = set()
    for name in ("cnn", "bert_mlm_mask"):
        g, h = captured[name][0], gg.load(saved[name])
        for e, f in zip(g.edges, h.edges):
            kinds.add(e.jac.kind)
            for transpose in (False, True):
                n = e.jac.out_numel if transpose else e.jac.in_numel
                x = rng.standard_normal((2, n))
                for t in WeightMap:
                    assert np.array_equal(e.jac.sum_product(x, t, transpose), f.jac.sum_product(x, t, transpose))
                pair = np.abs(x)
                assert np.array_equal(e.jac.entropy_product(pair, transpose), f.jac.entropy_product(pair, transpose))
                xmax, xmin = np.abs(x[0]), -np.abs(x[1])
                for signed in (False, True):
                    a = e.jac.max_product(xmax, xmin if signed else None, transpose)
                    b = f.jac.max_product(xmax, xmin if signed else None, transpose)
                    assert all(np.array_equal(u, v) for u, v in zip(a, b) if u is not None)
    assert kinds == {"sparse", "matmul", "conv", "rowblock"}


def test_small_jacobians_materialise_identically(captured, saved):
    g, h = captured["cnn"][0], gg.load(saved["cnn"])
    for e, f in zip(g.edges, h.edges):
        assert np.array_equal(e.jac.to_dense(), f.jac.to_dense())


def test_load_needs_neither_the_model_nor_pickle(saved):
    """A fresh interpreter loads the file with pickle disabled and answers with no model code
    imported."""
    code = (
        "import pickle, sys\n"
        "import gradgraph as gg\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('pickle used')\n"
        "saved = pickle.load, pickle.loads, pickle.Unpickler\n"
        "pickle.load = pickle.loads = pickle.Unpickler = refuse\n"
        f"g = gg.load({saved['bert_mlm_mask']!r})\n"
        "pickle.load, pickle.loads, pickle.Unpickler = saved   # numba's kernel cache uses pickle\n"
        "grad = g.gradient()['bert.embeddings.word_embeddings']\n"
        "assert 'transformers' not in sys.modules\n"
        "print(float(grad.abs().sum()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    h = gg.load(saved["bert_mlm_mask"])
    expected = float(h.gradient()["bert.embeddings.word_embeddings"].abs().sum())
    # the same arithmetic, but BLAS and numba may split the reductions differently between two
    # processes (their thread pools need not match): equal to float64 rounding, not to the bit
    assert float(r.stdout.strip()) == pytest.approx(expected, rel=1e-10, abs=0)


# ============================================================================ stored once
class _SharedWeight(torch.nn.Module):
    """One square Linear applied twice: its weight is the operand of two contractions."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_weight_used_twice_is_stored_once(tmp_path):
    torch.manual_seed(0)
    model = _SharedWeight().double().eval()
    x = torch.randn(3, 8, dtype=torch.double)
    g = gg.capture(model, (x,), output=lambda y: y[0, 1] - y[2, 5])
    W = model.lin.weight.detach().numpy()
    users = [e for e in g.edges if e.jac.kind == "matmul" and e.jac.other.shape == W.T.shape
             and np.array_equal(e.jac.other, W.T)]
    assert len(users) == 2          # the premise: two edges reference the weight
    path = str(tmp_path / "g.safetensors")
    g.save(path)
    _, arrays = _raw(path)
    as_stored = [k for k, a in arrays.items() if a.shape == W.shape and np.array_equal(a, W)]
    transposed = [k for k, a in arrays.items() if a.shape == W.T.shape and np.array_equal(a, W.T)]
    # stored once, as the contiguous weight (the transposed view W.T is a flag, not a copy)
    assert len(as_stored) == 1 and not transposed
    h = gg.load(path)
    assert torch.equal(h.gradient()["x"], g.gradient()["x"])
    torch.testing.assert_close(h.gradient()["x"],
                               autograd_gradient(model, (x,), {}, lambda y: y[0, 1] - y[2, 5])["x"])


def test_bert_weights_and_shared_activations_stored_once(captured, saved):
    g, model = captured["bert_mlm_mask"][:2]
    meta, arrays = _raw(saved["bert_mlm_mask"])
    # the premise: this file exercises permuted-view and arange references
    assert '"axes": [' in meta["graph"] and '"arange": [' in meta["graph"]
    weights = [p.detach().numpy() for p in model.parameters() if p.dim() == 2]
    for W in weights:
        copies = sum(1 for a in arrays.values()
                     if (a.shape == W.shape and np.array_equal(a, W)) or
                     (a.shape == W.T.shape and np.array_equal(a, W.T)))
        assert copies <= 1
    # views of one block of memory (reshapes, the attention head split, transposes, matmul
    # operands that are node values) add no array: no more floating arrays are written than there
    # are distinct memory extents among the floating arrays the graph holds
    held = [n.value for n in g.nodes if n.value is not None] + \
        [a for e in g.edges for a in e.jac.state()[1].values()]
    extents = {byte_bounds(a) for a in held if a.dtype.kind == "f" and a.size}
    written = [a for a in arrays.values() if a.dtype.kind == "f"]
    assert len(written) <= len(extents) < len([a for a in held if a.dtype.kind == "f"])


# ============================================================================ corrupt files
def _assert_format_error(path, *words):
    with pytest.raises(GraphFormatError) as info:
        gg.load(path)
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, msg
    return msg


def test_truncated_file(saved, tmp_path):
    data = open(saved["mlp_tanh"], "rb").read()
    header = int.from_bytes(data[:8], "little")
    cuts = [1, 7, 8, 8 + header // 2, 8 + header, 8 + header + 1, (len(data) + 8 + header) // 2, len(data) - 1]
    for cut in cuts:
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        _assert_format_error(str(p))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    _assert_format_error(str(p), "not a valid safetensors file")


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(1)
    for k, n in enumerate((5, 100, 10_000)):
        p = tmp_path / f"rand{k}.safetensors"
        p.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        _assert_format_error(str(p))
    # a plausible header length followed by garbage
    p = tmp_path / "garbage_header.safetensors"
    p.write_bytes((40).to_bytes(8, "little") + b"{" + bytes(rng.integers(0, 256, 60, dtype=np.uint8)))
    _assert_format_error(str(p))


def test_missing_file(tmp_path):
    _assert_format_error(str(tmp_path / "nope.safetensors"), "no such file")


def test_safetensors_file_that_is_not_a_graph(tmp_path):
    p = str(tmp_path / "weights.safetensors")
    save_file({"w": np.ones((2, 3), np.float32)}, p)
    _assert_format_error(p, "not a gradgraph graph")
    save_file({"w": np.ones((2, 3), np.float32)}, p, metadata={"format": "pt"})
    _assert_format_error(p, "not a gradgraph graph", "'pt'")


def test_newer_version(saved, tmp_path):
    from gradgraph.export.fileformat import VERSION
    newer = str(VERSION + 1)
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "newer.safetensors"), metadata={"version": newer})
    _assert_format_error(p, "newer gradgraph", f"version {newer}", "upgrade")
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "vx.safetensors"), metadata={"version": "one"})
    _assert_format_error(p, "version")


def test_tampered_json(saved, tmp_path):
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "bad.safetensors"), metadata={"graph": '{"nodes": [1, 2'})
    _assert_format_error(p, "not valid json")
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "nojson.safetensors"), metadata={"graph": "[]"})
    _assert_format_error(p, "not a json object")
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "nonodes.safetensors"),
                 edit_doc=lambda d: d.pop("nodes"))
    _assert_format_error(p, "'nodes'")
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "kind.safetensors"),
                 edit_doc=lambda d: d["edges"][0].update(kind="pickle"))
    _assert_format_error(p, "unknown jacobian kind")
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "params.safetensors"),
                 edit_doc=lambda d: [e["params"].clear() for e in d["edges"]])
    _assert_format_error(p, "edge")
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "axes.safetensors"),
                 edit_doc=lambda d: d["edges"][0]["arrays"]["other"].update(axes=[0, 0]))
    _assert_format_error(p, "edge 0.other", "not a permutation")
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "ref.safetensors"),
                 edit_doc=lambda d: d["nodes"][0].update(value="node0.value"))
    _assert_format_error(p, "node 0", "malformed array reference")
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "arange.safetensors"), edit_doc=lambda d: d["edges"][1][
        "arrays"].update(cols={"arange": [0, 1], "dtype": "<i4", "shape": [10**12]}))
    _assert_format_error(p, "edge 1.cols", "arange")
    meta, arrays = _raw(saved["mlp_tanh"])
    meta.pop("graph")
    p = str(tmp_path / "nograph.safetensors")
    save_file(arrays, p, metadata=meta)
    _assert_format_error(p, "missing")


def test_bad_row_block_precision(saved, tmp_path):
    def edit(doc):
        e = next(e for e in doc["edges"] if e["kind"] == "rowblock" and e["params"]["function"] == "layer_norm")
        e["params"]["precision"] = "float16"
    p = _rewrite(saved["bert_mlm_mask"], str(tmp_path / "precision.safetensors"), edit_doc=edit)
    _assert_format_error(p, "rowblock", "precision")


def test_missing_array(saved, tmp_path):
    meta, arrays = _raw(saved["cnn"])
    for name in list(arrays)[:3] + list(arrays)[-3:]:
        p = str(tmp_path / "missing.safetensors")
        save_file({k: v for k, v in arrays.items() if k != name}, p, metadata=meta)
        _assert_format_error(p, "missing", name)


def test_shape_mismatch(saved, tmp_path):
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "shape.safetensors"),
                 edit_doc=lambda d: d["nodes"][1].update(shape=[7, 7]))
    _assert_format_error(p, "node 1")

    def grow(arrs):   # an operand array with the wrong number of elements
        k = next(k for k, a in arrs.items() if k.endswith(".other"))
        arrs[k] = np.zeros(arrs[k].size + 1, arrs[k].dtype)
        return arrs
    p = _rewrite(saved["mlp_tanh"], str(tmp_path / "size.safetensors"), arrays=grow)
    _assert_format_error(p, "elements")


def test_out_of_range_indices(saved, tmp_path):
    src = saved["cnn"]
    n = len(json.loads(_raw(src)[0]["graph"])["nodes"])
    for edit, words in [
        (lambda d: d["edges"][0].update(src=n + 5), ("out of range",)),
        (lambda d: d["edges"][0].update(dst=-1), ("out of range",)),
        (lambda d: d.update(sink=n), ("sink", "out of range")),
        (lambda d: d["sources"].update(extra=10**9), ("source", "out of range")),
        (lambda d: d["edges"][-1].update(src=d["edges"][-1]["dst"]), ("topological",)),
    ]:
        p = _rewrite(src, str(tmp_path / "idx.safetensors"), edit_doc=edit)
        _assert_format_error(p, *words)

    # an index array pointing past the end of its tensor (would read out of bounds)
    meta, arrays = _raw(src)
    doc = json.loads(meta["graph"])
    k, name = next((k, r["a"]) for k, e in enumerate(doc["edges"])
                   for a, r in e["arrays"].items() if a == "cols" and "a" in r)
    arrays[name] = arrays[name].copy()
    arrays[name][0] = 10**6
    p = str(tmp_path / "cols.safetensors")
    save_file(arrays, p, metadata=meta)
    _assert_format_error(p, f"edge {k}", "out of range")


# ============================================================================ writing
def test_refuses_to_overwrite(captured, tmp_path):
    g, h = captured["mlp_tanh"][0], captured["cnn"][0]
    p = str(tmp_path / "g.safetensors")
    g.save(p)
    before = open(p, "rb").read()
    with pytest.raises(GraphFileExistsError, match="overwrite=True") as info:
        h.save(p)
    assert isinstance(info.value, GradGraphError) and isinstance(info.value, FileExistsError)
    assert open(p, "rb").read() == before
    h.save(p, overwrite=True)
    assert gg.load(p).nodes[0].shape == h.nodes[0].shape != g.nodes[0].shape
    assert sorted(os.listdir(tmp_path)) == ["g.safetensors"]


def test_failed_save_leaves_nothing(captured, tmp_path, monkeypatch):
    def broken(f, arrays, metadata):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(filewriter, "_write_safetensors", broken)
    g = captured["mlp_tanh"][0]
    p = tmp_path / "g.safetensors"
    with pytest.raises(GradGraphError, match="No space left"):
        g.save(str(p))
    assert os.listdir(tmp_path) == []
    # overwriting: the old file survives a failed save intact
    monkeypatch.undo()
    g.save(str(p))
    before = p.read_bytes()
    monkeypatch.setattr(filewriter, "_write_safetensors", broken)
    with pytest.raises(GradGraphError, match="cannot write"):
        g.save(str(p), overwrite=True)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["g.safetensors"]


def test_unserialisable_meta_is_a_clear_error(captured, tmp_path):
    g = captured["mlp_tanh"][0]
    g.meta["note"] = object()
    try:
        with pytest.raises(GradGraphError, match="JSON"):
            g.save(str(tmp_path / "g.safetensors"))
    finally:
        del g.meta["note"]
    assert os.listdir(tmp_path) == []


def test_save_into_missing_directory(captured, tmp_path):
    with pytest.raises(GradGraphError, match="cannot write"):
        captured["mlp_tanh"][0].save(str(tmp_path / "no" / "such" / "dir.safetensors"))


@pytest.mark.parametrize("name", ["cnn", "bert_mlm_mask"])
def test_every_query_answers_the_same_after_load(name, captured, saved, monkeypatch):
    # one thread count for both graphs' queries: a count chosen by the machine's load may route the
    # contractions through another BLAS, which rounds differently in the last bit
    from gradgraph import threads
    monkeypatch.setattr(threads, "_dynamic", False)
    g, h = captured[name][0], gg.load(saved[name])
    for order in ("signed", "magnitude"):
        assert h.top_paths(k=3, order=order) == g.top_paths(k=3, order=order)
    assert h.entropy() == g.entropy()
    assert h.flow(by="node") == g.flow(by="node")
    assert h.flow(by="module") == g.flow(by="module")
    assert np.array_equal(h.path_lengths(), g.path_lengths())


def test_saved_file_has_ordinary_permissions(captured, tmp_path):
    """The temporary file's private mode must not survive the rename."""
    p = tmp_path / "g.safetensors"
    captured["mlp_tanh"][0].save(str(p))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask


# ============================================================================ hardening: loading
def _tiny(n=3, w=None):
    """x (n,) -> x * w -> sum: a hand-built graph (source, op, scalar sink), exact by construction."""
    from gradgraph.graph import Edge, GradGraph, Node
    from gradgraph.jacobians import SparseJacobian
    x = np.linspace(1.0, 2.0, n)
    w = np.linspace(-1.0, 3.0, n) if w is None else w
    nodes = [Node("x", "input", (n,), "float64", value=x, role="source"),
             Node("mul", "aten.mul.Tensor", (n,), "float64", value=x * w, module="scale"),
             Node("sum", "aten.sum.default", (), "float64", value=np.array((x * w).sum()), role="sink")]
    edges = [Edge(0, 1, SparseJacobian((n,), (n,), None, None, w)),
             Edge(1, 2, SparseJacobian((), (n,), np.zeros(n, dtype=np.int32), None, None))]
    return GradGraph(nodes, edges, {"x": 0}, 2, "function", {"note": "tiny"})


def _write_unchecked(g, path):
    """Write ``g`` in the file format without the checks of ``save`` (to make broken files)."""
    table = filewriter._ArrayTable()
    doc = filewriter._document(g, table)
    save_file(dict(table.arrays), str(path),
              metadata={"format": "gradgraph", "version": "1", "graph": json.dumps(doc)})
    return str(path)


@pytest.fixture
def tiny_file(tmp_path):
    return _write_unchecked(_tiny(), tmp_path / "tiny.safetensors")


def _load_peak(path):
    """(graph or the GraphFormatError, peak bytes traced while loading)."""
    import tracemalloc
    tracemalloc.start()
    try:
        try:
            out = gg.load(path)
        except GraphFormatError as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tiny_graph_premise(tiny_file):
    h = gg.load(tiny_file)
    g = _tiny()
    torch.testing.assert_close(h.gradient()["x"], torch.from_numpy(g.edges[0].jac.vals), rtol=1e-10, atol=0)


@pytest.mark.parametrize("declared", [3 * 10**8, 10**12])
def test_declared_sizes_need_data(tiny_file, tmp_path, declared):
    """A few bytes of JSON cannot declare gigabytes: a node without a value, a node or a reference
    larger than its array, an arange longer than its Jacobian's data -- each is a GraphFormatError,
    found before anything of the declared size is allocated."""
    MB = 2**20

    def no_value(d):             # a node of `declared` elements and no value
        d["nodes"][1].update(shape=[declared], value=None)

    def bigger_shape(d):         # a value reference larger than its tensor
        d["nodes"][1].update(shape=[declared])
        d["nodes"][1]["value"]["shape"] = [declared]

    def long_arange(d):          # an index map of `declared` entries for 3-element nodes
        d["edges"][1]["arrays"]["rows"] = {"arange": [0, 0], "dtype": "<i4", "shape": [declared]}
        d["edges"][1]["params"]["n"] = declared

    for edit, words in [(no_value, ("node 1", "no value")), (bigger_shape, ("node 1", "elements")),
                        (long_arange, ("edge 1.rows", "arange"))]:
        p = _rewrite(tiny_file, str(tmp_path / "big.safetensors"), edit_doc=edit)
        out, peak = _load_peak(p)
        assert isinstance(out, GraphFormatError), (edit.__name__, out)
        assert all(w in str(out) for w in words), (edit.__name__, str(out))
        assert peak < 16 * MB, (edit.__name__, peak)


def test_only_referenced_tensors_are_read(tmp_path):
    """An unreferenced tensor costs nothing to load; referenced ones are read once, at their size."""
    MB = 2**20
    path = _write_unchecked(_tiny(), tmp_path / "plain.safetensors")
    meta, arrays = _raw(path)
    padded = str(tmp_path / "padded.safetensors")
    save_file({**arrays, "unreferenced": np.ones(8 * MB // 8)}, padded, metadata=meta)
    (_, plain_peak), (h, padded_peak) = _load_peak(path), _load_peak(padded)
    assert isinstance(h, gg.GradGraph)
    assert padded_peak < plain_peak + MB
    # a graph of 3 x 4 MB of float64 values and weights (and a 2 MB index map, stored as an arange):
    # loading allocates those arrays, not twice their size
    n = MB // 2
    big = _write_unchecked(_tiny(n), tmp_path / "big.safetensors")
    h, peak = _load_peak(big)
    assert isinstance(h, gg.GradGraph) and h.nodes[0].numel == n
    assert peak < (3 * 8 + 4) * n * 1.15 + MB, peak


def test_loaded_graph_outlives_its_file(tmp_path):
    """Loading reads what the graph needs into memory: deleting or replacing the file later does
    not change (or break) the loaded graph."""
    p = str(tmp_path / "g.safetensors")
    _tiny().save(p)
    h = gg.load(p)
    want = h.gradient()["x"].clone()
    _tiny(w=np.full(3, 7.0)).save(p, overwrite=True)
    torch.testing.assert_close(h.gradient()["x"], want, rtol=0, atol=0)
    os.remove(p)
    torch.testing.assert_close(h.gradient()["x"], want, rtol=0, atol=0)
    assert h.top_paths(k=1)[0].weight == pytest.approx(3.0, rel=1e-12)


def _rebuilt(**change):
    """The tiny graph with some of its parts replaced (and no check on them)."""
    from gradgraph.graph import GradGraph
    g = _tiny()
    parts = dict(nodes=g.nodes, edges=g.edges, sources=g.sources, sink=g.sink, granularity=g.granularity)
    parts.update(change)
    return GradGraph(parts["nodes"], parts["edges"], parts["sources"], parts["sink"], parts["granularity"], g.meta)


def _broken_graphs():
    from gradgraph.graph import Edge, Node
    from gradgraph.jacobians import SparseJacobian
    g = _tiny()
    x, mul, s = g.nodes
    e0, e1 = g.edges
    two = Node("two", "aten.mul.Tensor", (3,), "float64", value=2 * x.value)
    vec_sink = Node("vec", "aten.mul.Tensor", (2,), "float64", value=np.ones(2), role="sink")
    int_x = Node("x", "input", (3,), "int64", value=np.arange(3), role="source")
    return {
        "no sources": (_rebuilt(sources={}), "no sources"),
        "sink not last": (_rebuilt(nodes=[x, mul, s, two], edges=[e0, e1, Edge(0, 3, e0.jac)]), "not the last node"),
        "sink not a scalar": (_rebuilt(nodes=[x, mul, vec_sink], edges=[
            e0, Edge(1, 2, SparseJacobian((2,), (3,), [0, 1], [0, 1], None))]), "one floating-point number"),
        "sink of integers": (_rebuilt(nodes=[x, mul, Node("sum", "aten.sum.default", (), "int64", value=np.array(3),
                                                          role="sink")]), "one floating-point number"),
        "null sink value": (_rebuilt(nodes=[x, mul, Node("sum", "aten.sum.default", (), "float64", role="sink")]),
                            "no value"),
        "unknown dtype": (_rebuilt(nodes=[x, Node("mul", "aten.mul.Tensor", (3,), "float65", value=mul.value), s]),
                          "unknown dtype 'float65'"),
        "integer source": (_rebuilt(nodes=[int_x, mul, s]), "not floating point"),
        "source with an edge into it": (_rebuilt(sources={"x": 0, "mul": 1}), "edge into it"),
        "one node, two sources": (_rebuilt(sources={"x": 0, "again": 0}), "same node"),
        "source is the sink": (_rebuilt(sources={"x": 0, "sum": 2}), "is the sink"),
        "unknown granularity": (_rebuilt(granularity="fine"), "granularity"),
        "edge backward": (_rebuilt(edges=[e0, e1, Edge(2, 1, e1.jac)]), "topological"),
        "negative argument": (_rebuilt(edges=[e0, Edge(1, 2, e1.jac, -1)]), "arg"),
    }


@pytest.mark.parametrize("case", list(_broken_graphs()))
def test_broken_invariants_are_format_errors(case, tmp_path):
    """Every invariant the queries rely on is checked at load time (GraphFormatError naming it), and
    ``save`` refuses to write such a graph in the first place."""
    g, words = _broken_graphs()[case]
    p = _write_unchecked(g, tmp_path / "broken.safetensors")
    _assert_format_error(p, words)
    with pytest.raises(GradGraphError, match="cannot save"):
        g.save(str(tmp_path / "refused.safetensors"))
    assert not (tmp_path / "refused.safetensors").exists()


def test_edge_past_the_last_node(tiny_file, tmp_path):
    p = _rewrite(tiny_file, str(tmp_path / "past.safetensors"), edit_doc=lambda d: d["edges"][1].update(dst=3))
    _assert_format_error(p, "edge 1", "out of range")


def test_header_dtype_shape_and_offsets_are_checked(tiny_file, tmp_path):
    """Edits of the safetensors header (an unusable dtype, a shape that does not match its bytes)
    are format errors, whatever safetensors itself accepts."""
    data = open(tiny_file, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F64")
    for change, words in [({"dtype": "BF16", "shape": header[name]["shape"][:-1] + [header[name]["shape"][-1] * 4]},
                           ("dtype 'BF16'",)),
                          ({"dtype": "F8_E4M3", "shape": header[name]["shape"][:-1] + [header[name]["shape"][-1] * 8]},
                           ("dtype",))]:
        h = json.loads(json.dumps(header))
        h[name].update(change)
        text = json.dumps(h).encode()
        text += b" " * (-len(text) % 8)
        p = tmp_path / "header.safetensors"
        p.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
        _assert_format_error(str(p), *words)


# ============================================================================ hardening: saving
def test_save_is_byte_reproducible(captured, tmp_path):
    """The same graph gives the same bytes: twice in one process, after a load, and in a fresh
    process (which hashes and orders dictionaries differently)."""
    for name in ("mlp_tanh", "bert_mlm_mask"):
        g = captured[name][0]
        a, b, c = (str(tmp_path / f"{name}.{k}.safetensors") for k in "abc")
        g.save(a)
        g.save(b)
        gg.load(a).save(c)
        first = open(a, "rb").read()
        assert open(b, "rb").read() == first, name
        assert open(c, "rb").read() == first, name
    d = str(tmp_path / "fresh.safetensors")
    code = f"import gradgraph as gg; gg.load({a!r}).save({d!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert open(d, "rb").read() == open(a, "rb").read()


def _competitor(monkeypatch, target):
    """Make another 'process' create ``target`` just after save has checked that it does not exist
    (while its temporary file is being written)."""
    import tempfile
    real = tempfile.mkstemp

    def mkstemp(*a, **k):
        out = real(*a, **k)
        with open(target, "xb") as f:
            f.write(b"the other process's graph")
        return out
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("links", [True, False])
def test_no_overwrite_is_atomic(tmp_path, monkeypatch, links):
    """Without overwrite=True a file that appears while saving is never replaced, on file systems
    with hard links (link, then unlink) and without (exclusive create, then rename)."""
    if not links:
        def no_link(src, dst, *a, **k):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "g.safetensors"
    _competitor(monkeypatch, target)
    with pytest.raises(GraphFileExistsError):
        _tiny().save(str(target))
    assert target.read_bytes() == b"the other process's graph"
    assert os.listdir(tmp_path) == ["g.safetensors"]
    monkeypatch.undo()
    if not links:
        monkeypatch.setattr(os, "link", no_link)
    fresh = tmp_path / "fresh.safetensors"
    _tiny().save(str(fresh))
    assert sorted(os.listdir(tmp_path)) == ["fresh.safetensors", "g.safetensors"]
    assert torch.equal(gg.load(str(fresh)).gradient()["x"], _tiny().gradient()["x"])


def test_racing_saves_one_wins(tmp_path):
    """Threads saving different graphs to one new path at once: in every round exactly one save
    succeeds, the others get GraphFileExistsError, and the file is the winner's graph."""
    import threading
    graphs = [_tiny(w=np.full(3, float(k + 1))) for k in range(3)]
    for rnd in range(15):
        target = str(tmp_path / f"r{rnd}.safetensors")
        barrier, results = threading.Barrier(len(graphs)), [None] * len(graphs)

        def run(k):
            barrier.wait()
            try:
                graphs[k].save(target)
                results[k] = "ok"
            except GraphFileExistsError:
                results[k] = "exists"
        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(graphs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["exists"] * (len(graphs) - 1) + ["ok"], results
        winner = results.index("ok")
        assert gg.load(target).nodes[1].value.tolist() == (graphs[winner].nodes[1].value).tolist()
    assert all(".gradgraph-tmp-" not in f for f in os.listdir(tmp_path))


def test_write_error_is_a_gradgraph_error_in_a_real_process(tmp_path):
    """A real write failure (the file-size limit, as a full disk would) is GradGraphError('cannot
    write ...'), and leaves no file behind."""
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import numpy as np
        from test_fileformat import _tiny
        from gradgraph.errors import GradGraphError
        g = _tiny(4096)                                   # about 100 KB
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            g.save({str(tmp_path / 'g.safetensors')!r})
        except GradGraphError as exc:
            print(type(exc).__name__, exc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("GradGraphError cannot write") and "File too large" in r.stdout, r.stdout
    assert os.listdir(tmp_path) == []


def test_killed_save_leaves_a_recognisable_temporary_that_the_next_save_removes(tmp_path):
    """kill -9 during a save leaves ``.NAME.gradgraph-tmp-PID-XXXXXXXX``; the next save to the folder
    removes it (its process is gone) but not the temporary of a save still running."""
    import re
    code = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_fileformat import _tiny
        real_chmod = os.chmod
        def chmod(path, mode):          # the temporary is written: stop here, to be killed
            real_chmod(path, mode)
            print("written", flush=True)
            time.sleep(600)
        os.chmod = chmod
        _tiny().save({str(tmp_path / 'g.safetensors')!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and re.fullmatch(rf"\.g\.safetensors\.gradgraph-tmp-{proc.pid}-[a-z0-9_]{{8}}", left[0]), left
    running = tmp_path / f".h.safetensors.gradgraph-tmp-{os.getpid()}-abcd1234"   # a live save's
    running.write_bytes(b"in progress")
    unrelated = tmp_path / ".notes.gradgraph-tmp-x"
    unrelated.write_bytes(b"mine")
    _tiny().save(str(tmp_path / "other.safetensors"))
    assert sorted(os.listdir(tmp_path)) == sorted(["other.safetensors", running.name, unrelated.name])


def test_layout_is_the_documented_one(tmp_path):
    """Header: sorted keys, no spaces, padded to 8 bytes; tensors by decreasing item size, then
    name, back to back; any safetensors reader reads the same arrays."""
    p = str(tmp_path / "g.safetensors")
    _tiny(40).save(p)
    data = open(p, "rb").read()
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0
    text = data[8:8 + n].decode().rstrip(" ")
    header = json.loads(text)
    assert text == json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BOOL": 1}
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    assert names == sorted(names, key=lambda k: (-size[header[k]["dtype"]], k))
    ends = [0] + [header[k]["data_offsets"][1] for k in names]
    assert [header[k]["data_offsets"][0] for k in names] == ends[:-1] and ends[-1] == len(data) - 8 - n
    _, arrays = _raw(p)
    doc = json.loads(header["__metadata__"]["graph"])
    assert np.array_equal(arrays[doc["nodes"][0]["value"]["a"]], _tiny(40).nodes[0].value)
