"""The README's demo and its bundled model (FirstTokenRepeatedOnce, paper §5.1)."""
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph import demo
from gradgraph.toy import LENGTH, VOCAB, load_model, make_dataset


def test_dataset_labels_follow_the_task_definition():
    ids, labels = make_dataset(400, seed=3)
    assert ids.shape == (400, LENGTH) and int(ids.max()) < VOCAB
    repeats = (ids[:, 1:] == ids[:, :1]).sum(1)
    assert torch.equal(labels, (repeats == 1).long())        # the first token appears again exactly once
    assert int(repeats.max()) <= 1
    assert labels.sum().item() == 200                         # balanced


def test_bundled_model_solves_the_task():
    model = load_model()
    ids, labels = make_dataset(500, seed=123)                 # fresh examples, not the training seed
    with torch.no_grad():
        acc = (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()
    assert acc > 0.95


def test_demo_writes_graph_and_diagram(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--k", "3"]) == 0
    out = capsys.readouterr().out
    # the printed gradient check is against torch.autograd, float32 model
    err = float(out.split("max |difference| = ")[1].split()[0])
    assert err < 1e-4
    g = gg.load(tmp_path / "graph.safetensors")
    ids = torch.tensor([demo.DEFAULT_TOKENS])
    model = load_model()
    ref = demo._autograd_gradient(model, ids, 1)
    np.testing.assert_allclose(g.gradient()[demo.WORD_EMB].numpy(), ref.numpy(), rtol=1e-4, atol=1e-6)
    if shutil.which("dot"):
        svg = tmp_path / "top_paths.svg"
        ET.parse(svg)                                         # valid XML
    else:
        assert (tmp_path / "top_paths.dot").read_text().startswith(("digraph", "strict digraph"))


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path), "--k", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path), "--tokens"] + ["99"] * LENGTH)
    assert e.value.code == 2
