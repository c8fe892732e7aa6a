"""Recipes: YAML files turned into validated dataclasses.

Every problem with a recipe raises :class:`RecipeError` naming the key (``pruning.target``) or the
path at fault; nothing is written anywhere before the recipe has been validated completely.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


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
    method: Literal["activation", "activation-obs", "obs", "wanda-sp", "magnitude", "flap", "taylor", "shortgpt"] = (
        "activation-obs"
    )
    objective: Literal["max_logit", "nll"] = "max_logit"
    """D in A = |w * dD/dw|: largest next-token logit at the last position (the paper), or sequence NLL."""
    aggregate: Literal["sum", "mean", "max"] = "sum"
    """How a unit's per-weight scores combine into the unit's score."""


@dataclass
class AllocationSection:
    strategy: Literal["uniform", "activation-density", "global"] = "activation-density"
    alpha: float = 2.0
    beta: float = 1.0
    gamma: float = 1.0
    """Activation threshold: absolute A value, or a multiple of the mean A (``gamma_mode: relative``)."""
    gamma_mode: Literal["absolute", "relative"] = "relative"
    layer_range: list[int] | None = None
    """[first, end]: only layers first .. end-1 are pruned, the others stay whole (null: every layer)."""


@dataclass
class PruningSection:
    target: float = 0.3
    """Fraction of the dense model's total parameters to remove (embeddings counted once)."""
    attention_unit: Literal["kv_group", "query_head"] = "query_head"
    """``kv_group``: remove whole KV groups; ``query_head``: remove the same number of query heads from every group."""
    round_to: int = 8
    """Kept FFN channels per layer are a multiple of this."""
    min_ffn_channels: int = 64
    """Every layer keeps at least this many FFN channels (and always >= 1 KV group and >= 1 head per group)."""
    reconstruct: Literal["none", "bias", "lstsq"] = "lstsq"
    """Recover o_proj / down_proj outputs from calibration statistics: FLAP bias compensation, or a least-squares refit."""
    damping: float = 0.0001
    """lstsq: ridge term, relative to the mean diagonal of the kept inputs' second moment."""


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


ZEROSHOT_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "social_iqa"]
"""lm-eval task names with a shipped local definition (``eval/tasks``); the first seven feed the mean."""


@dataclass
class ZeroshotSection:
    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: list(ZEROSHOT_TASKS))
    """lm-eval task names."""
    source: Literal["auto", "local", "harness"] = "auto"
    """``local``: the shipped task files over $PRUNE_DATA_DIR/zeroshot; ``harness``: lm-eval's own (Hub data); ``auto``: local when present."""
    limit: int | None = 100
    """Items per task (the first ones); null = all."""
    batch_size: int = 16
    seed: int = 0


@dataclass
class EvaluationSection:
    perplexity: PerplexitySection = field(default_factory=PerplexitySection)
    zeroshot: ZeroshotSection = field(default_factory=ZeroshotSection)
    speed: SpeedSection = field(default_factory=SpeedSection)


