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


# GRADGRAPH_TEST_THREADS=N runs the tests with every pool at N threads (gg.set_num_threads) and
# every query on all N, however busy the machine (the policy's dynamic reduction off): the
# exactness suites are run this way at 1 and at 2 threads (tests/test_threads.py does it for one).
if os.environ.get("GRADGRAPH_TEST_THREADS"):
    import gradgraph as _gg
    from gradgraph import threads as _threads
    _gg.set_num_threads(int(os.environ["GRADGRAPH_TEST_THREADS"]))
    _threads.set_dynamic(False)
