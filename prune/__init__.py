"""Activation-guided structured pruning for LLaMA-family models (``python -m prune.run``), and the
activation-pattern analysis it rests on (``python -m prune.analyze``; :func:`similarity` in Python)."""

from prune.patterns import similarities, similarity

__all__ = ["similarities", "similarity"]