@dataclass
class Recipe:
    output: str = "runs/default"
    """Output directory; an existing one is refused unless --overwrite is given."""
    cache_dir: str | None = None
    """Where activation statistics and converted GGUF models are cached; null = $PRUNE_CACHE_DIR or ~/.cache/prune."""
    model: ModelSection = field(default_factory=ModelSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    allocation: AllocationSection = field(default_factory=AllocationSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    recovery: RecoverySection = field(default_factory=RecoverySection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)


ANALYSIS_DOMAINS = ZEROSHOT_TASKS + ["c4", "wikitext2"]
"""Domains of the activation-pattern analysis: task prompts of the local zero-shot tasks, and text windows."""


@dataclass
class DomainsSection:
    """Findings 1 and 2: activation density per layer and cross-domain pattern similarity."""

    enabled: bool = False
    names: list[str] = field(
        default_factory=lambda: [
            "boolq",
            "arc_easy",
            "piqa",
            "hellaswag",
            "social_iqa",
            "winogrande",
            "c4",
            "wikitext2",
        ]
    )
    samples: int = 64
    """Inputs per domain; the same-domain pairs match the first half with the second half."""
    max_tokens: int = 128
    """Task prompts keep their last max_tokens tokens; c4 / wikitext2 give windows of this length."""
    seed: int = 0
    gamma: float = 2.0e-6
    """Absolute activation threshold (the paper's released code: 2e-6 for 32-layer models)."""
    gamma_relative: float = 1.0
    """Scale-free threshold: this multiple of the domain's mean A over all decoder linear weights."""
    sketch_size: int = 8192
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
    pairs: int = 256
    seed: int = 0


@dataclass
class AnalysisRecipe:
    output: str = "runs/analysis"
    cache_dir: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    objective: Literal["max_logit", "nll"] = "max_logit"
    deep_layers: list[int] | None = None
    """[first, end]: the deep-layer range (0-based, end excluded); null = the paper's layers 20-30 of 32 scaled to the model."""
    domains: DomainsSection = field(default_factory=DomainsSection)
    similarity: SimilaritySection = field(default_factory=SimilaritySection)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def _convert(value: Any, hint, key: str) -> Any:
    """Check ``value`` against the type hint ``hint``; return it (ints accepted as floats)."""
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, key)
    if isinstance(hint, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(value, option, key)
            except RecipeError:
                continue
    elif typing.get_origin(hint) is Literal:
        if value in typing.get_args(hint):
            return value
    elif typing.get_origin(hint) is list:
        if isinstance(value, list):
            return [_convert(item, typing.get_args(hint)[0], f"{key}[{i}]") for i, item in enumerate(value)]
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise RecipeError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _from_dict(cls, data: Any, prefix: str):
    where = prefix or "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
                if close
                else f"; known keys: {', '.join(names)}"
            )
            raise RecipeError(f"{prefix + '.' if prefix else ''}{key}: unknown key{hint}")
    values = {
        name: _convert(data[name], hints[name], f"{prefix + '.' if prefix else ''}{name}")
        for name in names
        if name in data
    }
    return cls(**values)


def _check_ranges(recipe: Recipe) -> None:
    checks = [
        ("pruning.target", 0 <= recipe.pruning.target < 1, "must be in [0, 1)"),
        ("pruning.round_to", recipe.pruning.round_to >= 1, "must be >= 1"),
        ("pruning.min_ffn_channels", recipe.pruning.min_ffn_channels >= 1, "must be >= 1"),
        ("pruning.damping", recipe.pruning.damping >= 0, "must be >= 0"),
        (
            "pruning.reconstruct",
            recipe.scoring.method != "shortgpt" or recipe.pruning.reconstruct == "none",
            "must be none with scoring.method shortgpt (whole layers are removed)",
        ),
        (
            "scoring.objective",
            recipe.scoring.method != "taylor" or recipe.scoring.objective == "nll",
            "must be nll with scoring.method taylor (LLM-Pruner's loss)",
        ),
        ("calibration.samples", recipe.calibration.samples > 0, "must be > 0"),
        ("calibration.seqlen", recipe.calibration.seqlen > 1, "must be > 1"),
        ("allocation.beta", 0 <= recipe.allocation.beta <= 1, "must be in [0, 1]"),
        ("allocation.gamma", recipe.allocation.gamma > 0, "must be > 0"),
        (
            "allocation.layer_range",
            recipe.allocation.layer_range is None
            or (
                len(recipe.allocation.layer_range) == 2
                and 0 <= recipe.allocation.layer_range[0] < recipe.allocation.layer_range[1]
            ),
            "must be null or [first, end] with 0 <= first < end",
        ),
        ("recovery.tokens", recipe.recovery.tokens > 0, "must be > 0"),
        ("recovery.seqlen", recipe.recovery.seqlen > 1, "must be > 1"),
        ("recovery.batch_size", recipe.recovery.batch_size > 0, "must be > 0"),
        ("recovery.learning_rate", recipe.recovery.learning_rate > 0, "must be > 0"),
        ("recovery.warmup_steps", recipe.recovery.warmup_steps >= 0, "must be >= 0"),
        ("recovery.max_grad_norm", recipe.recovery.max_grad_norm > 0, "must be > 0"),
        ("recovery.kl_weight", recipe.recovery.kl_weight >= 0, "must be >= 0"),
        (
            "recovery.nll_weight",
            recipe.recovery.nll_weight >= 0 and recipe.recovery.kl_weight + recipe.recovery.nll_weight > 0,
            "must be >= 0, and kl_weight + nll_weight > 0",
        ),
        ("recovery.temperature", recipe.recovery.temperature > 0, "must be > 0"),
        ("recovery.lora_rank", recipe.recovery.lora_rank > 0, "must be > 0"),
        ("recovery.eval_every", recipe.recovery.eval_every > 0, "must be > 0"),
        ("recovery.heldout_windows", recipe.recovery.heldout_windows > 0, "must be > 0"),
        ("recovery.save_every", recipe.recovery.save_every > 0, "must be > 0"),
        ("evaluation.perplexity.seqlen", recipe.evaluation.perplexity.seqlen > 1, "must be > 1"),
        (
            "evaluation.perplexity.windows",
            recipe.evaluation.perplexity.windows is None or recipe.evaluation.perplexity.windows > 0,
            "must be > 0 or null",
        ),
        (
            "evaluation.zeroshot.tasks",
            recipe.evaluation.zeroshot.source == "harness"
            or all(t in ZEROSHOT_TASKS for t in recipe.evaluation.zeroshot.tasks),
            f"must be among the local tasks {ZEROSHOT_TASKS} (or set evaluation.zeroshot.source: harness)",
        ),
        ("evaluation.zeroshot.tasks", len(recipe.evaluation.zeroshot.tasks) > 0, "must name at least one task"),
        (
            "evaluation.zeroshot.limit",
            recipe.evaluation.zeroshot.limit is None or recipe.evaluation.zeroshot.limit > 0,
            "must be > 0 or null",
        ),
        ("evaluation.zeroshot.batch_size", recipe.evaluation.zeroshot.batch_size > 0, "must be > 0"),
        ("evaluation.speed.prompt_tokens", recipe.evaluation.speed.prompt_tokens > 0, "must be > 0"),
        ("evaluation.speed.batch_size", recipe.evaluation.speed.batch_size > 0, "must be > 0"),
        ("evaluation.speed.new_tokens", recipe.evaluation.speed.new_tokens > 0, "must be > 0"),
        ("evaluation.speed.warmup", recipe.evaluation.speed.warmup >= 0, "must be >= 0"),
        ("evaluation.speed.repeats", recipe.evaluation.speed.repeats > 0, "must be > 0"),
        (
            "model.device",
            recipe.model.device in ("auto", "cpu", "cuda") or recipe.model.device.startswith("cuda:"),
            "must be auto, cpu, cuda or cuda:N",
        ),
        ("output", bool(recipe.output.strip()), "must not be empty"),
    ]
    _raise_first_failure(recipe, checks)


def _raise_first_failure(recipe, checks: list[tuple[str, bool, str]]) -> None:
    """Raise RecipeError for the first (key, ok, message) check that failed, quoting the key's value."""
    for key, ok, message in checks:
        if not ok:
            raise RecipeError(f"{key}: {message}, got {_lookup(recipe, key)!r}")


def _lookup(recipe, key: str) -> Any:
    value: Any = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` to the raw recipe mapping (value parsed as YAML)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, for example pruning.target=0.2")
    *parents, leaf = key.strip().split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = yaml.safe_load(raw)


def _read_mapping(path: str | Path | None, overrides: list[str]) -> dict:
    """The YAML mapping of a recipe file (empty without a file) with ``--set`` overrides applied."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise RecipeError(f"{path}: not valid YAML ({error})") from None
    for assignment in overrides:
        apply_override(data, assignment)
    return data


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError naming the key or file at fault."""
    recipe = _from_dict(Recipe, _read_mapping(path, overrides), "")
    _check_ranges(recipe)
    return recipe


def load_analysis_recipe(path: str | Path | None, overrides: list[str] = ()) -> AnalysisRecipe:
    """Read, override and validate an analysis recipe (``python -m prune.analyze``)."""
    recipe = _from_dict(AnalysisRecipe, _read_mapping(path, overrides), "")
    d = recipe.domains
    checks = [
        (
            "domains.names",
            all(n in ANALYSIS_DOMAINS for n in d.names) and len(set(d.names)) == len(d.names) and len(d.names) >= 2,
            f"must be two or more distinct names among {ANALYSIS_DOMAINS}",
        ),
        ("domains.samples", d.samples >= 2, "must be >= 2"),
        ("domains.max_tokens", d.max_tokens > 1, "must be > 1"),
        ("domains.gamma", d.gamma > 0, "must be > 0"),
        ("domains.gamma_relative", d.gamma_relative > 0, "must be > 0"),
        ("domains.sketch_size", d.sketch_size >= 16, "must be >= 16"),
        (
            "domains.boxplot_pairs",
            all(len(pair) == 2 and set(pair) <= set(d.names) for pair in d.boxplot_pairs),
            "must be pairs [a, b] of names listed in domains.names",
        ),
        ("similarity.pairs", recipe.similarity.pairs >= 3, "must be >= 3"),
        (
            "deep_layers",
            recipe.deep_layers is None
            or (len(recipe.deep_layers) == 2 and 0 <= recipe.deep_layers[0] < recipe.deep_layers[1]),
            "must be null or [first, end] with 0 <= first < end",
        ),
        ("domains.enabled", d.enabled or recipe.similarity.enabled, "nothing to do: enable domains and/or similarity"),
        ("output", bool(recipe.output.strip()), "must not be empty"),
    ]
    _raise_first_failure(recipe, checks)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
