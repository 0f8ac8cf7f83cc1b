"""The per-process cache of weight transforms (|W|, -|W| log|W|, transposed copies, zero columns):
inside ``WEIGHT_CACHE.active()`` graphs of one model share them, a weight changed in place is never
answered from the cache (|W| and -|W| log|W| are compared with the weight, so a ``.data`` edit is
seen too), and outside a block nothing is kept.
Answers are checked against the brute-force path oracle (tests/oracle.py) and dense Jacobians."""
import gc
import math

import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.algorithms.products import product
from gradgraph.algorithms.semirings import ENTROPY, MAGNITUDE, MAX_SIGNED
from gradgraph.jacobians import MatmulJacobian
from gradgraph.jacobians import WEIGHT_CACHE, WeightCache
from oracle import ScalarOracle, tiny_mlp


@pytest.fixture()
def fresh_cache():
    """An open block of the process's cache, empty at the start and the end."""
    WEIGHT_CACHE.clear()
    with WEIGHT_CACHE.active():
        yield WEIGHT_CACHE
    WEIGHT_CACHE.clear()


def _linear_jacobian(weight, rows=3):
    """d(x @ weight.T)/dx for x of shape (rows, in), as the addmm rule builds it (the weight's
    transpose, viewing the weight's memory)."""
    out_f, in_f = weight.shape
    return MatmulJacobian((rows, out_f), (rows, in_f), weight.detach().t().numpy(), "left")


def _dense_products(jac, z, r, x):
    """Oracle from the dense Jacobian (built from out_edges, not from the products): the entropy
    pair (|J|^T z, |J|^T r + H^T z) with H = -|J| log|J|, and the signed max product of x."""
    J = jac.to_dense()
    A = np.abs(J)
    with np.errstate(divide="ignore", invalid="ignore"):
        H = np.where(A > 0, -A * np.log(A), 0.0)
    ent = np.vstack([A.T @ z, A.T @ r + H.T @ z])
    cand = np.where(J != 0, J * x[:, None], np.nan)          # (out, in): w * x_out per edge
    hi = np.nanmax(np.where(np.isnan(cand), -np.inf, cand), axis=0)
    lo = np.nanmin(np.where(np.isnan(cand), np.inf, cand), axis=0)
    return ent, hi, lo


def _products(jac, z, r, x):
    ent = product(ENTROPY, jac, np.vstack([z, r]), True)
    hi, lo = jac.max_product(x, x, True)
    return ent, hi, lo


def _check(jac, z, r, x):
    got, want = _products(jac, z, r, x), _dense_products(jac, z, r, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-12)


def _inputs(n, seed):
    g = np.random.default_rng(seed)
    return np.abs(g.normal(size=n)), g.normal(size=n), g.normal(size=n)


@pytest.mark.parametrize("change", ["mul_", "detach", "load_state_dict", "copy_"])
def test_a_weight_changed_in_place_is_computed_again(change, fresh_cache):
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4).double()
    layer.weight.data[0, 1] = 0.0                          # a zero weight: the zero-column path too
    z, r, x = _inputs(3 * 4, 1)
    first = _linear_jacobian(layer.weight)
    _check(first, z, r, x)
    hits = WEIGHT_CACHE.hits
    _check(_linear_jacobian(layer.weight), z, r, x)          # same weight: from the cache
    assert WEIGHT_CACHE.hits > hits
    before = _products(first, z, r, x)
    with torch.no_grad():
        if change == "mul_":
            layer.weight.mul_(-1.5)
        elif change == "detach":                           # an alias sharing the version counter
            layer.weight.detach()[2].add_(0.75)
        elif change == "load_state_dict":
            layer.load_state_dict({"weight": torch.randn(4, 5, dtype=torch.float64), "bias": layer.bias})
        else:
            layer.weight.copy_(torch.randn(4, 5, dtype=torch.float64))
    second = _linear_jacobian(layer.weight)
    _check(second, z, r, x)                                  # the new weight's answer, not the cached one
    assert not np.allclose(_products(second, z, r, x)[0], before[0])


