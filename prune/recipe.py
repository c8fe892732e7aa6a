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

from eval.stages import EvaluationSettings
from eval.zeroshot import LOCAL_TASKS
from prune.allocation import ALLOCATIONS
from prune.export import EXPORTERS
from prune.gguf_export import TENSOR_TYPES
from prune.reconstruct import RECONSTRUCTIONS
from prune.schema import (
    LAYER_SPAN,
    NOT_EMPTY,
    SchemaError,
    above,
    apply_override,
    at_least,
    field_checks,
    from_mapping,
    json_schema,
    matching,
    names_among,
    one_of,
    raise_first_failure,
    read_yaml_mapping,
    ruled,
    to_mapping,
    within,
)
from prune.scoring import SCORERS


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the key or file at fault."""


EXPORT_FORMATS = names_among(
    lambda: EXPORTERS, 1, lambda: "must name one or more of " + ", ".join(EXPORTERS) + ", each once"
)


@dataclass
class ModelSection:
    source: str = "smollm2-135m"
    """Hub id, local checkpoint directory, ``.gguf`` file, or the alias ``smollm2-135m``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bfloat16-if-fast"] = "auto"
    """``auto``: bfloat16 on CUDA, float32 on CPU; ``bfloat16-if-fast``: bfloat16 on CUDA and on CPUs with bfloat16
    instructions (AVX512-BF16 or AMX), float32 on other CPUs (which convert each bfloat16 product in software)."""
    device: str = ruled(matching(r"auto|cpu|cuda(:\d+)?", "must be auto, cpu, cuda or cuda:N"), "auto")
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
    samples: int = ruled(above(0), 64)
    seqlen: int = ruled(above(1), 512)
    """Tokens per calibration sample."""
    seed: int = 0
    min_tokens_per_input: float = ruled(at_least(0), 1.0)
    """Calibration tokens (samples x seqlen) a run needs per dimension of the widest input whose second moment a
    score or a refit inverts; below 1 that moment is singular and the refit fits the few tokens it saw."""


@dataclass
class ScoringSection:
    method: str = ruled(one_of(lambda: SCORERS), "activation-obs")
    """A scorer of ``prune.scoring.SCORERS``."""
    objective: Literal["max_logit", "nll"] = "max_logit"
    """D in A = |w * dD/dw|: largest next-token logit at the last position (the paper), or sequence NLL."""
    aggregate: Literal["sum", "mean", "max"] = "sum"
    """How a unit's per-weight scores combine into the unit's score."""


@dataclass
class AllocationSection:
    strategy: str = ruled(one_of(lambda: ALLOCATIONS), "activation-density")
    """A strategy of ``prune.allocation.ALLOCATIONS``."""
    alpha: float = 2.0
    beta: float = ruled(within(0, 1), 1.0)
    gamma: float = ruled(above(0), 1.0)
    """Activation threshold: absolute A value, or a multiple of the mean A (``gamma_mode: relative``)."""
    gamma_mode: Literal["absolute", "relative"] = "relative"
    layer_range: list[int] | None = ruled(LAYER_SPAN, None)
    """[first, end]: only layers first .. end-1 are pruned, the others stay whole (null: every layer)."""
    search_generations: int = ruled(at_least(0), 40)
    """``searched``: generations of the (1 + offspring) evolution."""
    search_offspring: int = ruled(at_least(1), 8)
    """``searched``: mutations of the best candidate evaluated per generation."""
    search_samples: int = ruled(at_least(1), 4)
    """``searched``: the first calibration samples the fitness (KL divergence to the dense model) is measured on."""


@dataclass
class PruningSection:
    target: float = ruled(within(0, 1, high_open=True), 0.3)
    """Fraction of the dense model's parameters to remove: of all of them (embeddings counted once), or of its
    decoder blocks' (``target_of``)."""
    target_of: Literal["all", "decoder"] = "all"
    """What ``target`` is a share of: ``all`` parameters, or the ``decoder`` blocks' (embeddings, final norm and
    output head excluded), the share a model whose embeddings are most of its parameters is best described by."""
    max_decoder_sparsity: float = ruled(within(0, 1), 0.7)
    """Ceiling on the share of the decoder blocks' parameters a target removes; a recipe above it stops with one
    line naming both shares (1 allows any)."""
    attention_unit: Literal["kv_group", "query_head"] = "query_head"
    """``kv_group``: remove whole KV groups; ``query_head``: the same number of query heads from every group."""
    round_to: int | None = ruled(at_least(1), None)
    """Kept FFN channels per layer are a multiple of this; null: 128 when the model runs on CUDA (a tensor-core
    tile's width), 8 elsewhere (``prune.models.default_round_to``)."""
    min_ffn_channels: int = ruled(at_least(1), 64)
    """Every layer keeps at least this many FFN channels (and always >= 1 KV group and >= 1 head per group)."""
    reconstruct: str = ruled(one_of(lambda: RECONSTRUCTIONS), "lstsq")
    """A reconstruction of ``prune.reconstruct.RECONSTRUCTIONS``: none, FLAP's bias, or a least-squares refit."""
    damping: float = ruled(at_least(0), 0.0001)
    """lstsq: ridge term, relative to the mean diagonal of the kept inputs' second moment."""
    rounds: int = ruled(at_least(1), 1)
    """Prune in this many rounds: round r removes up to r / rounds of the target from the model the rounds
    before left, with statistics collected again on it (iterative pruning)."""


