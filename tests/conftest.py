"""Shared test setup: the test helpers (``models``, ``oracle``) import as top-level modules under
any pytest import mode."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_dense_fallback(monkeypatch):
    """Fail if any op of the model needs the dense jacrev fallback: every op must have a rule."""
    from gradgraph.capture import builder, registry, rules
    used = []

    def spy(ctx, key, max_entries=None):
        used.append(str(ctx.op))
        return registry.dense_jacobian(ctx, key, max_entries)
    monkeypatch.setattr(builder, "dense_jacobian", spy)
    monkeypatch.setattr(rules, "dense_jacobian", spy)
    yield used
    assert not used, f"ops fell to the dense fallback: {sorted(set(used))}"


# The test session runs every query on a fixed number of threads (the policy's dynamic reduction
# off): with it on, a query takes fewer threads when the machine is busy (as under pytest -n 2),
# and its contractions then go through another BLAS (numpy's at one thread, torch's at more) whose
# sums differ in the last bit, so two identical queries compared bit for bit could disagree.
# tests/test_threads.py turns the policy on where it tests it.
# GRADGRAPH_TEST_THREADS=N also sets every pool to N threads (gg.set_num_threads): the exactness
# suites are run this way at 1 and at 2 threads (tests/test_threads.py does it for one).
from gradgraph import threads as _threads  # noqa: E402

_threads.set_dynamic(False)
if os.environ.get("GRADGRAPH_TEST_THREADS"):
    import gradgraph as _gg
    _gg.set_num_threads(int(os.environ["GRADGRAPH_TEST_THREADS"]))