def test_outside_a_block_nothing_is_kept():
    """Outside an active() block (an interactive session) a query holds no weight transform beyond
    the product that needs it (their memory would be up to twice the model's weights), and an edit
    through ``.data`` is answered with the edited weight."""
    WEIGHT_CACHE.clear()
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4).double()
    z, r, x = _inputs(3 * 4, 2)
    _check(_linear_jacobian(layer.weight), z, r, x)
    assert len(WEIGHT_CACHE) == 0 and WEIGHT_CACHE.nbytes == 0
    layer.weight.data.mul_(3.0)
    layer.weight.data[1, 2] = -0.25
    _check(_linear_jacobian(layer.weight), z, r, x)          # the edited weight's answer
    model, (xin,), _, out = tiny_mlp(seed=4, widths=(3, 4, 2), batch=2)
    g = gg.capture(model, (xin,), output=out)
    assert g.entropy() == pytest.approx(ScalarOracle(model, (xin,), output=out).entropy(), rel=1e-10)
    g.flow(by="node")
    assert len(WEIGHT_CACHE) == 0


@pytest.mark.parametrize("rows", [3, 20])
def test_the_max_kernels_transposed_weight_is_a_copy_per_product_outside_a_block(rows):
    """The dot-product form of the signed max product reads a linear layer's weight in the
    orientation the layer does not store. Outside a block that copy is made per product (by
    ``transpose_into``) and nothing weight-sized stays on the graph -- copies of every weight would
    cost a query the size of the model's contractions again -- and the dot form is taken only for
    enough rows to repay the copy (``DOT_MIN_ROWS``); inside a block the copy is kept in the cache
    and the graphs share it. Every way answers like the dense oracle, and all alike bit for bit."""
    from unittest import mock
    from gradgraph.jacobians import matmul as matmul_module
    WEIGHT_CACHE.clear()
    torch.manual_seed(3)
    w = torch.randn(150, 140, dtype=torch.float64)          # 150 outputs: a contraction >= 128 backward
    x = np.random.default_rng(5).normal(size=rows * 150)
    xmax, xmin = np.maximum(x, -x), np.minimum(x, -x)
    spies = dict(transpose=mock.patch.object(matmul_module, "transpose_into", wraps=matmul_module.transpose_into),
                 dot=mock.patch.object(matmul_module, "mm_maxmin_dot", wraps=matmul_module.mm_maxmin_dot))

    def run(jac):
        with spies["transpose"] as tr, spies["dot"] as dot:
            out = jac.max_product(xmax.copy(), xmin.copy(), True)
        return out, tr.call_count, dot.called

    jac = _linear_jacobian(w, rows)
    _, want_hi, want_lo = _dense_products(jac, np.zeros(rows * 150), np.zeros(rows * 150), xmax)
    want_lo = np.minimum(want_lo, _dense_products(jac, np.zeros(rows * 150), np.zeros(rows * 150), xmin)[2])
    want_hi = np.maximum(want_hi, _dense_products(jac, np.zeros(rows * 150), np.zeros(rows * 150), xmin)[1])
    answers = []
    for _ in range(2):                                          # outside a block: a copy each time
        (hi, lo), copies, dot = run(jac)
        assert dot == (rows >= matmul_module.DOT_MIN_ROWS) and copies == int(dot)
        answers.append((hi, lo))
    held = [v for v in jac._cache.values() if isinstance(v, np.ndarray) and v.size >= w.numel()]
    assert not held and len(WEIGHT_CACHE) == 0
    with WEIGHT_CACHE.active():
        made = 0
        for _ in range(2):                                      # inside: one copy, kept and shared
            (hi, lo), copies, dot = run(_linear_jacobian(w, rows))
            assert dot
            made += copies
            answers.append((hi, lo))
        assert made == 1
        assert len(WEIGHT_CACHE) >= 1 and WEIGHT_CACHE.hits >= 1
    WEIGHT_CACHE.clear()
    for hi, lo in answers:
        np.testing.assert_array_equal(hi, answers[0][0])
        np.testing.assert_array_equal(lo, answers[0][1])
        np.testing.assert_allclose(hi, want_hi, rtol=1e-12)
        np.testing.assert_allclose(lo, want_lo, rtol=1e-12)


