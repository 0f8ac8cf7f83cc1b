"""The HTML report (opened in headless Chromium), the notebook display and the graph JSON.

Oracles: the report's path highlighting is checked against the hops of ``g.top_paths`` collapsed
by module here (not by the diagram code); gradient x input against ``torch.autograd``; the layer
heatmap's shape against the model's config; the JSON against ``g.to_networkx(level="scalar")`` and a
brute-force flow computed on that networkx graph.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.cli import main
from gradgraph.toy import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = [3, 7, 1, 9, 3, 4, 0, 12, 5, 8]
LABELS = [f"w{t}" for t in TOKENS]
WORD_EMB = "bert.embeddings.word_embeddings"
K = 6


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def g(model):
    ids = torch.tensor([TOKENS])
    return gg.capture(model, (), {"input_ids": ids}, output=lambda out: out.logits[0, 1])


@pytest.fixture(scope="module")
def graph_file(g, tmp_path_factory):
    f = tmp_path_factory.mktemp("report") / "ftro.safetensors"
    g.save(f)
    return f


# ------------------------------------------------------------------ independent expectations
def module_boxes(g, path):
    """The boxes a path visits with collapse="module", as label first lines, sink first: the sink,
    then one per run of (non-view) hops in one module, then the source."""
    boxes = []
    for t, h in enumerate(path.hops):
        n = g.nodes[g.node_index(h.node)]
        if n.role == "sink":
            label = "sink = " + f"{g.sink_value:.4g}"
        elif n.role == "source":
            label = n.name
        elif n.is_view and t < len(path.hops) - 1:
            continue
        else:
            label = n.module or "<top level>"
        if not boxes or boxes[-1] != label or n.role in ("sink", "source"):
            boxes.append(label)
    return boxes


def expected_edges(g, path):
    """Forward (input -> output) box pairs of the path's diagram edges."""
    b = module_boxes(g, path)
    return {(b[i + 1], b[i]) for i in range(len(b) - 1) if b[i + 1] != b[i]}


def autograd_gradient_x_input(model):
    store = {}
    hook = model.bert.embeddings.word_embeddings.register_forward_hook(
        lambda mod, inp, out: store.__setitem__("emb", out))
    try:
        logit = model(input_ids=torch.tensor([TOKENS])).logits[0, 1]
    finally:
        hook.remove()
    grad = torch.autograd.grad(logit, store["emb"])[0]
    return (grad * store["emb"]).sum(-1)[0].detach().double().numpy()


# ------------------------------------------------------------------ the browser
def _browser():
    """Headless Debian Chromium through its chromedriver, with the console log recorded."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("headless Chromium and chromedriver are not installed (scripts/setup.sh installs "
                    "them with apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1800"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture(scope="module")
def shown_paths(g):
    """The top paths of this model all take the same route through the modules, so the report
    shows the best path and, second, the best one whose route differs (then the next best)."""
    top = g.top_paths(k=40, include_views=True)
    other = [p for p in top if expected_edges(g, p) != expected_edges(g, top[0])]
    assert other, "no path with another route among the top 40"
    return [top[0], other[0]] + [p for p in top[1:] if p is not other[0]][:K - 2]


@pytest.fixture(scope="module")
def page(g, shown_paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "report.html"
    gg.report(g, out, paths=shown_paths, tokens=LABELS)
    drv = _browser()
    try:
        drv.get(out.as_uri())
        # the figures are drawn after the load event, one by one
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(drv, 300).until(lambda d: d.execute_script("return window.gradgraphReport.drawn !== null"))
        yield drv, out
    finally:
        drv.quit()


def test_report_is_self_contained(page):
    drv, out = page
    text = out.read_text(encoding="utf-8")
    assert "<script src" not in text and "<link " not in text
    assert text.count("<svg") >= 1 and "Plotly.newPlot" in text
    # the page loaded nothing besides itself (inline data: URIs aside)
    loaded = drv.execute_script("return performance.getEntriesByType('resource').map(function (e) { return e.name; });")
    assert [u for u in loaded if not u.startswith("data:")] == []


def test_no_console_errors(page):
    drv, _ = page
    logs = drv.get_log("browser")
    assert [e for e in logs if e["level"] == "SEVERE"] == []


def _diagram_edges(drv, selector):
    """(tail label, head label) of the SVG edges matching ``selector``, by each node's first line."""
    return set(map(tuple, drv.execute_script("""
        var svg = document.querySelector('#diagram svg');
        var first = {};
        svg.querySelectorAll('g.node').forEach(function (n) {
            first[n.querySelector('title').textContent] = n.querySelector('text').textContent;
        });
        return Array.from(svg.querySelectorAll(arguments[0])).map(function (e) {
            var ends = e.querySelector('title').textContent.split('->');
            return [first[ends[0]], first[ends[1]]];
        });""", selector)))


