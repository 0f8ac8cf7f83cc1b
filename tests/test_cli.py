"""The command line, end to end: capture a small BERT from a spec file, then query the saved file
in fresh processes that never import the model's code, and compare every JSON answer with the
Python API on the loaded graph. User errors: exit status 2 and one line on stderr."""
import json
import math
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pydot
import pytest

import gradgraph as gg
from gradgraph.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "examples", "tiny_bert.py") + ":build"
SVG = "{http://www.w3.org/2000/svg}"


def run(*args, env=None):
    """``python -m gradgraph ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "gradgraph", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


# Runs several commands through main() in ONE fresh process (start-up is the slow part), and
# reports which model code got imported: queries must need nothing but the file.
QUERY_RUNNER = textwrap.dedent("""
    import contextlib, io, json, sys
    from gradgraph.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "_gradgraph_spec_tiny_bert"))
    print(json.dumps({"results": results, "model_modules": loaded}))
""")


def _session_dir(tmp_path_factory):
    """A directory shared by all pytest-xdist workers of this session (one capture for all)."""
    base = tmp_path_factory.getbasetemp()
    d = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cli_shared"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    from filelock import FileLock
    d = _session_dir(tmp_path_factory)
    f = d / "bert.safetensors"
    with FileLock(str(d / "capture.lock")):
        if not f.exists():
            r = run("capture", SPEC, "--out", f)
            assert r.returncode == 0, r.stderr
            assert "wrote" in r.stdout and f.exists()
    return d, f


@pytest.fixture(scope="module")
def queries(captured):
    from filelock import FileLock
    d, f = captured
    argvs = [
        ["info", str(f), "--json"],
        ["paths", str(f), "--k", "4", "--json"],
        ["paths", str(f), "--k", "3", "--order", "magnitude", "--include-views", "--json",
         "--source", "bert.embeddings.word_embeddings"],
        ["entropy", str(f), "--per-source", "--json"],
        ["flow", str(f), "--by", "module", "--top", "7", "--json"],
        ["flow", str(f), "--by", "element", "--top", "5", "--json"],
        ["flow", str(f), "--by", "node", "--top", "4", "--json"],
        ["render", str(f), "--k", "3", "--collapse", "none", "-o", str(d / "top.dot")],
        ["render", str(f), "--k", "3", "--collapse", "module", "-o", str(d / "top.svg")],
        ["info", str(f)], ["paths", str(f), "--k", "2"], ["entropy", str(f)],
        ["flow", str(f), "--by", "module"],
    ]
    done = d / "queries.json"
    with FileLock(str(d / "queries.lock")):
        if not done.exists():
            r = subprocess.run([sys.executable, "-c", QUERY_RUNNER, json.dumps(argvs)], capture_output=True,
                               text=True, cwd=ROOT, timeout=600)
            assert r.returncode == 0, r.stderr
            done.write_text(r.stdout)
    report = json.loads(done.read_text())
    for argv, res in zip(argvs, report["results"]):
        assert res["rc"] == 0, (argv, res["err"])
    return d, f, gg.load(f), report


def out_of(queries, i):
    return queries[3]["results"][i]["out"]


def test_queries_never_import_the_model(queries):
    assert queries[3]["model_modules"] == []


def test_info_json(queries):
    _, f, g, _ = queries
    info = json.loads(out_of(queries, 0))
    assert info["tensors"] == len(g.nodes) and info["jacobians"] == len(g.edges)
    assert info["scalars"] == sum(math.prod(n.shape) for n in g.nodes)
    assert info["sources"] == [{"name": "bert.embeddings.word_embeddings", "shape": [1, 8, 16],
                                "dtype": "float64", "module": g.nodes[g.sources["bert.embeddings.word_embeddings"]].module}]
    assert info["sink"]["value"] == pytest.approx(g.sink_value)
    assert info["file_size"] == os.path.getsize(f) and info["format_version"] == 2
    assert info["values_held"] == sum(n.value is not None for n in g.nodes)
    assert info["granularity"] == "function"
    assert sum(info["ops"].values()) == sum(n.role != "source" for n in g.nodes)
    assert info["ops"]["native_layer_norm"] == sum(n.op_name == "native_layer_norm" for n in g.nodes)


def test_capture_matches_autograd(queries):
    """The captured file explains the spec's model: its gradient equals torch.autograd's."""
    import importlib.util

    import torch
    _, _, g, _ = queries
    spec = importlib.util.spec_from_file_location("tiny_bert_check", SPEC.rsplit(":", 1)[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, args, kwargs, output = mod.build()
    emb = model.bert.embeddings.word_embeddings
    store = {}
    hook = emb.register_forward_hook(lambda m, i, o: store.setdefault("e", o))
    y = output(model(*args, **kwargs))
    hook.remove()
    (want,) = torch.autograd.grad(y, store["e"])
    got = g.gradient()["bert.embeddings.word_embeddings"]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert g.sink_value == pytest.approx(float(y))


def _same_paths(js, paths):
    assert len(js["paths"]) == len(paths)
    for r, (jp, p) in enumerate(zip(js["paths"], paths)):
        assert jp["rank"] == r + 1
        assert jp["weight"] == pytest.approx(p.weight, rel=1e-12)
        assert jp["log_abs_weight"] == pytest.approx(p.log_abs_weight, rel=1e-12)
        assert jp["sign"] == p.sign and jp["length"] == p.length
        assert (jp["source"]["name"], tuple(jp["source"]["index"])) == p.source
        assert [(h["node"], tuple(h["index"]), h["op"], h["module"]) for h in jp["hops"]] == \
            [(h.node, h.index, h.op, h.module) for h in p.hops]


def test_paths_json_equals_api(queries):
    _, _, g, _ = queries
    js = json.loads(out_of(queries, 1))
    assert (js["k"], js["order"], js["include_views"], js["source"]) == (4, "signed", False, None)
    _same_paths(js, g.top_paths(k=4))
    # each path's weight is the product of the local derivatives along it
    for p in g.top_paths(k=4):
        assert math.prod(p.edge_weights) == pytest.approx(p.weight, rel=1e-9)
    js = json.loads(out_of(queries, 2))
    _same_paths(js, g.top_paths(k=3, order="magnitude", include_views=True,
                                source="bert.embeddings.word_embeddings"))


def test_entropy_json_equals_api(queries):
    _, _, g, _ = queries
    js = json.loads(out_of(queries, 3))
    assert js["unit"] == "nats"
    assert js["entropy"] == pytest.approx(float(g.entropy()), rel=1e-12)
    per = g.entropy(per_source=True)
    assert set(js["per_source"]) == set(per)
    for k, v in per.items():
        v = np.asarray(v, dtype=float)
        assert js["per_source"][k]["shape"] == list(v.shape)
        got = np.array([np.nan if x is None else x for x in js["per_source"][k]["values"]])
        np.testing.assert_allclose(got, v.reshape(-1), rtol=1e-12)


def test_flow_json_equals_api(queries):
    _, _, g, _ = queries
    js = json.loads(out_of(queries, 4))
    f = g.flow(by="module")
    want = sorted(f.items(), key=lambda kv: -kv[1])[:7]
    assert js["by"] == "module" and js["count"] == len(f)
    assert [d["rank"] for d in js["top"]] == list(range(1, 8))
    np.testing.assert_allclose([d["flow"] for d in js["top"]], [v for _, v in want], rtol=1e-12)
    assert all(f[d["module"]] == pytest.approx(d["flow"], rel=1e-12) for d in js["top"])

    js = json.loads(out_of(queries, 5))
    fe = g.flow(by="element")
    everything = np.concatenate([np.asarray(v, dtype=float).reshape(-1) for v in fe.values()])
    assert js["count"] == everything.size
    np.testing.assert_allclose([d["flow"] for d in js["top"]], np.sort(everything)[::-1][:5], rtol=1e-12)
    for d in js["top"]:
        assert np.asarray(fe[d["node"]])[tuple(d["index"])] == pytest.approx(d["flow"], rel=1e-12)

    js = json.loads(out_of(queries, 6))
    fn = g.flow(by="node")
    np.testing.assert_allclose([d["flow"] for d in js["top"]], sorted(fn.values(), reverse=True)[:4], rtol=1e-12)


def test_render_dot_is_union_of_paths(queries):
    d, _, g, _ = queries
    paths = g.top_paths(k=3)
    hops, pairs = set(), set()
    for p in paths:
        keys = [(h.node_id, h.flat_index) for h in p.hops]
        hops.update(keys)
        pairs.update(zip(keys[1:], keys[:-1]))          # forward direction: input -> output
    (dot,) = pydot.graph_from_dot_file(str(d / "top.dot"))
    boxes = [n for n in dot.get_nodes() if n.get_name() not in ("node", "edge", "graph", "legend")]
    assert len(boxes) == len(hops)
    assert len(dot.get_edges()) == len(pairs)
    assert dot.get_node("legend")


def test_render_svg_is_valid(queries):
    d, _, g, _ = queries
    root = ET.parse(d / "top.svg").getroot()
    groups = [e for e in root.iter(SVG + "g") if e.get("class") == "node"]
    # collapse=module: one box per module run of the paths, the sink, each distinct source, legend
    paths = g.top_paths(k=3)
    modules = {h.module for p in paths for h in p.hops[1:-1]}
    sources = {p.hops[-1].flat_index for p in paths}
    assert len(groups) == len(modules) + 1 + len(sources) + 1
    titles = " ".join(t.text or "" for t in root.iter(SVG + "text"))
    assert all(m in titles for m in modules)
    assert any(m.startswith("bert.encoder.layer.1") for m in modules)


def test_text_outputs(queries):
    _, _, g, _ = queries
    assert "tensors" in out_of(queries, 9) and "bert.embeddings.word_embeddings" in out_of(queries, 9)
    lines = out_of(queries, 10).strip().splitlines()
    assert len(lines) == 1 + 2 + 2 and "route" in lines[1]   # title, table header and rule, 2 rows
    assert "nats" in out_of(queries, 11)
    assert "gradient flow by module" in out_of(queries, 12)


def test_help_has_examples():
    r = run("render", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "-o top.svg" in r.stdout


# ------------------------------------------------------------------ user errors
def one_line_error(rc, err):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gradgraph: error: ") and "Traceback" not in err
    return lines[0]


def test_errors_in_a_real_process(captured, tmp_path):
    _, f = captured
    r = run("info", tmp_path / "missing.safetensors")
    assert "no such file" in one_line_error(r.returncode, r.stderr)
    r = run("capture", tmp_path / "nope.py:build", "--out", tmp_path / "g.safetensors")
    assert "does not exist" in one_line_error(r.returncode, r.stderr)
    # an image with no Graphviz on PATH: says how to install it and offers .dot
    r = run("render", f, "-o", tmp_path / "top.svg", env={**os.environ, "PATH": str(tmp_path)})
    msg = one_line_error(r.returncode, r.stderr)
    assert "apt-get install graphviz" in msg and "brew install graphviz" in msg and ".dot" in msg


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_error_corrupt_file(capsys, tmp_path, captured):
    _, f = captured
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(f.read_bytes()[:1000])
    rc, _, err = cli(capsys, "paths", bad)
    assert str(bad) in one_line_error(rc, err)
    (tmp_path / "text.safetensors").write_text("hello")
    rc, _, err = cli(capsys, "info", tmp_path / "text.safetensors")
    one_line_error(rc, err)


def test_error_unknown_source(capsys, captured):
    _, f = captured
    rc, _, err = cli(capsys, "paths", f, "--source", "bert.embeddings.nope")
    assert "bert.embeddings.word_embeddings" in one_line_error(rc, err)
    rc, _, err = cli(capsys, "render", f, "--source", "nope", "-o", "unused.dot")
    one_line_error(rc, err)
    assert not os.path.exists("unused.dot")


@pytest.mark.parametrize("k", ["0", "-3", "two"])
def test_error_bad_k(capsys, captured, k):
    _, f = captured
    rc, _, err = cli(capsys, "paths", f, "--k", k)
    assert "k" in one_line_error(rc, err)


def test_error_bad_top_and_choice(capsys, captured):
    _, f = captured
    one_line_error(*cli(capsys, "flow", f, "--top", "0")[::2])
    assert "--by" in one_line_error(*cli(capsys, "flow", f, "--by", "layer")[::2])
    one_line_error(*cli(capsys)[::2])                                   # no command


def test_error_unknown_image_format(capsys, captured, tmp_path):
    _, f = captured
    msg = one_line_error(*cli(capsys, "render", f, "-o", tmp_path / "top.jpg")[::2])
    assert "jpg" in msg and ".svg" in msg and ".dot" in msg


def test_error_existing_outputs(capsys, captured, tmp_path):
    _, f = captured
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"precious")
    msg = one_line_error(*cli(capsys, "capture", SPEC, "--out", out)[::2])
    assert "--overwrite" in msg and out.read_bytes() == b"precious"
    img = tmp_path / "exists.dot"
    img.write_text("precious")
    assert "--overwrite" in one_line_error(*cli(capsys, "render", f, "-o", img)[::2])
    assert img.read_text() == "precious"
    rc, out_, _ = cli(capsys, "render", f, "--k", "1", "-o", img, "--overwrite")
    assert rc == 0 and pydot.graph_from_dot_file(str(img))


def test_error_bad_specs(capsys, tmp_path):
    out = tmp_path / "g.safetensors"
    spec = tmp_path / "specs.py"
    spec.write_text(textwrap.dedent("""
        import torch
        def three():
            return torch.nn.Linear(2, 1), (torch.randn(1, 2),), {}
        def not_a_model():
            return "model", (), {}, None
        def bad_output():
            return torch.nn.Linear(2, 1), (torch.randn(1, 2),), {}, 42
        def raises():
            raise RuntimeError("no weights here")
        def non_scalar():
            return torch.nn.Linear(2, 3), (torch.randn(1, 2),), None, None
        value = 3
    """))
    cases = {
        f"{tmp_path / 'missing.py'}:build": "does not exist",
        f"{spec}:nothing": "no function 'nothing'",
        f"{spec}:value": "no function 'value'",
        f"{spec}:three": "must return (model, args, kwargs, output_fn)",
        f"{spec}:not_a_model": "torch.nn.Module",
        f"{spec}:bad_output": "output_fn must be callable",
        f"{spec}:raises": "no weights here",
        f"{spec}:non_scalar": "scalar",
        "no_such_package_xyz.models:build": "cannot import",
        "build": "use path/to/file.py:function",
    }
    for s, expected in cases.items():
        msg = one_line_error(*cli(capsys, "capture", s, "--out", out)[::2])
        assert expected in msg, (s, msg)
        assert not out.exists()


def test_capture_from_module_spec(capsys, tmp_path, monkeypatch):
    """``package.module:function`` specs, sources and granularity options; result checked by autograd."""
    import torch
    (tmp_path / "mlp_spec.py").write_text(textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Softmax(-1), torch.nn.Linear(4, 2)).double()
            return m, (torch.randn(2, 3, dtype=torch.double),), None, lambda y: y[1, 0] - y[0, 1]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "mlp.safetensors"
    rc, stdout, err = cli(capsys, "capture", "mlp_spec:build", "--out", out, "--granularity", "primitive")
    assert rc == 0, err
    assert err == ""                                         # no progress bar when not a terminal
    g = gg.load(out)
    assert g.granularity == "primitive"
    import mlp_spec
    m, (x,), _, fn = mlp_spec.build()
    x.requires_grad_(True)
    (want,) = torch.autograd.grad(fn(m(x)), x)
    torch.testing.assert_close(g.gradient()["input"], want)
    rc, _, err = cli(capsys, "capture", "mlp_spec:build", "--out", out, "--overwrite", "--sources", "0",
                     "--progress")
    assert rc == 0
    assert "gradgraph capture" in err                       # the tqdm bar, forced on
    assert list(gg.load(out).sources) == ["0"]


def test_render_node_cap_is_a_plain_note(capsys, captured, tmp_path):
    _, f = captured
    rc, out, err = cli(capsys, "render", f, "--k", "4", "--collapse", "none", "--max-nodes", "6",
                       "-o", tmp_path / "cap.dot")
    assert rc == 0 and "wrote" in out
    assert err.startswith("gradgraph: note: ") and "max_nodes=6" in err and "Warning" not in err
    (dot,) = pydot.graph_from_dot_file(str(tmp_path / "cap.dot"))
    assert dot.get_node("note")


# ============================================================================ hardening
def _nonfinite_graph_file(path):
    """A three-node graph whose values, gradient and flows hold inf and NaN: x -> x * w -> sum,
    w = (1e300, inf, -2), the sink value NaN. Built by hand (the values are the point)."""
    from gradgraph.graph import Edge, GradGraph, Node
    from gradgraph.jacobians import SparseJacobian
    x, w = np.array([1.0, 2.0, 3.0]), np.array([1e300, np.inf, -2.0])
    nodes = [Node("x", "input", (3,), "float64", value=x, role="source"),
             Node("mul", "aten.mul.Tensor", (3,), "float64", value=x * w, module="scale"),
             Node("sum", "aten.sum.default", (), "float64", value=np.array(np.nan), role="sink")]
    edges = [Edge(0, 1, SparseJacobian((3,), (3,), None, None, w)),
             Edge(1, 2, SparseJacobian((), (3,), np.zeros(3, dtype=int), None, None))]
    g = GradGraph(nodes, edges, {"x": 0}, 2, "function", {"sink_value": float("nan"), "scale": [np.inf]})
    g.save(str(path))
    return gg.load(str(path))


def _strict_loads(text):
    """json.loads that refuses NaN and Infinity (Python's json accepts them; JSON does not)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("argv", [
    ["info"], ["entropy", "--per-source"], ["flow", "--by", "node"], ["flow", "--by", "module"],
    ["flow", "--by", "element", "--top", "7"], ["paths", "--k", "2"],
    ["paths", "--k", "2", "--order", "magnitude"]])