def test_write_behind_the_version_counter_is_seen_inside_a_block(fresh_cache):
    """``.data`` has its own version counter: inside a block the transposed copies are answered on
    the version's word (the caller's promise), but |W| and -|W| log|W| are compared with the
    weight before use, so an edit through ``.data`` is seen: both are computed again."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4).double()
    z, r, x = _inputs(3 * 4, 2)
    jac = _linear_jacobian(layer.weight)
    product(ENTROPY, jac, np.vstack([z, r]), True)
    assert {key[-1] for key in WEIGHT_CACHE._entries} == {"abs", "xlogx"}
    checked, misses = WEIGHT_CACHE.checked_hits, WEIGHT_CACHE.misses
    layer.weight.data.mul_(3.0)
    layer.weight.data[1, 2] = -0.25
    with WEIGHT_CACHE.query():                               # a new query: the weight is compared
        jac = _linear_jacobian(layer.weight)
        got, want = product(ENTROPY, jac, np.vstack([z, r]), True), _dense_products(jac, z, r, x)[0]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert WEIGHT_CACHE.checked_hits == checked and WEIGHT_CACHE.misses > misses
    with WEIGHT_CACHE.query():                               # unchanged since: from the cache
        got = product(ENTROPY, _linear_jacobian(layer.weight), np.vstack([z, r]), True)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert WEIGHT_CACHE.checked_hits > checked


def _edit(weight, how):
    """Write new values into a weight behind its version counter, or through it."""
    new = torch.randn(weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(11))
    if how == "data":
        weight.data[0] = new[0]
    elif how == "data.copy_":
        weight.data.copy_(new)
    elif how == "numpy":
        weight.detach().numpy()[...] = new.numpy()
    else:                                                   # "copy_" under no_grad
        with torch.no_grad():
            weight.copy_(new)


@pytest.mark.parametrize("how", ["data", "data.copy_", "numpy", "copy_"])
def test_a_weight_edited_after_a_query_gives_the_new_entropy_and_flow(how, fresh_cache):
    """Inside a block a query keeps |W| and -|W| log|W| of every weight; after a weight is edited
    in place, by any route, the next graph's entropy and flow are the edited model's (brute-force
    path enumeration), and an unedited model's are answered from the kept transforms."""
    model, (x,), _, out = tiny_mlp(seed=5, widths=(3, 4, 2), batch=2)

    def check():
        g = gg.capture(model, (x,), output=out)
        o = ScalarOracle(model, (x,), output=out)
        h = g.entropy()
        assert h == pytest.approx(o.entropy(), rel=1e-10)
        flows, want = g.flow(by="node"), o.tensor_flow()
        for n in g.nodes:
            assert math.isclose(flows[n.name], float(want[n.fx_name].sum()), rel_tol=1e-10, abs_tol=1e-300)
        return h

    h1 = check()
    checked = WEIGHT_CACHE.checked_hits
    assert check() == h1 and WEIGHT_CACHE.checked_hits > checked    # unchanged: kept transforms
    _edit(model.layers[0].weight, how)
    assert check() != pytest.approx(h1, rel=1e-6)
    WEIGHT_CACHE.clear()


def test_a_sign_flip_keeps_the_transforms_and_the_entropy(fresh_cache):
    """The kept transforms depend on |W| alone: flipping signs through ``.data`` leaves them valid
    (answered from the cache), and the entropy of the flipped model -- whose path magnitudes are
    the same -- matches its enumeration."""
    model, (x,), _, out = tiny_mlp(seed=6, widths=(3, 4, 2), batch=2)
    h1 = gg.capture(model, (x,), output=out).entropy()
    model.layers[1].weight.data.neg_()
    checked = WEIGHT_CACHE.checked_hits
    g = gg.capture(model, (x,), output=out)
    assert g.entropy() == pytest.approx(ScalarOracle(model, (x,), output=out).entropy(), rel=1e-10)
    assert g.entropy() == pytest.approx(h1, rel=1e-12)
    assert WEIGHT_CACHE.checked_hits > checked
    WEIGHT_CACHE.clear()


