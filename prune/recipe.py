"""Recipes: YAML files turned into validated dataclasses.

Every problem with a recipe raises :class:`RecipeError` naming the key (``pruning.target``) or the
path at fault; nothing is written anywhere before the recipe has been validated completely. The
allowed method names come from the registries of the stages (``SCORERS``, ``ALLOCATIONS``,
``RECONSTRUCTIONS``, ``EXPORTERS``), so a method registered there is a method a recipe can name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eval.zeroshot import LOCAL_TASKS
from prune.allocation import ALLOCATIONS
from prune.export import EXPORTERS
from prune.gguf_export import TENSOR_TYPES
from prune.reconstruct import RECONSTRUCTIONS
from prune.schema import SchemaError, apply_override, from_mapping, raise_first_failure, read_yaml_mapping, to_mapping
from prune.scoring import SCORERS


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the key or file at fault."""


@dataclass
class ModelSection:
    source: str = "smollm2-135m"
    """Hub id, local checkpoint directory, ``.gguf`` file, or the alias ``smollm2-135m``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on CUDA, float32 on CPU."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    device_map: str | dict[str, int | str] | None = None
    """Spread the model over devices with accelerate: ``auto``, ``balanced``, ``balanced_low_0``, ``sequential``
    or a mapping of module name to ``cuda:N`` / N, ``cpu`` or ``disk``; null: the whole model on ``device``."""
    max_memory: dict[str, str] | None = None
    """With ``device_map``: memory each device may take, e.g. ``{cuda:0: 20GiB, cpu: 60GiB}``."""


@dataclass
class CalibrationSection:
    source: str = "c4"
    """``c4``, ``wikitext2``, or a ``.txt`` / ``.jsonl`` (``{"text": ...}`` per line) file."""
    samples: int = 64
    seqlen: int = 512
    """Tokens per calibration sample."""
    seed: int = 0


@dataclass
class ScoringSection:
    method: str = "activation-obs"
    """A scorer of ``prune.scoring.SCORERS``."""
    objective: Literal["max_logit", "nll"] = "max_logit"
    """D in A = |w * dD/dw|: largest next-token logit at the last position (the paper), or sequence NLL."""
    aggregate: Literal["sum", "mean", "max"] = "sum"
    """How a unit's per-weight scores combine into the unit's score."""


@dataclass
class AllocationSection:
    strategy: str = "activation-density"
    """A strategy of ``prune.allocation.ALLOCATIONS``."""
    alpha: float = 2.0
    beta: float = 1.0
    gamma: float = 1.0
    """Activation threshold: absolute A value, or a multiple of the mean A (``gamma_mode: relative``)."""
    gamma_mode: Literal["absolute", "relative"] = "relative"
    layer_range: list[int] | None = None
    """[first, end]: only layers first .. end-1 are pruned, the others stay whole (null: every layer)."""
    search_generations: int = 40
    """``searched``: generations of the (1 + offspring) evolution."""
    search_offspring: int = 8
    """``searched``: mutations of the best candidate evaluated per generation."""
    search_samples: int = 4
    """``searched``: the first calibration samples the fitness (KL divergence to the dense model) is measured on."""


@dataclass
class PruningSection:
    target: float = 0.3
    """Fraction of the dense model's total parameters to remove (embeddings counted once)."""
    attention_unit: Literal["kv_group", "query_head"] = "query_head"
    """``kv_group``: remove whole KV groups; ``query_head``: the same number of query heads from every group."""
    round_to: int | None = None
    """Kept FFN channels per layer are a multiple of this; null: 128 when the model runs on CUDA (a tensor-core
    tile's width), 8 elsewhere (``prune.models.default_round_to``)."""
    min_ffn_channels: int = 64
    """Every layer keeps at least this many FFN channels (and always >= 1 KV group and >= 1 head per group)."""
    reconstruct: str = "lstsq"
    """A reconstruction of ``prune.reconstruct.RECONSTRUCTIONS``: none, FLAP's bias, or a least-squares refit."""
    damping: float = 0.0001
    """lstsq: ridge term, relative to the mean diagonal of the kept inputs' second moment."""
    rounds: int = 1
    """Prune in this many rounds: round r removes up to r / rounds of the target from the model the rounds
    before left, with statistics collected again on it (iterative pruning)."""


