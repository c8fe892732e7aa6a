"""Analysis recipes (``python -m prune.analysis RECIPE.yaml``): YAML turned into validated dataclasses.

The same rules as pruning recipes (``prune/recipe.py``): every problem raises :class:`RecipeError`
naming the key or file at fault, before anything is loaded or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eval.zeroshot import LOCAL_TASKS
from prune.calibration import LOCAL_FILES
from prune.recipe import ModelSection, RecipeError
from prune.schema import (
    LAYER_SPAN,
    NOT_EMPTY,
    SchemaError,
    above,
    at_least,
    field_checks,
    from_mapping,
    json_schema,
    names_among,
    raise_first_failure,
    read_yaml_mapping,
    ruled,
)

ANALYSIS_DOMAINS = [*LOCAL_TASKS, *LOCAL_FILES]
"""Domains of the activation-pattern analysis: task prompts of the local zero-shot tasks, and text windows."""


@dataclass
class DomainsSection:
    """Findings 1 and 2: activation density per layer and cross-domain pattern similarity."""

    enabled: bool = False
    names: list[str] = ruled(
        names_among(
            lambda: ANALYSIS_DOMAINS, 2, lambda: f"must be two or more distinct names among {ANALYSIS_DOMAINS}"
        ),
        default_factory=lambda: [
            "boolq",
            "arc_easy",
            "piqa",
            "hellaswag",
            "social_iqa",
            "winogrande",
            "c4",
            "wikitext2",
        ],
    )
    samples: int = ruled(at_least(2), 64)
    """Inputs per domain; the same-domain pairs match the first half with the second half."""
    max_tokens: int = ruled(above(1), 128)
    """Task prompts keep their last max_tokens tokens; c4 / wikitext2 give windows of this length."""
    seed: int = 0
    gamma: float = ruled(above(0), 2.0e-6)
    """Absolute activation threshold (the paper's released code: 2e-6 for 32-layer models)."""
    gamma_relative: float = ruled(above(0), 1.0)
    """Scale-free threshold: this multiple of the domain's mean A over all decoder linear weights."""
    sketch_size: int = ruled(at_least(16), 8192)
    """Buckets of the count sketch kept per input and layer (4 bytes each)."""
    boxplot_pairs: list[list[str]] = field(
        default_factory=lambda: [
            ["c4", "wikitext2"],
            ["boolq", "c4"],
            ["piqa", "hellaswag"],
            ["arc_easy", "social_iqa"],
        ]
    )
    """Domain pairs drawn as per-layer boxplots (a domain with itself: its same-domain pairs)."""


@dataclass
class SimilaritySection:
    """Finding 3: pattern similarity against gold sentence relatedness."""

    enabled: bool = False
    dataset: str = "stsb-test"
    """``stsb-test``, ``stsb-dev`` (under $PRUNE_DATA_DIR/stsb), or a file in STS-B or SICK format."""
    pairs: int = ruled(at_least(3), 256)
    seed: int = 0


@dataclass
class AnalysisRecipe:
    output: str = ruled(NOT_EMPTY, "runs/analysis")
    cache_dir: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    objective: Literal["max_logit", "nll"] = "max_logit"
    deep_layers: list[int] | None = ruled(LAYER_SPAN, None)
    """[first, end]: the deep layers (0-based, end excluded); null = the paper's layers 20-30 of 32, scaled."""
    domains: DomainsSection = field(default_factory=DomainsSection)
    similarity: SimilaritySection = field(default_factory=SimilaritySection)


def load_analysis_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> AnalysisRecipe:
    """Read, override and validate an analysis recipe (``python -m prune.analysis``); RecipeError names the key."""
    try:
        recipe = from_mapping(AnalysisRecipe, read_yaml_mapping(path, overrides))
        _check_ranges(recipe)
    except SchemaError as error:
        raise RecipeError(str(error)) from None
    return recipe


def _check_ranges(recipe: AnalysisRecipe) -> None:
    """The fields' own rules (on the fields above), then the rules that read several fields."""
    d = recipe.domains
    checks = [
        (
            "domains.boxplot_pairs",
            all(len(pair) == 2 and set(pair) <= set(d.names) for pair in d.boxplot_pairs),
            "must be pairs [a, b] of names listed in domains.names",
        ),
        ("domains.enabled", d.enabled or recipe.similarity.enabled, "nothing to do: enable domains and/or similarity"),
    ]
    raise_first_failure(recipe, field_checks(recipe) + checks)


def analysis_recipe_schema() -> dict:
    """The JSON Schema of an analysis recipe file (``python -m prune.analysis --schema``)."""
    return json_schema(AnalysisRecipe)
