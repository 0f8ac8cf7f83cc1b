"""The k-best lists read their candidates best first from a lazily sorted prefix
(``paths._Candidates``): read one by one they must be the whole candidate list in sorted order,
and the paths found the brute-force oracle's (tests/oracle.py) whatever the prefix's length."""
import numpy as np
import pytest

from gradgraph.algorithms import paths
from test_paths import MODELS, ORDERS, check_k_best, check_top_path


def _read_all(cand):
    rows, pos = [], 0
    while (row := cand.row(pos)) is not None:
        rows.append(row)
        pos += 1
    return rows


@pytest.mark.parametrize("prefix", [1, 3, 7, 4096])
@pytest.mark.parametrize("order", ORDERS)
def test_candidates_read_in_the_order_of_a_whole_sort(prefix, order, monkeypatch):
    """Many exact ties of the key (a few distinct log values), both signs, no-value entries
    (log -inf) and an infinite one: reading past every prefix gives np.lexsort's whole order."""
    monkeypatch.setattr(paths, "_SORTED_PREFIX", prefix)
    rank = paths._ORDERS[order]
    rng = np.random.default_rng(5)
    n = 300
    sgn = rng.choice([-1.0, 1.0], size=n)
    la = rng.choice([-3.0, -1.0, 0.5, 2.0, -np.inf], size=n)
    la[7] = np.inf
    t = rng.integers(0, 4, size=n)
    i = rng.permutation(n)                      # (t, i, k) distinct: a strict order
    k = rng.integers(0, 3, size=n)
    p = rng.integers(0, 2, size=n)
    w = rng.normal(size=n)
    rows = _read_all(paths._Candidates(rank, sgn, la, t, i, k, p, w))
    cls, val = rank.keys(sgn, la)
    idx = np.lexsort((k, i, t, val, cls))
    want = list(zip(*(a[idx] for a in (cls, val, sgn, la, t, i, k, p, w))))
    assert len(rows) == n
    for got, exp in zip(rows, want):
        assert tuple(float(x) for x in got) == tuple(float(x) for x in exp)


def test_best_keys_selects_the_m_best_and_their_ties():
    """The selection holds every entry whose (class, value) is at most the m-th smallest's."""
    rng = np.random.default_rng(1)
    cls = rng.integers(0, 3, size=200)
    val = rng.choice([-2.0, 0.0, 1.0, np.inf], size=200)
    order = np.lexsort((val, cls))
    for m in (1, 2, 50, 133, 200):
        c, v = cls[order[m - 1]], val[order[m - 1]]
        want = np.flatnonzero((cls < c) | ((cls == c) & (val <= v)))
        np.testing.assert_array_equal(paths._best_keys(cls, val, m), want)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_k_best_against_the_oracle_with_one_candidate_sorted_at_a_time(kind, order, monkeypatch):
    """Every list (the root's of all source elements too) sorts one candidate at first and
    extends its prefix as the enumeration reads on: the whole ranked list is still the oracle's."""
    monkeypatch.setattr(paths, "_SORTED_PREFIX", 1)
    check_top_path(kind, 0, order)
    check_k_best(kind, 0, order)