@dataclass
class RecoverySection:
    method: Literal["none", "distill", "lora"] = "none"
    """``distill``: train the pruned model's weights; ``lora``: train LoRA adapters (peft), merged before saving."""
    source: str = "c4"
    """Training text (same sources as calibration); must not be the perplexity text."""
    tokens: int = 2_000_000
    """Token budget: steps = ceil(tokens / (batch_size x seqlen)); the source is cycled when smaller."""
    seqlen: int = 256
    batch_size: int = 8
    learning_rate: float = 0.0001
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    kl_weight: float = 1.0
    """Weight of T^2 x KL(dense teacher || pruned student) on next-token distributions."""
    temperature: float = 1.0
    nll_weight: float = 0.0
    """Weight of the text's next-token NLL."""
    train: Literal["decoder_layers", "all"] = "decoder_layers"
    """``distill``: which weights train (``decoder_layers`` freezes embeddings, final norm and head)."""
    lora_rank: int = 16
    lora_alpha: float = 32.0
    eval_every: int = 25
    """Steps between held-out perplexity points of the recovery curve."""
    heldout_windows: int = 2
    """Held-out slice: the last windows (perplexity seqlen) of the perplexity text, outside the evaluated ones."""
    save_every: int = 25
    """Steps between resumable saves (in the cache; a rerun of the same command continues from the last)."""
    seed: int = 0


@dataclass
class ExportSection:
    formats: list[str] = field(default_factory=lambda: ["hf"])
    """Exporters of ``prune.export.EXPORTERS`` to write the pruned model with: ``hf``, ``gguf``."""
    gguf_type: str = "f16"
    """Tensor type of the GGUF file's weight matrices (``prune.gguf_export.TENSOR_TYPES``)."""


@dataclass
class PerplexitySection:
    dataset: str = "wikitext2"
    """``wikitext2``, ``c4``, or a ``.txt`` / ``.jsonl`` file."""
    seqlen: int = 2048
    windows: int | None = 16
    """Number of leading non-overlapping windows; null = all."""


@dataclass
class SpeedSection:
    enabled: bool = True
    prompt_tokens: int = 128
    batch_size: int = 1
    new_tokens: int = 64
    warmup: int = 1
    repeats: int = 5
    decode_loop: Literal["auto", "dynamic", "static"] = "auto"
    """``static``: a preallocated KV cache, decode steps in CUDA graphs on a GPU; ``auto``: static on CUDA only."""


@dataclass
class ZeroshotSection:
    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: list(LOCAL_TASKS))
    """lm-eval task names."""
    source: Literal["auto", "local", "harness"] = "auto"
    """``local``: the shipped task files over $PRUNE_DATA_DIR/zeroshot; ``harness``: lm-eval's own;
    ``auto``: local when present."""
    limit: int | None = 100
    """Items per task (the first ones); null = all."""
    batch_size: int = 16
    seed: int = 0


@dataclass
class EngineSection:
    """The exported GGUF file in llama.cpp (needs ``export.formats`` with gguf and the ``engine`` extra)."""

    enabled: bool = True
    threads: int | None = None
    """CPU threads of the engine; null = as many as torch uses."""
    prompt_tokens: int = 128
    new_tokens: int = 64
    warmup: int = 1
    repeats: int = 5
    perplexity: bool = True
    """Also the perplexity of the pruned file on the perplexity windows, from the engine's logits."""


