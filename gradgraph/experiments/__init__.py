"""The paper's studies, reproduced with gradgraph (see docs/experiments.md)."""
