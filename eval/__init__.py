"""Evaluation of dense and pruned models: perplexity, speed, and the before/after report."""
