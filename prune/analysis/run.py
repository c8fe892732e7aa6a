"""Command line: ``python -m prune.analysis RECIPE.yaml [--set key=value ...] [--overwrite]``.

The paper's three findings on a model (docs/METHOD.md §1), from the same backward pass as the
pruning statistics:

- ``domains`` (findings 1 and 2): per domain, activated weights per layer of the mean A, and LLMDcos
  per layer between sample i of one domain and sample i of another (same domain: first half against
  second half), estimated from count sketches;
- ``similarity`` (finding 3): exact LLMDcos per layer for sentence pairs, and its Spearman
  correlation with the gold relatedness, per layer and for the mean over the deep layers.

Writes ``analysis.json``, ``analysis.md`` and PNG figures into the recipe's ``output`` (staged in
``<output>.partial`` until everything succeeded).
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prune.analysis.data import domain_samples, read_sentence_pairs, resolve_pair_dataset, sample_pairs, task_prompts
from prune.analysis.patterns import CountSketch, domain_patterns, similarities, sketch_cosines
from prune.analysis.recipe import AnalysisRecipe, analysis_recipe_schema, load_analysis_recipe
from prune.analysis.report import write_analysis
from prune.calibration import LOCAL_FILES, DataSourceError, resolve_text_source
from prune.cli import ArgumentParser, add_recipe_arguments, printed_schema, run_command
from prune.models import ModelSource, ModelSourceError, load_model, resolve_model_source
from prune.outputs import OutputRefused, check_output, is_analysis_output, output_lock, staged_directory
from prune.paths import cache_dir
from prune.prepare import run_inputs
from prune.recipe import RecipeError
from prune.schema import to_mapping

USER_ERRORS = (RecipeError, ModelSourceError, DataSourceError, OutputRefused)


def deep_layer_range(configured: list[int] | None, num_layers: int) -> tuple[int, int]:
    """[first, end) of the deep layers: as configured, or the paper's 20-30 of 32 (1-based) scaled to ``num_layers``."""
    if configured is not None:
        if configured[1] > num_layers:
            raise RecipeError(f"deep_layers: end {configured[1]} is beyond the model's {num_layers} layers")
        return configured[0], configured[1]
    return round(19 * num_layers / 32), round(30 * num_layers / 32)


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def domain_similarity_pairs(sketches_a: torch.Tensor, sketches_b: torch.Tensor | None) -> torch.Tensor:
    """LLMDcos per pair and layer [pairs, layers]: sample i of a with sample i of b, or (b None) a's first half
    with its second half."""
    if sketches_b is None:
        half = len(sketches_a) // 2
        return sketch_cosines(sketches_a[:half], sketches_a[half : 2 * half])
    count = min(len(sketches_a), len(sketches_b))
    return sketch_cosines(sketches_a[:count], sketches_b[:count])


def analyze_domains(
    recipe: AnalysisRecipe, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, deep: tuple[int, int]
) -> dict:
    """Findings 1 and 2 over ``recipe.domains.names``; the result is JSON-ready."""
    d = recipe.domains
    sketch = CountSketch(d.sketch_size, d.seed)
    patterns, tokens = {}, {}
    for name in d.names:
        samples = domain_samples(tokenizer, name, d.samples, d.max_tokens, d.seed)
        tokens[name] = sum(len(s) for s in samples) / len(samples)
        patterns[name] = domain_patterns(
            model, samples, recipe.objective, d.gamma, d.gamma_relative, sketch, desc=f"activation patterns: {name}"
        )
    per_layer, boxplots = {}, {}
    wanted = {pair_key(*pair) for pair in d.boxplot_pairs}
    for a, b in itertools.combinations_with_replacement(d.names, 2):
        values = domain_similarity_pairs(patterns[a].sketches, None if a == b else patterns[b].sketches)
        per_layer[pair_key(a, b)] = values.mean(0).tolist()
        for key in (pair_key(a, b), pair_key(b, a)):
            if key in wanted:
                boxplots[key] = values.T.tolist()
    first, end = deep
    cross = [per_layer[pair_key(a, b)] for a, b in itertools.combinations(d.names, 2)]
    same = [per_layer[pair_key(a, a)] for a in d.names]
    return {
        "names": d.names,
        "samples": d.samples,
        "max_tokens": d.max_tokens,
        "seed": d.seed,
        "mean_tokens": tokens,
        "gamma": d.gamma,
        "gamma_relative": d.gamma_relative,
        "sketch_size": d.sketch_size,
        "weights_per_layer": patterns[d.names[0]].weights_per_layer,
        "activated": {name: p.activated for name, p in patterns.items()},
        "activated_relative": {name: p.activated_relative for name, p in patterns.items()},
        "relative_threshold": {name: p.relative_threshold for name, p in patterns.items()},
        "similarity_per_layer": per_layer,
        "deep_similarity": {key: sum(v[first:end]) / (end - first) for key, v in per_layer.items()},
        "cross_domain_mean_per_layer": torch.tensor(cross).mean(0).tolist(),
        "same_domain_mean_per_layer": torch.tensor(same).mean(0).tolist(),
        "boxplots": boxplots,
    }


