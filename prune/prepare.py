"""Preparing a run: a recipe checked against the files, the model's configuration and the output
directory, before any weight is loaded or anything is written; and what the run will need.

:func:`prepare` resolves every source, reads the model's configuration, derives the parameter budget
and refuses an impossible one; :func:`dry_run_text` prints what it resolved (``--dry-run``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from eval.zeroshot import local_task_configs, resolve_source
from prune.allocation import ALLOCATIONS, ImpossibleTargetError
from prune.blocks import BlockShape, block_shape, count_parameters
from prune.calibration import DataSourceError, TextSource, resolve_text_source
from prune.estimate import (
    MemoryPlanError,
    StageMemory,
    available_bytes,
    check_memory,
    estimate_memory,
    slow_dtype_note,
)
from prune.families import FAMILIES, family_of
from prune.gguf_export import TENSOR_TYPES, gguf_coverage
from prune.models import (
    ModelSource,
    ModelSourceError,
    check_weights_fit,
    default_round_to,
    load_config,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)
from prune.outputs import OutputRefused, check_output, is_run_output
from prune.paths import cache_dir
from prune.pruner import model_class_for
from prune.recipe import Recipe, RecipeError, recipe_to_dict
from prune.reconstruct import RECONSTRUCTIONS
from prune.scoring import SCORERS, scores_experts
from prune.statistics import SUMMARY_FILE, Statistic, StatisticsError, cache_key

USER_ERRORS = (
    RecipeError,
    ModelSourceError,
    DataSourceError,
    ImpossibleTargetError,
    StatisticsError,
    MemoryPlanError,
    OutputRefused,
)
"""Errors that mean "the recipe or its inputs are wrong": one line, exit code 2."""


def statistics_needs(recipe: Recipe) -> frozenset[Statistic]:
    """What the statistics pass must collect for the recipe's scorer, allocation and reconstruction."""
    strategy = ALLOCATIONS[recipe.allocation.strategy]
    scorer_needs = SCORERS[recipe.scoring.method].needs if strategy.uses_scores else frozenset()
    return scorer_needs | strategy.needs | RECONSTRUCTIONS[recipe.pruning.reconstruct].needs


def reads_samples(recipe: Recipe) -> bool:
    """Whether pruning runs the calibration samples through the model: a sequential reconstruction, an
    allocation that evaluates candidates, or the statistics of a later round."""
    return (
        RECONSTRUCTIONS[recipe.pruning.reconstruct].sequential
        or ALLOCATIONS[recipe.allocation.strategy].evaluates
        or recipe.pruning.rounds > 1
    )


def needs_dense_after_pruning(recipe: Recipe) -> bool:
    """Whether a stage after pruning needs the whole dense model: the recovery's teacher, or the speed stage
    (which times both models side by side). Otherwise the run prunes in place, after the dense parts."""
    return recipe.recovery.method != "none" or recipe.evaluation.speed.enabled


def recipe_device(recipe: Recipe) -> torch.device:
    """The device ``model.device`` names (``auto``: CUDA when present), whether or not this machine has it."""
    name = recipe.model.device
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def for_device(recipe: Recipe, device: torch.device | None = None) -> Recipe:
    """The recipe with its device-dependent defaults filled in for ``device`` (default: :func:`recipe_device`):
    a null ``pruning.round_to``."""
    if recipe.pruning.round_to is not None:
        return recipe
    device = device or recipe_device(recipe)
    return replace(recipe, pruning=replace(recipe.pruning, round_to=default_round_to(device)))


def check_processes(recipe: Recipe, count: int) -> None:
    """RecipeError when ``count`` processes started by a launcher (``prune/processes.py``) cannot share the
    recipe's work."""
    if count == 1:
        return
    if recipe.model.device_map is not None:
        raise RecipeError(
            f"model.device_map: spreads one model over devices, but {count} processes each hold the whole model; "
            "use one or the other"
        )
    if recipe.calibration.samples < count:
        raise RecipeError(
            f"calibration.samples: {recipe.calibration.samples} samples cannot be shared by {count} processes"
        )
    if recipe.recovery.method != "none" and recipe.recovery.batch_size % count:
        raise RecipeError(
            f"recovery.batch_size: {recipe.recovery.batch_size} is not a multiple of the {count} processes "
            "that share each batch"
        )