def test_json_output_is_strict_with_inf_and_nan(capsys, tmp_path, argv):
    """Every --json output is RFC 8259 JSON: non-finite numbers are null, as docs/cli.md says."""
    g = _nonfinite_graph_file(tmp_path / "nonfinite.safetensors")
    rc, out, err = cli(capsys, *argv[:1], tmp_path / "nonfinite.safetensors", *argv[1:], "--json")
    assert rc == 0, err
    doc = _strict_loads(out)
    if argv[0] == "info":
        assert doc["sink"]["value"] is None and doc["meta"] == {"sink_value": None, "scale": [None]}
    if argv[0] == "flow":
        by = argv[2]
        api = g.flow(by=by)
        # the premise: this graph has infinite flows
        assert any(not np.all(np.isfinite(v)) for v in api.values())
        for item in doc["top"]:
            want = (np.asarray(api[item["node"]])[tuple(item["index"])] if by == "element"
                    else api[item[by]])
            assert item["flow"] == (float(want) if np.isfinite(want) else None)
    if argv[0] == "entropy":
        want = g.entropy(per_source=True)["x"]
        assert doc["per_source"]["x"]["values"] == [float(v) if np.isfinite(v) else None for v in want]


def test_strict_json_mapping_covers_numpy_and_nesting():
    from gradgraph.cli import _strict_json
    obj = {"a": [1.5, float("inf"), np.float32("nan"), np.float64(-np.inf), (np.int64(3), "s", None)],
           "b": {"c": np.float64(2.0), "d": True}}
    assert _strict_json(obj) == {"a": [1.5, None, None, None, [3, "s", None]], "b": {"c": 2.0, "d": True}}
    assert _strict_loads(json.dumps(_strict_json(obj), allow_nan=False))


