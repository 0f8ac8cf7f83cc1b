"""The package's structure: layers without import cycles, the capture package reachable as a
package, and captured models that can be freed."""
from __future__ import annotations

import ast
import gc
import pathlib
import subprocess
import sys
import weakref

import networkx as nx
import torch

import gradgraph as gg

PACKAGE = pathlib.Path(gg.__file__).parent


def _modules():
    """{dotted module name: (path, is_package)} of every module under gradgraph/."""
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def import_graph():
    """Directed graph module -> module it imports, from every import statement of the package
    (module level and inside functions alike). ``from X import y`` counts as importing the
    module ``X.y`` when that is a module, else ``X``."""
    mods = _modules()
    G = nx.DiGraph()
    for name, (path, is_pkg) in mods.items():
        G.add_node(name)
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                for a in node.names:
                    targets.append(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
            for t in targets:
                while t and t not in mods:          # "gradgraph.x.y.attr" -> nearest module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    G.add_edge(name, t)
    return G


def test_the_import_graph_is_built_from_the_sources():
    G = import_graph()
    assert G.has_edge("gradgraph.algorithms.semirings", "gradgraph.algorithms.products")
    assert G.has_edge("gradgraph.export.fileformat", "gradgraph.graph")
    assert G.has_edge("gradgraph.graph", "gradgraph.algorithms.api")          # an import inside a method


def test_no_module_imports_in_a_cycle():
    cycles = list(nx.simple_cycles(import_graph()))
    assert cycles == [], f"import cycles: {cycles}"


def test_jacobians_import_nothing_from_algorithms():
    G = import_graph()
    jac = [m for m in G if m == "gradgraph.jacobians" or m.startswith("gradgraph.jacobians.")]
    assert len(jac) > 3
    reached = set().union(*(nx.descendants(G, m) for m in jac))
    assert not {m for m in reached if m.startswith("gradgraph.algorithms")}
    # kinds sit right above errors and the thread policy (a leaf: it imports only errors)
    assert reached <= {"gradgraph.errors", "gradgraph.threads"} | set(jac)


def test_algorithms_never_import_capture():
    """Queries run on saved graphs: nothing in algorithms reaches capture (or torch.export)."""
    G = import_graph()
    alg = [m for m in G if m.startswith("gradgraph.algorithms")]
    reached = set().union(*(nx.descendants(G, m) for m in alg))
    assert not {m for m in reached if m.startswith("gradgraph.capture")}


def test_capture_package_and_function_share_the_name():
    code = ("import gradgraph.capture.rules, gradgraph.capture.registry as r, gradgraph as gg\n"
            "from unittest import mock\n"
            "assert gg.capture.registry is r and gg.capture.rules.__name__ == 'gradgraph.capture.rules'\n"
            "with mock.patch('gradgraph.capture.tracer.record', side_effect=RuntimeError('patched')):\n"
            "    import torch\n"
            "    try:\n"
            "        gg.capture(torch.nn.Linear(2, 1), (torch.ones(1, 2),), output=lambda y: y[0, 0])\n"
            "    except RuntimeError as e:\n"
            "        assert str(e) == 'patched'\n"
            "    else:\n"
            "        raise AssertionError('mock.patch did not reach the tracer')\n"
            "print(gg.capture.DENSE_FALLBACK_MAX_ENTRIES)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(gg.capture.registry.DENSE_FALLBACK_MAX_ENTRIES)


def test_a_captured_model_is_freed():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    g = gg.capture(model, (x,), output=lambda y: y.sum())
    g2 = gg.capture(model, (x,), output=lambda y: y.sum())           # from the cache
    assert len(g2.nodes) == len(g.nodes)
    ref = weakref.ref(model)
    del model, g, g2
    gc.collect()
    assert ref() is None


def test_a_capturer_frees_its_model_with_it():
    model = torch.nn.Linear(3, 1).double()
    cap = gg.Capturer(model, lambda y: y[0, 0])
    g = cap.capture((torch.randn(1, 3, dtype=torch.float64),))
    ref = weakref.ref(model)
    del model, cap, g
    gc.collect()
    assert ref() is None