def check_experts(recipe: Recipe, shape: BlockShape) -> None:
    """RecipeError when the recipe asks a mixture-of-experts model for a method that does not prune experts: a
    scorer or reconstruction that reads the inputs of gate/up/down (an expert sees only the tokens routed to
    it), an allocation that ranks or searches the dense layers' removal steps, LoRA (peft adapts linears; the
    experts are 3-D weights). Nothing to check for a dense model."""
    if not shape.experts_per_token:
        return
    name = f"{shape.model_type} (mixture of experts)"
    strategy = ALLOCATIONS[recipe.allocation.strategy]
    if not strategy.prunes_experts:
        allowed = ", ".join(key for key, value in ALLOCATIONS.items() if value.prunes_experts)
        raise RecipeError(f"allocation.strategy: {recipe.allocation.strategy!r} does not prune {name}; use {allowed}")
    scorer = SCORERS[recipe.scoring.method]
    if strategy.uses_scores and not scores_experts(scorer):
        allowed = ", ".join(key for key, value in SCORERS.items() if scores_experts(value))
        raise RecipeError(
            f"scoring.method: {recipe.scoring.method!r} does not score the experts of {name}; use {allowed}"
        )
    reconstruction = RECONSTRUCTIONS[recipe.pruning.reconstruct]
    if reconstruction.needs or reconstruction.sequential:
        raise RecipeError(
            f"pruning.reconstruct: {recipe.pruning.reconstruct!r} refits down_proj from its inputs, which the experts "
            f"of {name} do not share; use none"
        )
    if recipe.recovery.method == "lora":
        raise RecipeError(f"recovery.method: lora adapts linear layers; the experts of {name} are not: use distill")


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
    calibration_source: TextSource
    evaluation_source: TextSource
    recovery_source: TextSource | None
    memory: list[StageMemory]
    """Estimated peak memory of every stage (:mod:`prune.estimate`)."""
    inputs: list[tuple[str, Path]]
    """What the run reads, by name (:func:`run_inputs`): the output must not touch it."""
    overwrite: bool
    """Whether an existing output of an earlier run may be replaced."""

    def check_output(self) -> None:
        """RecipeError unless the output may be written (:func:`prune.outputs.check_output`); called again by the
        run once it holds the output's lock, since another run may have written it meanwhile."""
        try:
            check_output(self.output, self.inputs, self.overwrite, is_run_output)
        except OutputRefused as error:
            raise RecipeError(str(error)) from None

    @property
    def needs(self) -> frozenset[Statistic]:
        return statistics_needs(self.recipe)


def added_bias_parameters(recipe: Recipe, shape: BlockShape) -> int:
    """Biases that reconstruction adds to o_proj and down_proj; the budget solver removes that much more."""
    adds_biases = RECONSTRUCTIONS[recipe.pruning.reconstruct].adds_biases
    return 2 * shape.hidden_size * shape.num_layers if adds_biases else 0


def protected_layers(recipe: Recipe, shape: BlockShape) -> frozenset[int]:
    """Layers outside ``allocation.layer_range``: they are not pruned."""
    if recipe.allocation.layer_range is None:
        return frozenset()
    first, end = recipe.allocation.layer_range
    return frozenset(i for i in range(shape.num_layers) if not first <= i < end)


def parameters_to_remove(recipe: Recipe, shape: BlockShape, dense: dict[str, int]) -> int:
    """``pruning.target`` x the dense model's parameters (``dense``: ``prune.blocks.count_parameters``; ``total`` or
    ``decoder_blocks`` as ``pruning.target_of`` says), rounded. ImpossibleTargetError when that is more of the
    decoder blocks than ``pruning.max_decoder_sparsity`` or than the allocation can remove (with the biases a
    reconstruction adds) within the per-layer minimums; RecipeError when ``allocation.layer_range`` does not fit
    the model."""
    p = recipe.pruning
    total = dense["total"]
    params_to_remove = round(p.target * (total if p.target_of == "all" else dense["decoder_blocks"]))
    decoder_share = params_to_remove / dense["decoder_blocks"]
    if decoder_share > p.max_decoder_sparsity:
        raise ImpossibleTargetError(
            f"pruning.target: {p.target} of {'all' if p.target_of == 'all' else 'the decoder blocks'} parameters "
            f"removes {params_to_remove:,} parameters, "
            f"{decoder_share:.1%} of the decoder blocks' {dense['decoder_blocks']:,} (embeddings and head are "
            f"{1 - dense['decoder_blocks'] / total:.1%} of this model), above pruning.max_decoder_sparsity "
            f"{p.max_decoder_sparsity}; set pruning.target_of: decoder (a share of the decoder blocks), lower "
            "pruning.target, or raise pruning.max_decoder_sparsity"
        )
    layer_range = recipe.allocation.layer_range
    if layer_range is not None and layer_range[1] > shape.num_layers:
        raise RecipeError(
            f"allocation.layer_range: end {layer_range[1]} is beyond the model's {shape.num_layers} layers"
        )
    most = ALLOCATIONS[recipe.allocation.strategy].most_removable(shape, p, protected_layers(recipe, shape))
    if params_to_remove + added_bias_parameters(recipe, shape) > most:
        raise ImpossibleTargetError(
            f"pruning.target: {p.target} asks to remove {params_to_remove:,} parameters but at most {most:,} "
            f"({most / total:.1%}) can go while every layer keeps 1 KV group, 1 query head "
            f"per group and {p.min_ffn_channels} FFN channels"
        )
    return params_to_remove