def test_clicking_the_second_path_highlights_exactly_it(page, g, shown_paths):
    from selenium.webdriver.common.by import By
    drv, _ = page
    paths = shown_paths
    items = drv.find_elements(By.CSS_SELECTOR, "#path-list li.path-item")
    assert len(items) == K
    items[1].click()
    on = _diagram_edges(drv, "g.edge.on")
    assert on == expected_edges(g, paths[1]) != expected_edges(g, paths[0])
    # every other edge is dimmed, and all diagram edges belong to some path
    assert _diagram_edges(drv, "g.edge:not(.on)") == \
        set().union(*(expected_edges(g, p) for p in paths)) - on
    # its hops are listed: module, op, element index, local derivative
    rows = drv.execute_script("""
        return Array.from(document.querySelectorAll('#hops-2 tr')).slice(1).map(function (r) {
            return Array.from(r.children).map(function (c) { return c.textContent; }); });""")
    assert drv.find_element(By.ID, "hops-2").is_displayed()
    assert not drv.find_element(By.ID, "hops-1").is_displayed()
    shown = [h for t, h in enumerate(paths[1].hops)
             if not g.nodes[g.node_index(h.node)].is_view or t in (0, len(paths[1].hops) - 1)]
    assert [r[3] for r in rows] == [str(list(h.index)) for h in shown]
    assert [r[1] for r in rows[1:-1]] == [h.module for h in shown[1:-1]]
    # the local derivatives (6 significant digits) multiply to the path's weight
    prod = math.prod(float(r[4]) for r in rows[1:])
    assert prod == pytest.approx(paths[1].weight, rel=1e-5)


def _trace(drv, div):
    return drv.execute_script(
        "var d = document.getElementById(arguments[0]); var t = d._fullData[0];"
        "return {z: t.z, x: t.x, images: d.querySelectorAll('.hm image, .heatmaplayer image').length,"
        "        ticks: Array.from(d.querySelectorAll('.xtick text')).map(function (e) { return e.textContent; })};",
        div)


def test_layer_heatmaps_have_one_cell_per_layer_and_component(page, model):
    drv, _ = page
    cfg = model.config
    flow = _trace(drv, "flow-heatmap")
    # heads, then attention, attention skip, MLP, MLP skip
    assert np.shape(flow["z"]) == (cfg.num_hidden_layers, cfg.num_attention_heads + 4)
    assert all(v is not None and v >= 0 for row in flow["z"] for v in row)
    assert flow["images"] >= 1            # drawn, not only declared
    branch = _trace(drv, "branch-heatmap")
    assert np.shape(branch["z"]) == (cfg.num_hidden_layers, len(TOKENS))
    assert branch["images"] >= 1 and branch["ticks"] == LABELS


