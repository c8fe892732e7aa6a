"""Activation-guided structured pruning for decoder language models.

Command line: ``python -m prune.run RECIPE.yaml`` (pruning; installed as ``prune-run``),
``python -m prune.export`` (GGUF files; ``prune-export``), ``python -m prune.analysis RECIPE.yaml`` (the
activation-pattern analysis; ``prune-analyze``). In Python: :func:`run_recipe` (the command line's run),
:func:`prune_loaded_model` (a recipe's method on a model in memory), :func:`load_recipe`,
:func:`read_report`, and the pattern similarity of two texts, :func:`similarity` / :func:`similarities`.

The names below are imported on first use, so that ``import prune.<stage>`` stays light and the
toolkit's modules can import each other's foundations without a cycle through this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

PUBLIC = {
    "run_recipe": "prune.api",
    "prune_loaded_model": "prune.api",
    "PrunedModel": "prune.api",
    "Recipe": "prune.recipe",
    "RecipeError": "prune.recipe",
    "load_recipe": "prune.recipe",
    "Report": "eval.report",
    "read_report": "eval.report",
    "similarity": "prune.analysis.patterns",
    "similarities": "prune.analysis.patterns",
}
"""Public name -> the module that defines it."""

__all__ = sorted(PUBLIC)

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from eval.report import Report, read_report  # noqa: F401
    from prune.analysis.patterns import similarities, similarity  # noqa: F401
    from prune.api import PrunedModel, prune_loaded_model, run_recipe  # noqa: F401
    from prune.recipe import Recipe, RecipeError, load_recipe  # noqa: F401


def __dir__() -> list[str]:
    """The public names beside the module's own, so that ``dir(prune)`` and completion show them."""
    return sorted({*globals(), *PUBLIC})


def __getattr__(name: str) -> Any:
    if name not in PUBLIC:
        raise AttributeError(f"module 'prune' has no attribute {name!r}")
    return getattr(importlib.import_module(PUBLIC[name]), name)