def second_moment_inverters(recipe: Recipe) -> list[str]:
    """What in the recipe inverts an input's second moment (x xᵀ over the calibration tokens): its scores, its
    refit; in words, for messages."""
    strategy = ALLOCATIONS[recipe.allocation.strategy]
    scorer = SCORERS[recipe.scoring.method]
    reconstruction = RECONSTRUCTIONS[recipe.pruning.reconstruct]
    inverters = []
    if strategy.uses_scores and Statistic.SECOND_MOMENTS in scorer.needs:
        inverters.append(f"the {recipe.scoring.method} scores")
    if reconstruction.sequential or Statistic.SECOND_MOMENTS in reconstruction.needs:
        inverters.append(f"the {recipe.pruning.reconstruct} refit")
    return inverters


def inverted_input_width(recipe: Recipe, shape: BlockShape) -> int | None:
    """The widest input whose second moment a score or a refit of the recipe inverts: o_proj's (query heads x
    head_dim) or down_proj's (FFN channels); None when none is inverted."""
    if not second_moment_inverters(recipe):
        return None
    return max(max(w.query_heads * shape.head_dim, w.ffn_channels) for w in shape.layers)


def check_calibration_size(recipe: Recipe, shape: BlockShape) -> None:
    """RecipeError when the calibration holds fewer tokens than ``calibration.min_tokens_per_input`` x the widest
    input a score or a refit inverts (:func:`inverted_input_width`)."""
    width, c = inverted_input_width(recipe, shape), recipe.calibration
    tokens = c.samples * c.seqlen
    if width is None or tokens >= c.min_tokens_per_input * width:
        return
    needed = math.ceil(c.min_tokens_per_input * width)
    raise RecipeError(
        f"calibration: {c.samples} x {c.seqlen} = {tokens:,} tokens for inputs {width:,} wide, whose second moment "
        f"{' and '.join(second_moment_inverters(recipe))} invert ({tokens / width:.2f} tokens per input, below "
        f"calibration.min_tokens_per_input {c.min_tokens_per_input}): raise calibration.samples or "
        f"calibration.seqlen to at least {needed:,} tokens, or set pruning.reconstruct: none and a scoring.method "
        "without second moments"
    )


def prepare(recipe: Recipe, overwrite: bool = False) -> Prepared:
    """Validate a recipe against the files, the model's configuration and the output directory.

    Writes nothing outside the cache (a missing ``smollm2-135m`` file is fetched into it).
    Raises one of USER_ERRORS with a message naming the key or path at fault.
    """
    recipe = for_device(recipe)
    output = Path(recipe.output).expanduser()
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
    inputs = run_inputs(cache, model_source, [calibration_source, evaluation_source, recovery_source])
    try:
        check_output(output, inputs, overwrite, is_run_output)
    except OutputRefused as error:  # the recipe's output
        raise RecipeError(str(error)) from None
    try:
        shape = block_shape(config)
    except ValueError as error:
        raise RecipeError(f"model.source: {error}") from None
    family = family_of(config)
    check_experts(recipe, shape)
    check_calibration_size(recipe, shape)
    if "gguf" in recipe.export.formats and not family.gguf:
        raise RecipeError(f"export.formats: {gguf_coverage(family)}")
    dense_model = model_of(config, model_source)
    if model_source.kind == "directory":
        check_weights_fit(Path(model_source.location), dense_model)
    dense_parameters = count_parameters(dense_model)
    params_to_remove = parameters_to_remove(recipe, shape, dense_parameters)
    zs = recipe.evaluation.zeroshot
    if zs.enabled and resolve_source(zs.tasks, zs.source) == "local":
        local_task_configs(zs.tasks)  # raises DataSourceError naming a missing directory or file
    needs = statistics_needs(recipe)
    in_place = not needs_dense_after_pruning(recipe)
    memory = estimate_memory(recipe, shape, config.vocab_size, dense_parameters["total"], needs, in_place)
    prepared = Prepared(
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
        memory,
        inputs,
        overwrite,
    )
    check_disk(prepared)
    return prepared