@pytest.mark.parametrize("max_nodes", ["0", "-1", "2"])
def test_render_max_nodes_below_three_is_an_error(capsys, tmp_path, max_nodes):
    g = _nonfinite_graph_file(tmp_path / "g.safetensors")
    assert g is not None
    out = tmp_path / "top.dot"
    msg = one_line_error(*cli(capsys, "render", tmp_path / "g.safetensors", "--max-nodes", max_nodes,
                              "-o", out)[::2])
    assert "--max-nodes" in msg and max_nodes in msg
    assert not out.exists()


def test_spec_calling_sys_exit_is_a_one_line_error(capsys, tmp_path):
    """sys.exit in a spec (at import, in the function, or in the model while capturing) is a bad
    spec: one line and status 2, never a silent exit with the spec's own status."""
    out = tmp_path / "g.safetensors"
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(5)\n")
    (tmp_path / "exits.py").write_text(textwrap.dedent("""
        import sys
        import torch
        def build():
            sys.exit(7)
        def build_quiet():
            sys.exit()
        class Quits(torch.nn.Module):
            def forward(self, x):
                sys.exit(3)
        def build_model_exits():
            return Quits(), (torch.randn(2),), None, None
    """))
    cases = {f"{tmp_path / 'exits_on_import.py'}:build": "sys.exit(5)",
             f"{tmp_path / 'exits.py'}:build": "sys.exit(7)",
             f"{tmp_path / 'exits.py'}:build_quiet": "sys.exit(None)",
             f"{tmp_path / 'exits.py'}:build_model_exits": "sys.exit(3)"}
    for spec, expected in cases.items():
        msg = one_line_error(*cli(capsys, "capture", spec, "--out", out)[::2])
        assert expected in msg, (spec, msg)
        assert not out.exists()
    # and in a real process: the exit status is 2, not the spec's
    r = run("capture", f"{tmp_path / 'exits.py'}:build", "--out", out)
    assert "sys.exit(7)" in one_line_error(r.returncode, r.stderr)


def test_broken_graph_file_is_one_line(capsys, tmp_path):
    """A file that breaks the graph's invariants (here: no sources) is a one-line error in every
    command, not a traceback from inside a query."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    _nonfinite_graph_file(tmp_path / "g.safetensors")
    with safe_open(str(tmp_path / "g.safetensors"), framework="np") as f:
        meta, arrays = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta["graph"])
    doc["sources"] = {}
    meta["graph"] = json.dumps(doc)
    bad = tmp_path / "nosources.safetensors"
    save_file(arrays, str(bad), metadata=meta)
    for argv in (["info"], ["paths"], ["entropy"], ["flow"], ["render", "-o", tmp_path / "x.dot"]):
        msg = one_line_error(*cli(capsys, argv[0], bad, *argv[1:])[::2])
        assert "no sources" in msg, msg
