"""Semiring dynamic programs over a captured :class:`~gradgraph.graph.GradGraph`."""
