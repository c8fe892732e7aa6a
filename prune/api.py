"""The toolkit from Python: the command line's stages, validation and outputs, callable from a script or notebook.

- :func:`run_recipe`: what ``python -m prune.run RECIPE`` does (validation, every stage, the output
  directory), returning the typed report;
- :func:`prune_loaded_model`: a recipe's method (statistics, scores, allocation, pruning,
  reconstruction) applied to a model already in memory, writing nothing.

Both raise the command line's one-line errors (``RecipeError``, ``ModelSourceError``,
``DataSourceError``, ``ImpossibleTargetError``) for bad input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from eval.report import LayerReport, Report
from prune.blocks import block_shape, count_parameters
from prune.calibration import calibration_samples, resolve_text_source
from prune.prepare import (
    check_memory_plan,
    for_device,
    parameters_to_remove,
    prepare,
    reads_samples,
    statistics_needs,
)
from prune.recipe import Recipe, load_recipe, recipe_from_mapping, recipe_to_dict
from prune.run import execute, layer_table, prune_as_recipe_says
from prune.statistics import collect_statistics


def resolve_recipe(recipe: Recipe | str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """A validated recipe: a :class:`Recipe`, a recipe file, or None (the defaults), with ``--set`` style
    ``overrides`` such as ``"pruning.target=0.2"`` applied."""
    if isinstance(recipe, Recipe):
        return recipe_from_mapping(recipe_to_dict(recipe), tuple(overrides))
    return load_recipe(recipe, tuple(overrides))


def run_recipe(
    recipe: Recipe | str | Path | None = None, overrides: Sequence[str] = (), overwrite: bool = False
) -> Report:
    """Prune as a recipe says, exactly as ``python -m prune.run`` does: everything is checked before anything
    is written, the output directory is staged and renamed when every stage has succeeded, and a run whose
    estimated peak memory exceeds the device's available memory is refused (MemoryPlanError). Returns its report.
    """
    prepared = prepare(resolve_recipe(recipe, overrides), overwrite)
    check_memory_plan(prepared)
    report = execute(prepared)
    assert report is not None  # one process, the main one
    return report


@dataclass
class PrunedModel:
    """The result of :func:`prune_loaded_model`."""

    model: PreTrainedModel
    """The pruned model: a new model of exactly the kept shapes (the input model is left untouched)."""
    layers: list[LayerReport]
    """Per layer: dense and kept widths and what the allocation measured."""
    removed_fraction: float
    """Parameters removed, as a fraction of the input model's total."""


def prune_loaded_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    recipe: Recipe | str | Path | None = None,
    overrides: Sequence[str] = (),
    calibration: torch.Tensor | None = None,
) -> PrunedModel:
    """Prune a model already in memory with a recipe's method: its ``calibration``, ``scoring``, ``allocation`` and
    ``pruning`` sections (the others do not apply: nothing is loaded, evaluated or written).

    ``calibration``: token ids [N, T] to compute the statistics on; by default the recipe's calibration
    source is read and sampled with ``tokenizer`` (which is needed only then). The statistics are computed on
    the model's device and not cached (a model in memory has no file to key a cache by).
    """
    recipe = for_device(resolve_recipe(recipe, overrides), next(model.parameters()).device)
    dense = count_parameters(model)
    params_to_remove = parameters_to_remove(recipe, block_shape(model.config), dense)
    statistics = None
    needs = statistics_needs(recipe)
    if (needs or reads_samples(recipe)) and calibration is None:
        if tokenizer is None:
            raise ValueError("prune_loaded_model: give a tokenizer, or calibration token ids")
        source = resolve_text_source(recipe.calibration.source, "calibration.source")
        c = recipe.calibration
        calibration = calibration_samples(tokenizer, source, c.samples, c.seqlen, c.seed)
    if needs:
        assert calibration is not None
        statistics = collect_statistics(model, calibration, recipe.scoring.objective, needs)
    pruned, allocation = prune_as_recipe_says(recipe, model, params_to_remove, statistics, {}, samples=calibration)
    layers = layer_table(block_shape(model.config), allocation)
    return PrunedModel(pruned, layers, 1 - count_parameters(pruned)["total"] / dense["total"])