def test_write_behind_the_version_counter_inside_a_block_needs_clear(fresh_cache):
    """Inside a block the promise is the caller's: clear() drops the cache after such a write, and a
    new block of another owner starts empty."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4).double()
    z, r, x = _inputs(3 * 4, 2)
    _check(_linear_jacobian(layer.weight), z, r, x)
    assert len(WEIGHT_CACHE) > 0
    layer.weight.data.mul_(3.0)
    WEIGHT_CACHE.clear()
    _check(_linear_jacobian(layer.weight), z, r, x)


def test_blocks_of_one_owner_keep_entries_and_another_owner_drops_them():
    WEIGHT_CACHE.clear()
    w = torch.randn(6, 7, dtype=torch.float64)
    a = w.t().numpy()
    with WEIGHT_CACHE.active("run-1"):
        WEIGHT_CACHE.get(a, "copy", lambda: np.ascontiguousarray(a))
    with WEIGHT_CACHE.active("run-1"):                     # the same owner's next item: still there
        assert WEIGHT_CACHE.get(a, "copy", lambda: pytest.fail("not cached")) is not None
        with WEIGHT_CACHE.active():                         # nested: the outer block's entries stay
            assert len(WEIGHT_CACHE) == 1
    with WEIGHT_CACHE.active("run-2"):
        assert len(WEIGHT_CACHE) == 0
    with WEIGHT_CACHE.active():
        assert len(WEIGHT_CACHE) == 0
    WEIGHT_CACHE.clear()


def test_graphs_of_one_model_share_transforms_and_see_a_changed_weight(fresh_cache):
    """Captured graphs against the brute-force oracle: the second graph of an unchanged model is
    answered from the cache; after an in-place change of a weight, the next graph's entropy and
    top paths are the changed model's."""
    model, (x,), _, out = tiny_mlp(seed=3, widths=(3, 4, 2), batch=2)

    def check(g, xin):
        o = ScalarOracle(model, (xin,), output=out)
        assert g.entropy() == pytest.approx(o.entropy(), rel=1e-10)
        best = o.best("signed")
        assert g.top_paths(k=1)[0].weight == pytest.approx(best.weight, rel=1e-10)
        assert g.top_paths(k=1, order="magnitude")[0].log_abs_weight == pytest.approx(o.best("magnitude").log_abs,
                                                                                    rel=1e-10)
        return g.entropy()

    h1 = check(gg.capture(model, (x,), output=out), x)
    hits = WEIGHT_CACHE.hits
    x2 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    check(gg.capture(model, (x2,), output=out), x2)
    assert WEIGHT_CACHE.hits > hits
    with torch.no_grad():
        model.layers[0].weight[1].mul_(-2.0)
        model.layers[1].weight.add_(0.3)
    h3 = check(gg.capture(model, (x,), output=out), x)
    assert h3 != pytest.approx(h1, rel=1e-6)


def test_entries_of_a_dropped_weight_go_and_memory_stays_in_budget():
    cache = WeightCache(max_bytes=3 * (8 * 6 * 7) + 3 * 64)     # room for three 6 x 7 float64 values
    with cache.active():
        _fill_and_drop(cache)


def _fill_and_drop(cache):
    weights = [torch.randn(6, 7, dtype=torch.float64) for _ in range(5)]
    for w in weights:
        a = w.t().numpy()
        got = cache.get(a, "copy", lambda a=a: np.ascontiguousarray(a))
        np.testing.assert_array_equal(got, w.t().numpy())
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 3                                  # the least recently used went first
    w = weights[-1]
    assert cache.get(w.t().numpy(), "copy", lambda: pytest.fail("not cached")) is not None
    del weights, w, a
    gc.collect()
    fresh = torch.randn(2, 2, dtype=torch.float64)
    cache.get(fresh.t().numpy(), "copy", lambda: np.ascontiguousarray(fresh.t().numpy()))
    assert len(cache) == 1                                  # the dropped weights' entries are gone


