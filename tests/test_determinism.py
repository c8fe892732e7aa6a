"""The same recipe and seed give a bit-identical checkpoint."""

import hashlib
from pathlib import Path

import pytest
from conftest import ALL_STATISTICS, random_tokens, tiny_model

from prune.blocks import count_parameters
from prune.checkpoint import save_checkpoint
from prune.recipe import Recipe
from prune.run import prune_as_recipe_says
from prune.statistics import collect_statistics


class NoTokenizer:
    def save_pretrained(self, directory):
        pass


def _prune_and_save(recipe: Recipe, directory: Path) -> str:
    """Statistics, pruning and checkpoint from scratch; returns the sha256 of the weights file."""
    model = tiny_model("qwen2")
    total = count_parameters(model)["total"]
    statistics = collect_statistics(
        model,
        random_tokens(4, 16, seed=recipe.calibration.seed),
        recipe.scoring.objective,
        ALL_STATISTICS,
        progress=False,
    )
    pruned, _ = prune_as_recipe_says(recipe, model, round(recipe.pruning.target * total), statistics, {})
    save_checkpoint(pruned, NoTokenizer(), directory)
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["activation-obs", "flap"])
def test_same_recipe_gives_identical_checkpoint_bytes(tmp_path, method):
    recipe = Recipe()
    recipe.scoring.method = method
    recipe.pruning.round_to, recipe.pruning.min_ffn_channels, recipe.pruning.target = 8, 8, 0.1
    first = _prune_and_save(recipe, tmp_path / "first")
    second = _prune_and_save(recipe, tmp_path / "second")
    assert first == second
    recipe.calibration.seed += 1  # and the hash does depend on the calibration data
    assert _prune_and_save(recipe, tmp_path / "other_seed") != first