def analyze_similarity(
    recipe: AnalysisRecipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    deep: tuple[int, int],
    pair_file: Path,
) -> dict:
    """Finding 3: Spearman correlation of LLMDcos (per layer, and mean over the deep layers) with gold scores."""
    s = recipe.similarity
    pairs = sample_pairs(read_sentence_pairs(pair_file), s.pairs, s.seed)
    cosines = similarities(model, tokenizer, [(p.text_a, p.text_b) for p in pairs], recipe.objective)
    gold = [p.score for p in pairs]
    first, end = deep
    deep_mean = cosines[:, first:end].mean(1)
    rho, p_value = spearmanr(deep_mean.numpy(), gold)
    per_layer = [spearmanr(cosines[:, layer].numpy(), gold) for layer in range(cosines.shape[1])]
    return {
        "dataset": s.dataset,
        "file": str(pair_file),
        "pairs": len(pairs),
        "seed": s.seed,
        "spearman_deep": float(rho),
        "p_value_deep": float(p_value),
        "spearman_per_layer": [float(r.statistic) for r in per_layer],
        "p_value_per_layer": [float(r.pvalue) for r in per_layer],
        "gold": gold,
        "deep_similarity": deep_mean.tolist(),
        "mean_similarity_per_layer": cosines.mean(0).tolist(),
    }


def check_inputs(recipe: AnalysisRecipe) -> Path | None:
    """Resolve every data file the recipe needs before the model loads; returns the pair file (or None)."""
    if recipe.domains.enabled:
        for name in recipe.domains.names:
            if name in LOCAL_FILES:
                resolve_text_source(name, "domains.names")
            else:
                task_prompts(name)
    return resolve_pair_dataset(recipe.similarity.dataset) if recipe.similarity.enabled else None


def execute(recipe: AnalysisRecipe, overwrite: bool) -> Path:
    output = Path(recipe.output).expanduser()
    pair_file = check_inputs(recipe)
    cache = cache_dir(recipe.cache_dir)
    source = resolve_model_source(recipe.model.source, cache)
    inputs = run_inputs(cache, source, [])
    if pair_file is not None:
        inputs.append(("similarity.dataset", pair_file))
    check_output(output, inputs, overwrite, is_analysis_output, what="an analysis output")
    with output_lock(output):
        check_output(output, inputs, overwrite, is_analysis_output, what="an analysis output")
        return _analyze(recipe, output, source, cache, pair_file)


def _analyze(recipe: AnalysisRecipe, output: Path, source: ModelSource, cache: Path, pair_file: Path | None) -> Path:
    """:func:`execute` once the output may be written and its lock is held."""
    model, tokenizer = load_model(source, recipe.model.dtype, recipe.model.device, cache)
    deep = deep_layer_range(recipe.deep_layers, model.config.num_hidden_layers)
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {
        "recipe": to_mapping(recipe),
        "model": {"source": recipe.model.source, "location": source.location},
        "objective": recipe.objective,
        "deep_layers": list(deep),
        "seconds": seconds,
    }
    with staged_directory(output) as partial:
        if recipe.domains.enabled:
            start = time.perf_counter()
            result["domains"] = analyze_domains(recipe, model, tokenizer, deep)
            seconds["domains"] = time.perf_counter() - start
        if pair_file is not None:  # similarity.enabled
            start = time.perf_counter()
            result["similarity"] = analyze_similarity(recipe, model, tokenizer, deep, pair_file)
            seconds["similarity"] = time.perf_counter() - start
        write_analysis(result, partial)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m prune.analysis",
        description="Activation-pattern analysis: density per layer, cross-domain and sentence-pair similarity.",
    )
    add_recipe_arguments(parser, "YAML analysis recipe (see docs/analysis.md)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set domains.samples=16 (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    if printed_schema(parser, args, analysis_recipe_schema):
        return 0
    return run_command(
        lambda: f"done: {execute(load_analysis_recipe(args.recipe, args.set), args.overwrite)}/analysis.md",
        USER_ERRORS,
    )


if __name__ == "__main__":
    sys.exit(main())