def test_layer_flow_against_brute_force(page, g, model):
    """Each cell of the flow heatmap is the flow through its tensor, recomputed here on the networkx
    scalar graph; the tensors are found by module path."""
    drv, _ = page
    z = np.asarray(_trace(drv, "flow-heatmap")["z"], dtype=float)[0]      # the only layer
    text = np.asarray(drv.execute_script("return document.getElementById('flow-heatmap')._fullData[0].text;"))[0]
    ref = g.to_networkx(level="scalar")
    flow = brute_force_flow(ref, (g.sink, 0))
    Z = sum(flow[(i, j)] for i in g.sources.values() for j in range(g.nodes[i].numel))

    def tensor_flow(t):
        return np.array([flow[(t, j)] for j in range(g.nodes[t].numel)]).reshape(g.nodes[t].shape)

    layer = "bert.encoder.layer.0."
    softmax = [i for i, n in enumerate(g.nodes) if n.op_name == "_softmax" and n.module.startswith(layer)]
    attn = [i for i, n in enumerate(g.nodes) if n.module == layer + "attention.output.dense" and n.op_name == "addmm"]
    mlp = [i for i, n in enumerate(g.nodes) if n.module == layer + "output.dense" and n.op_name == "addmm"]
    block_in = [i for i, n in enumerate(g.nodes) if n.module == "bert.embeddings.LayerNorm" and not n.is_view][-1]
    heads = tensor_flow(softmax[0]).sum(axis=(0, 2, 3))
    a, m, x = tensor_flow(attn[0]).sum(), tensor_flow(mlp[0]).sum(), tensor_flow(block_in).sum()
    expected = list(heads) + [a, x - a, m, x - m]
    assert len(z) == len(expected) == model.config.num_attention_heads + 4
    # the model is float32; the page shows flow / Z, and the exact flow (6 digits) on hover
    np.testing.assert_allclose(z, np.array(expected) / Z, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(text.astype(float), expected, rtol=1e-5, atol=1e-9 * Z)


def test_token_strips(page, model):
    drv, _ = page
    gxi = _trace(drv, "tok-gxi-0")
    assert gxi["ticks"] == LABELS and gxi["images"] >= 1
    # the model computes in float32
    np.testing.assert_allclose(np.asarray(gxi["z"][0], dtype=float), autograd_gradient_x_input(model),
                               rtol=1e-4, atol=1e-6)
    for div in ("tok-best-0", "tok-entropy-0"):
        assert np.shape(_trace(drv, div)["z"]) == (1, len(TOKENS))


def brute_force_entropy(G, sink, groups):
    """(entropy of all paths, {group: entropy of the paths ending in it}) on the networkx scalar
    graph: the expectation semiring run down from the sink, <Z, R> = <sum |g|, -sum |g| log|g|>
    over sink -> u prefixes, summed over each group's source elements."""
    order = list(nx.topological_sort(G))
    Z, R = dict.fromkeys(order, 0.0), dict.fromkeys(order, 0.0)
    Z[sink] = 1.0
    for v in reversed(order):
        for u, _, d in G.in_edges(v, data=True):
            a = abs(d["w"])
            if a > 0:
                Z[u] += a * Z[v]
                R[u] += a * R[v] - a * math.log(a) * Z[v]
    sums = {}
    for u, grp in groups.items():
        z, r = sums.get(grp, (0.0, 0.0))
        sums[grp] = (z + Z[u], r + R[u])
    Zt, Rt = sum(z for z, _ in sums.values()), sum(r for _, r in sums.values())
    return math.log(Zt) + Rt / Zt, {grp: math.log(z) + r / z for grp, (z, r) in sums.items()}


def test_entropies_against_brute_force(page, g):
    """The summary's entropy (of all paths) and the per-token entropy strip, against the
    expectation semiring run on the networkx scalar graph."""
    from selenium.webdriver.common.by import By
    drv, _ = page
    ref = g.to_networkx(level="scalar")
    src = g.sources[WORD_EMB]
    hidden = g.nodes[src].shape[-1]
    H, per_token = brute_force_entropy(ref, (g.sink, 0), {(src, j): j // hidden for j in range(g.nodes[src].numel)})
    rows = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
            for r in drv.find_elements(By.CSS_SELECTOR, "table.summary tr")}
    shown = rows["entropy of the path distribution"]
    assert shown.endswith(" nats")
    # 6 significant digits on the page; the model computes in float32
    assert float(shown.split()[0]) == pytest.approx(H, rel=1e-5)
    strip = np.asarray(_trace(drv, "tok-entropy-0")["z"][0], dtype=float)
    np.testing.assert_allclose(strip, [per_token[t] for t in range(len(TOKENS))], rtol=1e-5)


def test_path_length_plot(page, g):
    drv, _ = page
    bars = drv.execute_script("var t = document.getElementById('path-lengths')._fullData[0];"
                              "return {x: t.x, y: t.y};")
    m = g.path_lengths()
    assert bars["x"] == [i for i in range(len(m)) if m[i] > 0]
    assert sum(bars["y"]) == pytest.approx(1.0, rel=1e-9)


def test_branches_of_several_nodes_at_once(g):
    """The report asks for the branches of several tensors with one pair of passes; each equals
    the query of that tensor alone."""
    names = [WORD_EMB] + [n.name for n in g.nodes if n.op_name == "native_layer_norm"]
    together = g.branches(names, groups=1)
    for name, br in zip(names, together):
        alone = g.branches(name, groups=1)
        assert br.node == alone.node == name and br.labels == alone.labels
        np.testing.assert_array_equal(br.best, alone.best)
        np.testing.assert_array_equal(br.log_abs, alone.log_abs)
        np.testing.assert_array_equal(br.sign, alone.sign)


# ------------------------------------------------------------------ notebook display
def test_notebook_display(g):
    text = g._repr_html_()
    assert g.sink_node.name in text and "<svg" in text and WORD_EMB in text
    paths = g.top_paths(k=3)
    assert isinstance(paths, list) and paths == list(paths)
    html = paths._repr_html_()
    assert html.count("<tr>") == 4 and "<svg" in html
    assert all(f"path{r}" in html for r in (1, 2, 3)) and "path4" not in html


# ------------------------------------------------------------------ JSON
def _scalar_edges(G):
    return {(u, v, d["edge"]): d["w"] for u, v, d in G.edges(data=True)}


def test_json_round_trip_paths(g):
    paths = g.top_paths(k=5, include_views=True)
    data = json.loads(json.dumps(gg.to_json(g, paths)))
    G = nx.node_link_graph(data, edges="links")
    ref = g.to_networkx(level="scalar")
    key = {n: (d["tensor"], d["flat_index"]) for n, d in G.nodes(data=True)}
    hops = [[(g.node_index(h.node), h.flat_index) for h in p.hops] for p in paths]
    assert set(key.values()) == set().union(*map(set, hops))
    assert len(key) == len(set(key.values()))
    for n, d in G.nodes(data=True):
        r = ref.nodes[key[n]]
        assert (d["module"], d["op"], tuple(d["index"])) == (r["module"], r["op"], r["index"])
    ref_w = _scalar_edges(ref)
    got = {(key[u], key[v], k): d["weight"] for u, v, k, d in G.edges(keys=True, data=True)}
    assert {(a, b) for a, b, _ in got} == {(hp[t + 1], hp[t]) for hp in hops for t in range(len(hp) - 1)}
    for e, w in got.items():
        assert w == ref_w[e]
    assert data["metadata"]["selection"] == {"kind": "paths", "k": 5, "order": "signed"}
    assert [p["rank"] for p in data["metadata"]["paths"]] == [1, 2, 3, 4, 5]


def brute_force_flow(G, sink):
    """flow(u) = (sum over sink -> u prefixes of |product|) * (sum over u -> source suffixes),
    on the networkx scalar graph (edges point forward, towards the sink)."""
    order = list(nx.topological_sort(G))
    down = {u: 0.0 for u in order}          # |paths| from the sink down to u
    down[sink] = 1.0
    for v in reversed(order):
        for u, _, d in G.in_edges(v, data=True):
            down[u] += down[v] * abs(d["w"])
    up = {u: (1.0 if G.in_degree(u) == 0 and G.nodes[u]["role"] == "source" else 0.0) for u in order}
    for v in order:
        for u, _, d in G.in_edges(v, data=True):
            up[v] += up[u] * abs(d["w"])
    return {u: down[u] * up[u] for u in order}


def test_json_flow_threshold_against_brute_force(g):
    ref = g.to_networkx(level="scalar")
    flow = brute_force_flow(ref, (g.sink, 0))
    Z = sum(flow[(i, j)] for i in g.sources.values() for j in range(g.nodes[i].numel))
    values = np.sort(np.array([f / Z for f in flow.values()]))
    # a threshold far (relatively) from every element's flow, so rounding cannot move an element
    gaps = np.flatnonzero(np.diff(values) > 1e-6 * values[1:])
    x = float(next((values[i] + values[i + 1]) / 2 for i in gaps if values[i] > 0.02))
    data = gg.to_json(g, flow_threshold=x)
    G = nx.node_link_graph(data, edges="links")
    key = {n: (d["tensor"], d["flat_index"]) for n, d in G.nodes(data=True)}
    kept = {u for u, f in flow.items() if f >= x * Z}
    assert set(key.values()) == kept
    for n, d in G.nodes(data=True):
        # the model is float32: the library's products run in the weights' dtype
        assert d["flow"] == pytest.approx(flow[key[n]], rel=1e-6)
    ref_sub = _scalar_edges(ref.subgraph(kept))
    got = {(key[u], key[v], k): d["weight"] for u, v, k, d in G.edges(keys=True, data=True)}
    assert got == ref_sub


def test_json_bad_selection(g):
    with pytest.raises(gg.QueryError, match="flow_threshold"):
        gg.to_json(g, flow_threshold=0)
    with pytest.raises(gg.QueryError, match="not both"):
        gg.to_json(g, g.top_paths(k=1), flow_threshold=0.1)


# ------------------------------------------------------------------ command line
def run(*args):
    return subprocess.run([sys.executable, "-m", "gradgraph", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def test_cli_report_and_export(graph_file, tmp_path):
    out = tmp_path / "r.html"
    r = run("report", graph_file, "-o", out, "--k", "3", "--tokens", *LABELS)
    assert r.returncode == 0, r.stderr
    assert f"({os.path.getsize(out) / 1e6:.2f} MB)" in r.stdout
    text = out.read_text(encoding="utf-8")
    assert text.count('class="path-item"') == 3 and "w12" in text
    j = tmp_path / "top.json"
    assert main(["export", str(graph_file), "--json", str(j), "--k", "4"]) == 0
    data = json.loads(j.read_text())
    assert data["metadata"]["selection"]["k"] == 4 and data["links"]


def one_line_error(rc, err):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradgraph: error: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_user_errors(graph_file, tmp_path, capsys):
    r = run("report", tmp_path / "missing.safetensors", "-o", tmp_path / "r.html")
    assert "no such file" in one_line_error(r.returncode, r.stderr)
    cases = [
        (["report", str(graph_file), "-o", str(tmp_path / "r.html"), "--k", "0"], "--k must be >= 1"),
        (["report", str(graph_file), "-o", str(tmp_path / "no" / "r.html")], "does not exist"),
        (["report", str(graph_file), "-o", str(graph_file)], "exists"),
        (["report", str(graph_file), "-o", str(tmp_path / "r.html"), "--tokens", "a", "b"], "token labels"),
        (["export", str(tmp_path / "missing.safetensors"), "--json", str(tmp_path / "a.json")], "no such file"),
        (["export", str(graph_file), "--json", str(tmp_path / "a.json"), "--k", "-1"], "--k must be >= 1"),
        (["export", str(graph_file), "--json", str(tmp_path / "no" / "a.json")], "does not exist"),
        (["export", str(graph_file), "--json", str(tmp_path / "a.json"), "--k", "2",
          "--flow-threshold", "0.1"], "not both"),
        (["export", str(graph_file), "--json", str(tmp_path / "a.json"), "--flow-threshold", "1.5"],
         "flow_threshold"),
    ]
    for argv, msg in cases:
        rc = main(argv)
        assert msg in one_line_error(rc, capsys.readouterr().err), argv
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "a.json").exists()


def test_layer_structure_of_gpt2():
    """GPT-2 names its blocks transformer.h.N with attn / mlp sublayers: each block's attention and
    MLP outputs are their c_proj linear maps, its heads the softmax, its input the residual stream
    (the embeddings' sum, then the previous block's last residual add)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gradgraph.export.report import layer_structure
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 50, (1, 6))
    g = gg.capture(model, (ids,), output=lambda o: o.logits[0, -1, 3] - o.logits[0, -1, 4])
    layers = layer_structure(g)
    assert [lay.prefix for lay in layers] == ["transformer.h.0", "transformer.h.1"]
    adds = [i for i, n in enumerate(g.nodes) if n.op_name == "add" and not n.is_view]
    for N, lay in enumerate(layers):
        att, mlp = g.nodes[lay.attention], g.nodes[lay.mlp]
        assert (att.module, att.op_name) == (f"transformer.h.{N}.attn.c_proj", "addmm")
        assert (mlp.module, mlp.op_name) == (f"transformer.h.{N}.mlp.c_proj", "addmm")
        assert [tuple(g.nodes[s].shape) for s in lay.softmax] == [(1, 2, 6, 6)]
        # the block input: the last residual-stream add before the block's first op
        first = min(i for i, n in enumerate(g.nodes) if n.module.startswith(f"transformer.h.{N}."))
        assert lay.input == max(i for i in adds if i < first)