def test_views_of_the_weight_and_arrays_without_a_tensor_are_not_kept():
    cache = WeightCache()
    with cache.active():
        _views_and_plain_arrays(cache)


def _views_and_plain_arrays(cache):
    w = torch.randn(4, 3, dtype=torch.float64)
    a = w.numpy()
    assert cache.get(a, "same", lambda: np.ascontiguousarray(a)) is not None   # a view: nothing kept
    plain = np.ones((3, 3))
    cache.get(plain, "abs", lambda: np.abs(plain))
    assert len(cache) == 0 and cache.nbytes == 0


def test_float32_weight_max_and_magnitude_products_after_change(fresh_cache):
    """A float32 weight (products in float32: compared at float32 precision)."""
    torch.manual_seed(1)
    w = torch.randn(64, 200)
    x = np.random.default_rng(0).normal(size=2 * 64)
    mx1 = product(MAX_SIGNED, _linear_jacobian(w, rows=2), np.vstack([x, x]), True)
    with torch.no_grad():
        w.mul_(-2.0)
    jac = _linear_jacobian(w, rows=2)
    Jd = jac.to_dense()
    bound = 1e-6 * (np.abs(Jd).T @ np.abs(x))               # float32 roundoff of the sums
    assert np.all(np.abs(product(MAGNITUDE, jac, np.abs(x)[None], True)[0] - np.abs(Jd).T @ np.abs(x)) <= bound)
    mx2 = product(MAX_SIGNED, jac, np.vstack([x, x]), True)
    # weights times -2: the max becomes -2 x the old min, and the min -2 x the old max (exact)
    np.testing.assert_array_equal(np.asarray(mx2)[0], -2 * np.asarray(mx1)[1])
    np.testing.assert_array_equal(np.asarray(mx2)[1], -2 * np.asarray(mx1)[0])
    assert math.isfinite(float(np.asarray(mx1)[0].max()))


class _MLPBuild:
    """A build object: the worker sets the model up once and owns it."""

    def setup(self):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double().eval()

    def inputs(self, seed):
        x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        return (x,), {}, _margin


def _margin(y):
    return (y[:, 0] - y[:, 1]).sum()


def test_batch_workers_share_transforms_for_a_build_object_only(tmp_path):
    """In-process batch runs (workers=0): a build object's graphs hit the cache from the second item
    on; a build function's use only the transforms checked against the weights. Entropies against the brute-force oracle either way."""
    WEIGHT_CACHE.clear()
    build = _MLPBuild()
    hits = WEIGHT_CACHE.hits
    res = gg.batch.run([(i, i) for i in range(3)], build, ["entropy"], str(tmp_path / "object"), workers=0, progress=False)
    assert WEIGHT_CACHE.hits > hits
    model = build.setup()

    def function(seed):
        args, kwargs, out = build.inputs(seed)
        return model, args, kwargs, out

    WEIGHT_CACHE.clear()
    unchecked = WEIGHT_CACHE.hits - WEIGHT_CACHE.checked_hits
    res2 = gg.batch.run([(i, i) for i in range(3)], function, ["entropy", "top_paths"], str(tmp_path / "function"),
                        workers=0, progress=False)
    # only transforms checked against the weights (|W|, -|W| log|W|) were answered from the cache
    assert WEIGHT_CACHE.hits - WEIGHT_CACHE.checked_hits == unchecked
    assert {key[-1] for key in WEIGHT_CACHE._entries} <= {"abs", "xlogx"}
    for table in (res.table(), res2.table()):
        for _, row in table[table["query"] == "entropy"].iterrows() if "query" in table else table.iterrows():
            (x,), _, out = build.inputs(int(row["item"]))
            assert row["value"] == pytest.approx(ScalarOracle(model, (x,), output=out).entropy(), rel=1e-10)
    WEIGHT_CACHE.clear()
