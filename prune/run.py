"""Command line: ``python -m prune.run RECIPE.yaml [--set key=value ...] [--dry-run] [--overwrite]``.

Thin orchestrator over the stages: recipe -> model -> calibration data -> activation statistics ->
scores -> allocation -> pruned model -> checkpoint -> evaluation -> report. Everything is validated
before anything is written; the run writes into ``<output>.partial`` and renames it to ``<output>``
only when every stage has succeeded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedModel

from eval.perplexity import perplexity, window_count
from eval.report import write_report
from eval.speed import measure_speed
from eval.zeroshot import local_data_file, local_task_configs, resolve_source, zeroshot_accuracy
from prune.allocation import Allocation, ImpossibleTargetError, allocate, removable_parameters, remove_layers
from prune.blocks import BlockShape, block_shape, count_parameters
from prune.calibration import DataSourceError, TextSource, calibration_samples, evaluation_tokens, resolve_text_source
from prune.checkpoint import save_checkpoint
from prune.memory import current_bytes, make_resident, peak_bytes, reset_peak
from prune.models import ModelSource, ModelSourceError, load_config, load_model, resolve_model_source
from prune.paths import cache_dir, data_dir, file_identity, staged_directory
from prune.pruner import has_layer_widths, model_class_for, prune_model
from prune.recipe import Recipe, RecipeError, load_recipe, recipe_to_dict
from prune.reconstruct import reconstruct_outputs
from prune.recovery import recover, training_windows
from prune.scoring import NEEDS_COVARIANCES, score_units
from prune.statistics import ActivationStatistics, cache_key, collect_statistics

USER_ERRORS = (RecipeError, ModelSourceError, DataSourceError, ImpossibleTargetError)


@dataclass
class Prepared:
    """A validated recipe with everything resolved that can be resolved without loading weights."""

    recipe: Recipe
    output: Path
    cache: Path
    model_source: ModelSource
    shape: BlockShape
    dense_parameters: dict[str, int]
    params_to_remove: int
    calibration_source: TextSource | None
    evaluation_source: TextSource
    recovery_source: TextSource | None

    @property
    def needs_statistics(self) -> bool:
        recipe = self.recipe
        return (
            recipe.scoring.method != "magnitude"
            or recipe.allocation.strategy == "activation-density"
            or recipe.pruning.reconstruct != "none"
        )

    @property
    def needs_covariances(self) -> bool:
        return self.recipe.pruning.reconstruct == "lstsq" or self.recipe.scoring.method in NEEDS_COVARIANCES


def added_bias_parameters(recipe: Recipe, shape: BlockShape) -> int:
    """Biases that reconstruction adds to o_proj and down_proj; the budget solver removes that much more."""
    return 0 if recipe.pruning.reconstruct == "none" else 2 * shape.hidden_size * shape.num_layers


def protected_layers(recipe: Recipe, shape: BlockShape) -> frozenset[int]:
    """Layers outside ``allocation.layer_range``: they are not pruned."""
    if recipe.allocation.layer_range is None:
        return frozenset()
    first, end = recipe.allocation.layer_range
    return frozenset(i for i in range(shape.num_layers) if not first <= i < end)


def prepare(recipe: Recipe, overwrite: bool = False) -> Prepared:
    """Validate a recipe against the files, the model's configuration and the output directory.

    Writes nothing outside the cache (a missing ``smollm2-135m`` file is fetched into it).
    Raises one of USER_ERRORS with a message naming the key or path at fault.
    """
    output = Path(recipe.output).expanduser()
    if output.exists() and not overwrite:
        raise RecipeError(f"output: {output} already exists; choose another (--set output=...) or pass --overwrite")
    cache = cache_dir(recipe.cache_dir)
    model_source = resolve_model_source(recipe.model.source, cache)
    config = load_config(model_source)
    evaluation_source = resolve_text_source(recipe.evaluation.perplexity.dataset, "evaluation.perplexity.dataset")
    calibration_source = resolve_text_source(recipe.calibration.source, "calibration.source")
    recovery_source = None
    if recipe.recovery.method != "none":
        recovery_source = resolve_text_source(recipe.recovery.source, "recovery.source")
        if recovery_source.fingerprint() == evaluation_source.fingerprint():
            raise RecipeError(
                f"recovery.source: {recipe.recovery.source!r} is the perplexity text "
                "(evaluation.perplexity.dataset); recovery must train on other text"
            )
    try:
        shape = block_shape(config)
    except ValueError as error:
        raise RecipeError(f"model.source: {error}") from None
    with torch.device("meta"):
        dense_parameters = count_parameters(model_class_for(config)(config))
    params_to_remove = round(recipe.pruning.target * dense_parameters["total"])
    p = recipe.pruning
    layer_range = recipe.allocation.layer_range
    if layer_range is not None and layer_range[1] > shape.num_layers:
        raise RecipeError(
            f"allocation.layer_range: end {layer_range[1]} is beyond the model's {shape.num_layers} layers"
        )
    if recipe.scoring.method == "shortgpt":
        most = sum(shape.whole_layer_params(w) for w in shape.layers[1:])
    else:
        most = removable_parameters(
            shape, p.attention_unit, p.round_to, p.min_ffn_channels, protected_layers(recipe, shape)
        )
    if params_to_remove + added_bias_parameters(recipe, shape) > most:
        raise ImpossibleTargetError(
            f"pruning.target: {p.target} asks to remove {params_to_remove:,} parameters but at most {most:,} "
            f"({most / dense_parameters['total']:.1%}) can go while every layer keeps 1 KV group, 1 query head "
            f"per group and {p.min_ffn_channels} FFN channels"
        )
    zs = recipe.evaluation.zeroshot
    if zs.enabled and resolve_source(zs.tasks, zs.source) == "local":
        local_task_configs(zs.tasks)  # raises DataSourceError naming a missing directory or file
    return Prepared(
        recipe,
        output,
        cache,
        model_source,
        shape,
        dense_parameters,
        params_to_remove,
        calibration_source,
        evaluation_source,
        recovery_source,
    )


def dry_run_text(prepared: Prepared) -> str:
    """The resolved recipe and the parameter budget it implies."""
    dense = prepared.dense_parameters
    kept = dense["total"] - prepared.params_to_remove
    decoder_linears = sum(prepared.shape.linear_weight_count(w) for w in prepared.shape.layers)
    budget = {
        "model": f"{prepared.model_source.kind}: {prepared.model_source.location}",
        "dense_total_parameters": dense["total"],
        "dense_decoder_block_parameters": dense["decoder_blocks"],
        "parameters_to_remove": prepared.params_to_remove,
        "parameters_kept": kept,
        "kept_fraction": round(kept / dense["total"], 6),
        "implied_decoder_linear_sparsity": round(prepared.params_to_remove / decoder_linears, 6),
    }
    return yaml.safe_dump({"recipe": recipe_to_dict(prepared.recipe)}, sort_keys=False) + yaml.safe_dump(
        {"budget": budget}, sort_keys=False
    )


@contextmanager
def timed(stage_seconds: dict, name: str):
    print(f"[{name}]", file=sys.stderr)
    start = time.perf_counter()
    yield
    stage_seconds[name] = time.perf_counter() - start


def obtain_statistics(prepared: Prepared, model, tokenizer) -> tuple[ActivationStatistics, dict]:
    """Load the statistics from the cache, or compute and cache them; returns them and their provenance."""
    recipe = prepared.recipe
    calibration = recipe_to_dict(recipe)["calibration"]
    key = cache_key(
        prepared.model_source.fingerprint(),
        str(next(model.parameters()).dtype),
        calibration,
        prepared.calibration_source.fingerprint(),
        recipe.scoring.objective,
    )
    path = prepared.cache / "stats" / f"{key}.safetensors"
    covariances, taylor = prepared.needs_covariances, recipe.scoring.method == "taylor"
    info = {
        "source": recipe.calibration.source,
        "samples": recipe.calibration.samples,
        "seqlen": recipe.calibration.seqlen,
        "seed": recipe.calibration.seed,
        "objective": recipe.scoring.objective,
        "cache_path": str(path),
        "reused": False,
    }
    if path.is_file():
        cached = ActivationStatistics.load(path)
        if (cached.has_covariances or not covariances) and (cached.has_taylor or not taylor):
            info["reused"] = True
            return cached, info
    samples = calibration_samples(
        tokenizer,
        prepared.calibration_source,
        recipe.calibration.samples,
        recipe.calibration.seqlen,
        recipe.calibration.seed,
    )
    device = next(model.parameters()).device
    make_resident(model)
    reset_peak(device)
    before = current_bytes(device)
    statistics = collect_statistics(model, samples, recipe.scoring.objective, covariances, taylor)
    peak = peak_bytes(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    info |= {
        "peak_memory_bytes": peak,
        "pass_added_bytes": peak - before,
        "model_weight_bytes": weights,
        "peak_over_weights": (weights + peak - before) / weights,
    }
    statistics.save(path)
    return statistics, info


DENSE_EVALUATION_VERSION = 1
"""Part of the key of cached dense-model evaluations; bump when evaluation code changes its numbers."""


def cached_dense_evaluation(prepared: Prepared, model, name: str, settings: dict, compute) -> tuple[dict, str | None]:
    """The dense model's result of one evaluation: from the cache when this model file, dtype, device and
    ``settings`` were evaluated before, else ``compute()`` (then cached). Returns it and the cache path
    it was reused from (None when computed).
    """
    parameter = next(model.parameters())
    key = json.dumps(
        {
            "version": DENSE_EVALUATION_VERSION,
            "model": prepared.model_source.fingerprint(),
            "dtype": str(parameter.dtype),
            "device": parameter.device.type,
            "name": name,
            "settings": settings,
        },
        sort_keys=True,
    )
    path = prepared.cache / "dense_evaluation" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.replace(path)
    return result, None


def layer_table(shape: BlockShape, allocation: Allocation) -> list[dict]:
    """Per dense layer: dense and pruned widths (``pruned`` is null for a removed layer) and allocation facts."""
    rows = []
    for i, (dense, plan) in enumerate(zip(shape.layers, allocation.plans)):
        pruned = None if plan is None else plan.widths
        rows.append(
            {
                "index": i,
                "dense": {
                    "query_heads": dense.query_heads,
                    "kv_groups": dense.kv_heads,
                    "ffn_channels": dense.ffn_channels,
                },
                "pruned": None
                if pruned is None
                else {
                    "query_heads": pruned.query_heads,
                    "kv_groups": pruned.kv_heads,
                    "ffn_channels": pruned.ffn_channels,
                },
                "requested_sparsity": allocation.layer_sparsity[i],
                "activated_weights": allocation.activated_weights[i] if allocation.activated_weights else None,
                "block_influence": allocation.block_influence[i] if allocation.block_influence else None,
            }
        )
    return rows


def prune_as_recipe_says(
    prepared: Prepared, model, statistics: ActivationStatistics | None, stage_seconds: dict[str, float]
) -> tuple[PreTrainedModel, Allocation]:
    """Scoring, allocation, physical pruning and reconstruction; ``model`` is left untouched.

    Adds each stage's wall time to ``stage_seconds``.
    """
    recipe, shape = prepared.recipe, prepared.shape
    if recipe.scoring.method == "shortgpt":
        with timed(stage_seconds, "allocation"):
            allocation = remove_layers(shape, statistics, prepared.params_to_remove)
    else:
        with timed(stage_seconds, "scoring"):
            scores = score_units(
                model, shape, recipe.scoring.method, recipe.scoring.aggregate, statistics, recipe.pruning.damping
            )
        with timed(stage_seconds, "allocation"):
            a = recipe.allocation
            allocation = allocate(
                shape,
                scores,
                prepared.params_to_remove + added_bias_parameters(recipe, shape),
                a.strategy,
                recipe.pruning.attention_unit,
                recipe.pruning.round_to,
                recipe.pruning.min_ffn_channels,
                statistics,
                a.alpha,
                a.beta,
                a.gamma,
                a.gamma_mode,
                protected_layers(recipe, shape),
            )
    reconstruct = recipe.pruning.reconstruct
    with timed(stage_seconds, "pruning"):
        pruned = prune_model(model, allocation.plans, output_bias=reconstruct != "none")
    if reconstruct != "none":
        with timed(stage_seconds, f"reconstruction ({reconstruct})"):
            reconstruct_outputs(pruned, model, shape, allocation.plans, statistics, reconstruct, recipe.pruning.damping)
    return pruned, allocation


def recovery_state_dir(prepared: Prepared) -> Path:
    """Cache directory of the resumable recovery state, keyed by everything that determines its result."""
    recipe = recipe_to_dict(prepared.recipe)
    for key in ("output", "cache_dir"):
        recipe.pop(key)
    recipe["evaluation"] = {"perplexity": recipe["evaluation"]["perplexity"]}
    key = json.dumps(
        {
            "recipe": recipe,
            "model": prepared.model_source.fingerprint(),
            "calibration": prepared.calibration_source.fingerprint(),
            "recovery": prepared.recovery_source.fingerprint(),
            "evaluation": prepared.evaluation_source.fingerprint(),
        },
        sort_keys=True,
    )
    return prepared.cache / "recovery" / hashlib.sha256(key.encode()).hexdigest()[:16]


def recover_as_recipe_says(
    prepared: Prepared, dense, pruned, tokenizer, evaluation_text: torch.Tensor, run_directory: Path, notes: list[str]
) -> tuple[PreTrainedModel, dict]:
    """The recovery stage: trains ``pruned`` toward ``dense``; writes ``recovery_log.jsonl`` into ``run_directory``.

    Returns the recovered model and the report's ``recovery`` section. The held-out slice of the curve is
    the last ``heldout_windows`` windows of the perplexity text ``evaluation_text`` [n_tokens].
    """
    settings, ppl = prepared.recipe.recovery, prepared.recipe.evaluation.perplexity
    windows = training_windows(tokenizer, prepared.recovery_source, settings.seqlen)
    heldout_tokens = settings.heldout_windows * ppl.seqlen
    evaluated_tokens = window_count(len(evaluation_text), ppl.seqlen, ppl.windows) * ppl.seqlen
    if evaluated_tokens + heldout_tokens > len(evaluation_text):
        notes.append("The recovery curve's held-out slice overlaps the windows the perplexity is measured on.")
    state_dir = recovery_state_dir(prepared)
    recovered, outcome = recover(
        pruned, dense, windows, evaluation_text[-heldout_tokens:], ppl.seqlen, settings, state_dir
    )
    (run_directory / "recovery_log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in outcome.log))
    section = {
        "method": settings.method,
        "source": settings.source,
        "settings": recipe_to_dict(prepared.recipe)["recovery"],
        "heldout": f"last {settings.heldout_windows} window(s) of {ppl.seqlen} tokens of {ppl.dataset}",
        "log": "recovery_log.jsonl",
        "state_dir": str(state_dir),
    } | outcome.as_dict()
    return recovered, section


def execute(prepared: Prepared) -> Path:
    """Run every stage; returns the output directory."""
    recipe, shape = prepared.recipe, prepared.shape
    output = prepared.output
    stage_seconds: dict[str, float] = {}
    notes = []
    with staged_directory(output) as partial:
        with timed(stage_seconds, "load model"):
            model, tokenizer = load_model(
                prepared.model_source, recipe.model.dtype, recipe.model.device, prepared.cache
            )
        statistics, statistics_info = None, None
        if prepared.needs_statistics:
            with timed(stage_seconds, "activation statistics"):
                statistics, statistics_info = obtain_statistics(prepared, model, tokenizer)
                statistics.save(partial / "activation_stats.safetensors")
            if recipe.calibration.source == "wikitext2" and recipe.evaluation.perplexity.dataset == "wikitext2":
                notes.append(
                    "Calibration text and perplexity text are both WikiText-2 (test split): the perplexity is optimistic."
                )
        pruned, allocation = prune_as_recipe_says(prepared, model, statistics, stage_seconds)
        ppl_recipe = recipe.evaluation.perplexity
        tokens = evaluation_tokens(tokenizer, prepared.evaluation_source)
        report_recovery, before_recovery = None, None
        if recipe.recovery.method != "none":
            with timed(stage_seconds, "perplexity before recovery"):
                before_recovery = perplexity(pruned, tokens, ppl_recipe.seqlen, ppl_recipe.windows, "pruned")[
                    "perplexity"
                ]
            with timed(stage_seconds, f"recovery ({recipe.recovery.method})"):
                pruned, report_recovery = recover_as_recipe_says(
                    prepared, model, pruned, tokenizer, tokens, partial, notes
                )
        with timed(stage_seconds, "checkpoint"):
            save_checkpoint(pruned, tokenizer, partial / "model")
        report_perplexity = None
        with timed(stage_seconds, "perplexity"):
            settings = {
                "text": prepared.evaluation_source.fingerprint(),
                "seqlen": ppl_recipe.seqlen,
                "windows": ppl_recipe.windows,
            }
            dense_ppl, reused = cached_dense_evaluation(
                prepared,
                model,
                "perplexity",
                settings,
                lambda: perplexity(model, tokens, ppl_recipe.seqlen, ppl_recipe.windows, "dense"),
            )
            pruned_ppl = perplexity(pruned, tokens, ppl_recipe.seqlen, ppl_recipe.windows, "pruned")
            report_perplexity = {
                "dataset": ppl_recipe.dataset,
                "seqlen": ppl_recipe.seqlen,
                "windows": dense_ppl["windows"],
                "predicted_tokens": dense_ppl["predicted_tokens"],
                "dense": dense_ppl["perplexity"],
                "pruned": pruned_ppl["perplexity"],
                "before_recovery": before_recovery,
                "dense_reused_from": reused,
            }
        report_zeroshot = None
        zs = recipe.evaluation.zeroshot
        if zs.enabled:
            with timed(stage_seconds, "zero-shot"):
                source = resolve_source(zs.tasks, zs.source)
                files = [file_identity(local_data_file(t, data_dir())) for t in zs.tasks] if source == "local" else []
                settings = {
                    "tasks": zs.tasks,
                    "source": source,
                    "files": files,
                    "limit": zs.limit,
                    "batch_size": zs.batch_size,
                    "seed": zs.seed,
                }

                def evaluate(m):
                    return zeroshot_accuracy(m, tokenizer, zs.tasks, source, zs.limit, zs.batch_size, zs.seed)

                dense_zs, reused = cached_dense_evaluation(
                    prepared, model, "zeroshot", settings, lambda: evaluate(model)
                )
                pruned_zs = evaluate(pruned)
                report_zeroshot = {
                    key: dense_zs[key] for key in ("source", "data_dir", "limit", "seed", "mean_metric", "mean_tasks")
                }
                report_zeroshot |= {
                    "dense": {"tasks": dense_zs["tasks"], "mean": dense_zs["mean"]},
                    "pruned": {"tasks": pruned_zs["tasks"], "mean": pruned_zs["mean"]},
                    "dense_reused_from": reused,
                }
        report_speed = None
        speed = recipe.evaluation.speed
        if speed.enabled:
            with timed(stage_seconds, "speed"):
                results = measure_speed(
                    {"dense": model, "pruned": pruned},
                    speed.prompt_tokens,
                    speed.batch_size,
                    speed.new_tokens,
                    speed.warmup,
                    speed.repeats,
                )
                device = next(model.parameters()).device
                report_speed = {
                    "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda"
                    else f"cpu ({torch.get_num_threads()} threads)",
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "prompt_tokens": speed.prompt_tokens,
                    "batch_size": speed.batch_size,
                    "new_tokens": speed.new_tokens,
                    "warmup": speed.warmup,
                    "repeats": speed.repeats,
                    "dense": results["dense"].as_dict(),
                    "pruned": results["pruned"].as_dict(),
                }
        pruned_parameters = count_parameters(pruned)
        dense_parameters = prepared.dense_parameters
        report = {
            "recipe": recipe_to_dict(recipe),
            "model": {
                "source": recipe.model.source,
                "kind": prepared.model_source.kind,
                "location": prepared.model_source.location,
                "model_type": shape.model_type,
            },
            "parameters": {
                "dense": dense_parameters,
                "pruned": pruned_parameters,
                "target_removed": prepared.params_to_remove,
                "removed": dense_parameters["total"] - pruned_parameters["total"],
                "removed_fraction": 1 - pruned_parameters["total"] / dense_parameters["total"],
            },
            "layers": layer_table(shape, allocation),
            "allocation": {"strategy": recipe.allocation.strategy, "activation_threshold": allocation.threshold},
            "statistics": statistics_info,
            "perplexity": report_perplexity,
            "zeroshot": report_zeroshot,
            "speed": report_speed,
            "recovery": report_recovery,
            "checkpoint": {"path": str(output / "model"), "remote_code": has_layer_widths(pruned.config)},
            "stage_seconds": stage_seconds,
            "notes": notes,
        }
        write_report(report, partial)
    if report_recovery:
        shutil.rmtree(report_recovery["state_dir"], ignore_errors=True)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prune.run", description="Prune a model as a recipe says.")
    parser.add_argument("recipe", help="YAML recipe (see README, 'Recipe reference')")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set pruning.target=0.2 (repeatable)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved recipe and its parameter budget, then stop"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        prepared = prepare(load_recipe(args.recipe, args.set), overwrite=args.overwrite)
        if args.dry_run:
            print(dry_run_text(prepared), end="")
            return 0
        output = execute(prepared)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"done: {output}/report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