@dataclass
class RecoverySection:
    method: Literal["none", "distill", "lora"] = "none"
    """``distill``: train the pruned model's weights; ``lora``: train LoRA adapters (peft), merged before saving."""
    source: str = "c4"
    """Training text (same sources as calibration); must not be the perplexity text."""
    tokens: int = ruled(above(0), 2_000_000)
    """Token budget: steps = ceil(tokens / (batch_size x seqlen)); the source is cycled when smaller."""
    seqlen: int = ruled(above(1), 256)
    batch_size: int = ruled(above(0), 8)
    learning_rate: float = ruled(above(0), 0.0001)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = ruled(at_least(0), 10)
    max_grad_norm: float = ruled(above(0), 1.0)
    kl_weight: float = ruled(at_least(0), 1.0)
    """Weight of T^2 x KL(dense teacher || pruned student) on next-token distributions."""
    temperature: float = ruled(above(0), 1.0)
    nll_weight: float = ruled(at_least(0), 0.0)
    """Weight of the text's next-token NLL."""
    train: Literal["decoder_layers", "all"] = "decoder_layers"
    """``distill``: which weights train (``decoder_layers`` freezes embeddings, final norm and head)."""
    lora_rank: int = ruled(above(0), 16)
    lora_alpha: float = 32.0
    eval_every: int = ruled(above(0), 25)
    """Steps between held-out perplexity points of the recovery curve."""
    heldout_windows: int = ruled(above(0), 2)
    """Held-out slice: the last windows (perplexity seqlen) of the perplexity text, outside the evaluated ones."""
    save_every: int = ruled(above(0), 25)
    """Steps between resumable saves (in the cache; a rerun of the same command continues from the last)."""
    seed: int = 0


@dataclass
class ExportSection:
    formats: list[str] = ruled(EXPORT_FORMATS, default_factory=lambda: ["hf"])
    """Exporters of ``prune.export.EXPORTERS`` to write the pruned model with: ``hf``, ``gguf``."""
    gguf_type: str = ruled(one_of(lambda: TENSOR_TYPES), "f16")
    """Tensor type of the GGUF file's weight matrices (``prune.gguf_export.TENSOR_TYPES``)."""


@dataclass
class Recipe:
    output: str = ruled(NOT_EMPTY, "runs/default")
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
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings.defaults)
    """Settings of each evaluation stage (``eval.stages.EVALUATIONS``) by its name."""


def _one_of(names) -> str:
    return "must be one of " + ", ".join(names)


def _check_ranges(recipe: Recipe) -> None:
    """The fields' own rules (on the fields above), then the rules that read several fields."""
    raise_first_failure(recipe, field_checks(recipe) + _cross_field_checks(recipe))


def _cross_field_checks(recipe: Recipe) -> list[tuple[str, bool, str]]:
    scoring, allocation, pruning, recovery = recipe.scoring, recipe.allocation, recipe.pruning, recipe.recovery
    strategy, scorer, zeroshot = (
        ALLOCATIONS.get(allocation.strategy),
        SCORERS.get(scoring.method),
        recipe.evaluation.zeroshot,
    )
    return [
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
        (
            "allocation.search_samples",
            allocation.search_samples <= recipe.calibration.samples,
            f"must be in [1, calibration.samples = {recipe.calibration.samples}]",
        ),
        (
            "recovery.nll_weight",
            recovery.kl_weight + recovery.nll_weight > 0,
            "must be >= 0, and kl_weight + nll_weight > 0",
        ),
        (
            "evaluation.zeroshot.tasks",
            zeroshot.source == "harness" or all(t in LOCAL_TASKS for t in zeroshot.tasks),
            f"must be among the local tasks {list(LOCAL_TASKS)} (or set evaluation.zeroshot.source: harness)",
        ),
        *_placement_checks(recipe),
    ]


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
            "evaluation.zeroshot.dtype",
            not spread or recipe.evaluation.zeroshot.dtype == "auto",
            "must be auto with model.device_map (a spread model is scored as loaded)",
        ),
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


def recipe_schema() -> dict:
    """The JSON Schema of a recipe file (``python -m prune.run --schema``): keys, types, defaults, the fields' rules
    and their descriptions; the rules across fields are checked when the recipe is loaded."""
    return json_schema(Recipe)


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as a plain mapping (the form report.json records and ``--dry-run`` prints)."""
    return to_mapping(recipe)
