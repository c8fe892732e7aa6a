"""The activation-pattern analysis of the paper (docs/METHOD.md §1) on a model and data of your choice.

``python -m prune.analysis RECIPE.yaml`` (``prune/analysis/run.py``) measures the paper's three findings;
:func:`similarity` and :func:`similarities` expose the pattern similarity of two texts as functions.
"""

from prune.analysis.patterns import similarities, similarity

__all__ = ["similarities", "similarity"]
