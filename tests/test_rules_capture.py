"""Small models built around the ops of the rule families: captured, their gradient equals
torch.autograd's at rtol 1e-10 in float64, and no op falls to the dense fallback.

Each model's sink weights every output element differently (a fixed random tensor), so a wrong
index map cannot cancel out."""
import pytest
import torch
import torch.nn.functional as F

import gradgraph as gg


class RepeatKV(torch.nn.Module):
    """Grouped-query attention's key/value repetition: expand then reshape (a stride-0 input)."""

    def forward(self, x):
        k = x[:, None].expand(2, 3, 4).reshape(6, 4)
        return torch.tanh(k) * k


class Normalize(torch.nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1)


class GQAttention(torch.nn.Module):
    """Two query heads sharing one key/value head (Llama's repeat_kv), causal softmax attention."""

    def __init__(self, d=4):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, n * 2) for n in (2, 1, 1))

    def forward(self, x):
        T = x.shape[0]
        q = self.q(x).reshape(T, 2, 2).transpose(0, 1)
        k = self.k(x).reshape(T, 1, 2).transpose(0, 1)
        v = self.v(x).reshape(T, 1, 2).transpose(0, 1)
        k, v = (t[:, None].expand(1, 2, T, 2).reshape(2, T, 2) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MaskedAssign(torch.nn.Module):
    """``h[~mask] = 0`` (index_put with a boolean mask) and ``h[mask] += y`` (accumulate)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.tensor([[True, False, True, True], [False, True, True, False]]))

    def forward(self, x):
        h = torch.sin(x) * 2        # (a product by a constant: autograd keeps nothing of h)
        h[~self.mask] = 0
        h[self.mask] += x[self.mask] ** 2
        return h


class ColumnAssign(torch.nn.Module):
    """``out[:, i] = ...`` in a loop (copy, select / slice scatter) and ``out[:, 1:] = ...``."""

    def forward(self, x):
        out = torch.zeros(2, 3, 4, dtype=x.dtype)
        for i in range(3):
            out[:, i] = x[:, i] * (i + 1) + out[:, i - 1]
        out[:, 1:] = out[:, 1:] + torch.tanh(out[:, :-1])
        return out.masked_fill(x > 1.0, -1.0)


class Scatters(torch.nn.Module):
    def forward(self, x):
        z = torch.zeros(2, 5, dtype=x.dtype).scatter_add(1, torch.tensor([[0, 1, 1, 4]] * 2), x)
        z = z.index_add(0, torch.tensor([1, 0]), z * z, alpha=0.5)
        z = z.index_copy(1, torch.tensor([0, 2]), x[:, :2] * 3)
        return z.scatter(1, torch.tensor([[3], [2]]), torch.sin(x[:, :1]))


class CumsumProd(torch.nn.Module):
    def forward(self, x):
        c = torch.cumsum(x, 1)
        return torch.cat([c.prod(-1), torch.prod(c).reshape(1), (x * (x > 0)).prod(0)])   # zeros in the last


def _conv_model(conv, shape):
    def make():
        return torch.nn.Sequential(conv, torch.nn.Tanh()), torch.randn(*shape, dtype=torch.float64)
    return make


MODELS = {
    "repeat_kv": lambda: (RepeatKV(), torch.randn(2, 4, dtype=torch.float64)),
    "normalize": lambda: (Normalize(), torch.randn(3, 4, dtype=torch.float64)),
    "gqa_attention": lambda: (GQAttention(), torch.randn(3, 4, dtype=torch.float64)),
    "masked_assign": lambda: (MaskedAssign(), torch.randn(2, 4, dtype=torch.float64)),
    "column_assign": lambda: (ColumnAssign(), torch.randn(2, 3, 4, dtype=torch.float64)),
    "scatters": lambda: (Scatters(), torch.randn(2, 4, dtype=torch.float64)),
    "cumsum_prod": lambda: (CumsumProd(), torch.randn(3, 4, dtype=torch.float64)),
    "conv_transpose1d": _conv_model(torch.nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1),
                                    (2, 2, 5)),
    "conv_transpose2d": _conv_model(torch.nn.ConvTranspose2d(4, 2, (3, 2), stride=(2, 1), padding=1, groups=2,
                                                             dilation=(1, 2)), (1, 4, 3, 4)),
    "conv_transpose3d": _conv_model(torch.nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 2, 3, 2)),
    "conv3d": _conv_model(torch.nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=1, groups=2), (1, 2, 3, 5, 4)),
}


#: ops each model's graph must contain (so the test exercises the rule it is named for)
OPS = {
    "repeat_kv": {"expand", "clone"}, "normalize": {"expand", "div"}, "gqa_attention": {"expand", "_softmax"},
    "masked_assign": {"index_put"}, "column_assign": {"copy", "slice_scatter"},
    "scatters": {"scatter_add", "index_put", "scatter"}, "cumsum_prod": {"cumsum", "prod"},
    "conv_transpose1d": {"convolution"}, "conv_transpose2d": {"convolution"},
    "conv_transpose3d": {"convolution"}, "conv3d": {"convolution"},
}


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_matches_autograd(name, no_dense_fallback):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model = model.double().eval()
    with torch.no_grad():
        weights = torch.randn(model(x.clone()).shape, dtype=torch.float64)

    def sink(y):
        return (y * weights).sum()

    g = gg.capture(model, (x,), output=sink)
    ops = {n.op.split(".")[1] for n in g.nodes if n.op.startswith("aten.")}
    assert OPS[name] <= ops, f"{name}: expected {OPS[name] - ops} in the graph"
    (got,) = g.gradient().values()
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(sink(model(leaf)), leaf)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