@dataclass
class EvaluationSection:
    perplexity: PerplexitySection = field(default_factory=PerplexitySection)
    zeroshot: ZeroshotSection = field(default_factory=ZeroshotSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    engine: EngineSection = field(default_factory=EngineSection)


@dataclass
class Recipe:
    output: str = "runs/default"
    """Output directory; an existing one is refused unless --overwrite is given."""
    cache_dir: str | None = None
    """Cache of statistics, converted GGUF models and dense evaluations; null = $PRUNE_CACHE_DIR or ~/.cache/prune."""
    model: ModelSection = field(default_factory=ModelSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    allocation: AllocationSection = field(default_factory=AllocationSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    recovery: RecoverySection = field(default_factory=RecoverySection)
    export: ExportSection = field(default_factory=ExportSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)


def _one_of(names) -> str:
    return "must be one of " + ", ".join(names)


def _check_ranges(recipe: Recipe) -> None:
    scoring, allocation, pruning = recipe.scoring, recipe.allocation, recipe.pruning
    recovery, evaluation = recipe.recovery, recipe.evaluation
    strategy = ALLOCATIONS.get(allocation.strategy)
    scorer = SCORERS.get(scoring.method)
    checks = [
        ("scoring.method", scorer is not None, _one_of(SCORERS)),
        ("allocation.strategy", strategy is not None, _one_of(ALLOCATIONS)),
        ("pruning.reconstruct", pruning.reconstruct in RECONSTRUCTIONS, _one_of(RECONSTRUCTIONS)),
        ("pruning.target", 0 <= pruning.target < 1, "must be in [0, 1)"),
        ("pruning.round_to", pruning.round_to is None or pruning.round_to >= 1, "must be >= 1 or null"),
        ("pruning.min_ffn_channels", pruning.min_ffn_channels >= 1, "must be >= 1"),
        ("pruning.damping", pruning.damping >= 0, "must be >= 0"),
        ("pruning.rounds", pruning.rounds >= 1, "must be >= 1"),
        (
            "pruning.rounds",
            pruning.rounds == 1 or strategy is None or (strategy.uses_scores and not strategy.evaluates),
            f"must be 1 with allocation.strategy {allocation.strategy}",
        ),
        (
            "pruning.reconstruct",
            strategy is None or strategy.uses_scores or pruning.reconstruct == "none",
            f"must be none with allocation.strategy {allocation.strategy} (whole layers are removed)",
        ),
        (
            "scoring.objective",
            scorer is None or scorer.objective in (None, scoring.objective),
            f"must be {scorer.objective if scorer else None} with scoring.method {scoring.method}",
        ),
        ("calibration.samples", recipe.calibration.samples > 0, "must be > 0"),
        ("calibration.seqlen", recipe.calibration.seqlen > 1, "must be > 1"),
        ("allocation.beta", 0 <= allocation.beta <= 1, "must be in [0, 1]"),
        ("allocation.gamma", allocation.gamma > 0, "must be > 0"),
        ("allocation.search_generations", allocation.search_generations >= 0, "must be >= 0"),
        ("allocation.search_offspring", allocation.search_offspring >= 1, "must be >= 1"),
        (
            "allocation.search_samples",
            1 <= allocation.search_samples <= recipe.calibration.samples,
            f"must be in [1, calibration.samples = {recipe.calibration.samples}]",
        ),
        (
            "allocation.layer_range",
            allocation.layer_range is None
            or (len(allocation.layer_range) == 2 and 0 <= allocation.layer_range[0] < allocation.layer_range[1]),
            "must be null or [first, end] with 0 <= first < end",
        ),
        ("recovery.tokens", recovery.tokens > 0, "must be > 0"),
        ("recovery.seqlen", recovery.seqlen > 1, "must be > 1"),
        ("recovery.batch_size", recovery.batch_size > 0, "must be > 0"),
        ("recovery.learning_rate", recovery.learning_rate > 0, "must be > 0"),
        ("recovery.warmup_steps", recovery.warmup_steps >= 0, "must be >= 0"),
        ("recovery.max_grad_norm", recovery.max_grad_norm > 0, "must be > 0"),
        ("recovery.kl_weight", recovery.kl_weight >= 0, "must be >= 0"),
        (
            "recovery.nll_weight",
            recovery.nll_weight >= 0 and recovery.kl_weight + recovery.nll_weight > 0,
            "must be >= 0, and kl_weight + nll_weight > 0",
        ),
        ("recovery.temperature", recovery.temperature > 0, "must be > 0"),
        ("recovery.lora_rank", recovery.lora_rank > 0, "must be > 0"),
        ("recovery.eval_every", recovery.eval_every > 0, "must be > 0"),
        ("recovery.heldout_windows", recovery.heldout_windows > 0, "must be > 0"),
        ("recovery.save_every", recovery.save_every > 0, "must be > 0"),
        (
            "export.formats",
            bool(recipe.export.formats) and all(f in EXPORTERS for f in recipe.export.formats),
            "must name one or more of " + ", ".join(EXPORTERS),
        ),
        ("export.formats", len(set(recipe.export.formats)) == len(recipe.export.formats), "must not repeat a format"),
        ("export.gguf_type", recipe.export.gguf_type in TENSOR_TYPES, _one_of(TENSOR_TYPES)),
        ("evaluation.perplexity.seqlen", evaluation.perplexity.seqlen > 1, "must be > 1"),
        (
            "evaluation.perplexity.windows",
            evaluation.perplexity.windows is None or evaluation.perplexity.windows > 0,
            "must be > 0 or null",
        ),
        (
            "evaluation.zeroshot.tasks",
            evaluation.zeroshot.source == "harness" or all(t in LOCAL_TASKS for t in evaluation.zeroshot.tasks),
            f"must be among the local tasks {list(LOCAL_TASKS)} (or set evaluation.zeroshot.source: harness)",
        ),
        ("evaluation.zeroshot.tasks", len(evaluation.zeroshot.tasks) > 0, "must name at least one task"),
        (
            "evaluation.zeroshot.limit",
            evaluation.zeroshot.limit is None or evaluation.zeroshot.limit > 0,
            "must be > 0 or null",
        ),
        ("evaluation.zeroshot.batch_size", evaluation.zeroshot.batch_size > 0, "must be > 0"),
        ("evaluation.speed.prompt_tokens", evaluation.speed.prompt_tokens > 0, "must be > 0"),
        ("evaluation.speed.batch_size", evaluation.speed.batch_size > 0, "must be > 0"),
        ("evaluation.speed.new_tokens", evaluation.speed.new_tokens > 0, "must be > 0"),
        ("evaluation.speed.warmup", evaluation.speed.warmup >= 0, "must be >= 0"),
        ("evaluation.speed.repeats", evaluation.speed.repeats > 0, "must be > 0"),
        (
            "evaluation.engine.threads",
            evaluation.engine.threads is None or evaluation.engine.threads > 0,
            "must be > 0",
        ),
        ("evaluation.engine.prompt_tokens", evaluation.engine.prompt_tokens > 1, "must be > 1"),
        ("evaluation.engine.new_tokens", evaluation.engine.new_tokens > 0, "must be > 0"),
        ("evaluation.engine.warmup", evaluation.engine.warmup >= 0, "must be >= 0"),
        ("evaluation.engine.repeats", evaluation.engine.repeats > 0, "must be > 0"),
        (
            "model.device",
            recipe.model.device in ("auto", "cpu", "cuda") or recipe.model.device.startswith("cuda:"),
            "must be auto, cpu, cuda or cuda:N",
        ),
        *_placement_checks(recipe),
        ("output", bool(recipe.output.strip()), "must not be empty"),
    ]
    raise_first_failure(recipe, checks)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)")


def _is_device(device: int | str, disk: bool) -> bool:
    if isinstance(device, int):
        return device >= 0
    return bool(re.fullmatch(r"cpu|cuda|cuda:\d+|\d+", device)) or (disk and device == "disk")


def _placement_checks(recipe: Recipe) -> list[tuple[str, bool, str]]:
    """Checks of ``model.device_map`` and ``model.max_memory``, and of the stages a device map excludes."""
    model = recipe.model
    device_map, spread = model.device_map, model.device_map is not None
    return [
        (
            "model.device_map",
            device_map is None
            or (
                (device_map in DEVICE_MAP_STRATEGIES if isinstance(device_map, str) else bool(device_map))
                and (isinstance(device_map, str) or all(_is_device(d, disk=True) for d in device_map.values()))
            ),
            f"must be null, one of {', '.join(DEVICE_MAP_STRATEGIES)}, or a mapping of module name to a device "
            "(cuda:N, N, cpu or disk)",
        ),
        ("model.device", not spread or model.device == "auto", "must be auto when model.device_map is set"),
        ("model.max_memory", spread or model.max_memory is None, "needs model.device_map"),
        (
            "model.max_memory",
            model.max_memory is None
            or all(_is_device(k, disk=False) and MEMORY_SIZE.fullmatch(v) for k, v in model.max_memory.items()),
            "must map devices (cuda:N, cpu) to sizes such as 20GiB",
        ),
        (
            "recovery.method",
            not spread or recipe.recovery.method == "none",
            "must be none with model.device_map (recovery trains on one device)",
        ),
        (
            "evaluation.speed.enabled",
            not spread or not recipe.evaluation.speed.enabled,
            "must be false with model.device_map (it times whole models on one device; the engine stage and "
            "python -m eval.speed measure the pruned shape)",
        ),
    ]


def recipe_from_mapping(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A validated recipe from a parsed mapping, with ``--set`` style overrides applied; RecipeError names the key."""
    try:
        for assignment in overrides:
            apply_override(data, assignment)
        recipe = from_mapping(Recipe, data)
        _check_ranges(recipe)
    except SchemaError as error:
        raise RecipeError(str(error)) from None
    return recipe


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe (no file: the defaults). Raises RecipeError naming the key or file."""
    try:
        data = read_yaml_mapping(path)
    except SchemaError as error:
        raise RecipeError(str(error)) from None
    return recipe_from_mapping(data, overrides)


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as a plain mapping (the form report.json records and ``--dry-run`` prints)."""
    return to_mapping(recipe)