def statistics_path(prepared: Prepared, dtype: torch.dtype) -> Path:
    """The statistics cache directory of the recipe's model (loaded in ``dtype``), calibration and objective."""
    recipe = prepared.recipe
    key = cache_key(
        prepared.model_source.fingerprint(),
        str(dtype),
        recipe_to_dict(recipe)["calibration"],
        prepared.calibration_source.fingerprint(),
        recipe.scoring.objective,
    )
    return prepared.cache / "stats" / key


def disk_needs(prepared: Prepared) -> dict[str, dict[str, int]]:
    """Bytes the run writes, by where (``cache_dir``, ``output``) and what: the pruned checkpoint at the resume point
    (in the cache; the output links it), the second moments when the statistics cache lacks them, a sequential
    refit's files of one layer (those of every kept FFN channel, at most), the GGUF export.
    Not counted: recovery's resumable state, the dense model's GGUF file of the engine stage, a GGUF conversion."""
    recipe, shape = prepared.recipe, prepared.shape
    dtype = resolve_dtype(recipe.model.dtype, recipe_device(recipe))
    kept = prepared.dense_parameters["total"] - prepared.params_to_remove + added_bias_parameters(recipe, shape)
    cache = {"the pruned checkpoint": kept * dtype.itemsize}
    if Statistic.SECOND_MOMENTS in prepared.needs and Statistic.SECOND_MOMENTS not in cached_statistics(
        statistics_path(prepared, dtype)
    ):
        features = [(w.query_heads * shape.head_dim, w.ffn_channels) for w in shape.layers]
        cache["the second moments"] = sum(4 * (o * o + f * f) for o, f in features)
    if RECONSTRUCTIONS[recipe.pruning.reconstruct].sequential:  # one layer's at a time (prune.sequential)
        widest = max(w.ffn_channels for w in shape.layers)
        tokens = recipe.calibration.samples * recipe.calibration.seqlen
        cache["the sequential refit's attention outputs and down_proj inputs"] = (
            tokens * (shape.hidden_size + widest) * dtype.itemsize
        )
    output = {}
    if "gguf" in recipe.export.formats:
        per_parameter = {"f32": 4}.get(recipe.export.gguf_type, 2) + TENSOR_TYPES[
            recipe.export.gguf_type
        ].engine_quantized
        output["the GGUF export"] = kept * per_parameter
    return {"cache_dir": cache, "output": output}


