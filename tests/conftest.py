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