def cached_statistics(path: Path) -> frozenset[Statistic]:
    """What the statistics cache directory ``path`` says it provides (nothing when there is none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / SUMMARY_FILE), framework="pt") as file:
            return frozenset(Statistic(kind) for kind in json.loads((file.metadata() or {})["provides"]))
    except Exception:  # no cache, or a damaged one: it will be computed again
        return frozenset()


def check_disk(prepared: Prepared) -> None:
    """RecipeError when the file system of the cache or of the output is read-only or has less free space than
    the run writes there (:func:`disk_needs`; both on one file system: their sum)."""
    needs = disk_needs(prepared)
    places = {"cache_dir": prepared.cache, "output": prepared.output}
    existing = {key: next(p for p in [path, *path.parents] if p.exists()) for key, path in places.items()}
    if os.stat(existing["cache_dir"]).st_dev == os.stat(existing["output"]).st_dev:
        needs = {"cache_dir": needs["cache_dir"] | needs["output"]}
    for key, parts in needs.items():
        place = existing[key]
        if not os.access(place, os.W_OK):
            raise RecipeError(f"{key}: cannot write into {place} (read-only)")
        free, total = shutil.disk_usage(place).free, sum(parts.values())
        if total > free:
            raise RecipeError(
                f"{key}: {place} has {free / 2**30:.2f} GiB free and the run writes {total / 2**30:.2f} GiB there "
                f"({', '.join(parts)}); free some space or choose another {key}"
            )


def run_inputs(cache: Path, model: ModelSource, texts: list[TextSource | None]) -> list[tuple[str, Path]]:
    """What a run reads, which its output must not touch: the model source, the data files, the data and models
    directories, the cache."""
    inputs = [("cache_dir", cache)]
    if model.kind != "hub":
        inputs.append(("the model source", Path(model.location)))
    inputs += [(text.key, Path(text.location)) for text in texts if text is not None and text.kind != "hub"]
    for variable in ("PRUNE_DATA_DIR", "PRUNE_MODELS_DIR"):
        if os.environ.get(variable):
            inputs.append((f"${variable}", Path(os.environ[variable])))
    return inputs


def model_of(config, source: ModelSource) -> torch.nn.Module:
    """The model ``config`` builds, without memory (meta tensors); ModelSourceError when it builds none."""
    try:
        with torch.device("meta"):
            return model_class_for(config)(config)
    except Exception as error:  # transformers rejects an inconsistent configuration in many ways
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ModelSourceError(
            f"model.source: {source.location}: its configuration builds no model ({reason})"
        ) from None


def check_memory_plan(prepared: Prepared) -> None:
    """MemoryPlanError when a stage's estimated peak exceeds the memory available on the recipe's device now.
    Not checked with ``model.device_map``: accelerate places the model within ``model.max_memory``."""
    if prepared.recipe.model.device_map is not None:
        return
    device = resolve_device(prepared.recipe.model.device)
    host = torch.device("cpu")
    check_memory([s for s in prepared.memory if not s.host], available_bytes(device), str(device))
    check_memory([s for s in prepared.memory if s.host], available_bytes(host), str(host))


def unit_description(recipe: Recipe, shape: BlockShape) -> str:
    """What the recipe removes from this model, in words (``--dry-run``)."""
    if not ALLOCATIONS[recipe.allocation.strategy].uses_scores:
        return f"whole decoder layers (of {shape.num_layers})"
    widths = shape.layers[0]
    attention = (
        f"KV groups (of {widths.kv_heads}, each with its query heads: {widths.heads_per_group})"
        if recipe.pruning.attention_unit == "kv_group"
        else f"query heads (of {widths.query_heads}; {widths.kv_heads} KV heads stay)"
    )
    ffn = f"FFN channels (of {widths.ffn_channels})"
    if widths.experts:
        ffn = (
            f"experts (of {widths.experts}; {shape.experts_per_token} per token) and the FFN channels of each "
            f"(of {widths.ffn_channels})"
        )
    return f"{attention} and {ffn} per layer, {shape.num_layers} layers"


def dry_run_text(prepared: Prepared) -> str:
    """The resolved recipe, the parameter budget it implies and what the statistics pass will collect."""
    dense = prepared.dense_parameters
    kept = dense["total"] - prepared.params_to_remove
    decoder_linears = sum(prepared.shape.linear_weight_count(w) for w in prepared.shape.layers)
    budget = {
        "model": f"{prepared.model_source.kind}: {prepared.model_source.location}",
        "family": f"{prepared.shape.model_type} ({FAMILIES[prepared.shape.model_type].name})",
        "units": unit_description(prepared.recipe, prepared.shape),
        "dense_total_parameters": dense["total"],
        "dense_decoder_block_parameters": dense["decoder_blocks"],
        "target_of": prepared.recipe.pruning.target_of,
        "parameters_to_remove": prepared.params_to_remove,
        "parameters_kept": kept,
        "kept_fraction": round(kept / dense["total"], 6),
        "removed_share_of_all_parameters": round(prepared.params_to_remove / dense["total"], 6),
        "removed_share_of_decoder_block_parameters": round(prepared.params_to_remove / dense["decoder_blocks"], 6),
        "implied_decoder_linear_sparsity": round(prepared.params_to_remove / decoder_linears, 6),
        "statistics": sorted(need.value for need in prepared.needs),
        "calibration_tokens": prepared.recipe.calibration.samples * prepared.recipe.calibration.seqlen,
        "widest_inverted_input": inverted_input_width(prepared.recipe, prepared.shape),
    }
    memory = {stage.stage: stage.describe() for stage in prepared.memory}
    note = slow_dtype_note(prepared.recipe)
    return (
        yaml.safe_dump({"recipe": recipe_to_dict(prepared.recipe)}, sort_keys=False)
        + yaml.safe_dump({"budget": budget}, sort_keys=False)
        + yaml.safe_dump({"estimated_peak_memory": memory}, sort_keys=False)
        + (yaml.safe_dump({"notes": [note]}, sort_keys=False, width=1000) if note else "")
    )
