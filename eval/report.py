"""The run's report: a typed :class:`Report`, written as ``report.json`` (every measured number; keys in
README, 'report.json') and ``report.md`` (the same, for people, with figures).

Every reader (``report.md``, the figures, the benchmark scripts) reads a :class:`Report`, built from
``report.json`` by :func:`read_report`, never the raw mapping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.figures import write_figures
from eval.zeroshot import percent
from prune.paths import atomic_write_text
from prune.schema import SchemaError, from_mapping, to_mapping

REPORT_VERSION = 2
"""Bumped when a key of report.json changes meaning or moves."""


@dataclass
class ModelReport:
    source: str
    """The recipe's ``model.source``."""
    kind: str
    """``gguf``, ``directory`` or ``hub``."""
    location: str
    model_type: str
    base_model: str
    """Hub id of the dense model when known, else its file or directory name (the model card's ``base_model``)."""
    license: str | None
    """The dense model's license, when its source states one."""
    author: str | None


@dataclass
class MethodReport:
    """What was done, by the names of the registries."""

    target: float
    """Fraction of the dense total parameters the recipe asked to remove."""
    scoring: str | None
    """Scorer of the units; None when the allocation scores no units (whole-layer removal)."""
    objective: str | None
    """D of the gradient statistics, when the method used them."""
    aggregate: str | None
    allocation: str
    attention_unit: str
    round_to: int
    """Kept FFN channels per layer are a multiple of this."""
    reconstruction: str


@dataclass
class ParameterCounts:
    total: int
    """Every parameter, tied weights once."""
    decoder_blocks: int


@dataclass
class ParametersReport:
    dense: ParameterCounts
    pruned: ParameterCounts
    target_removed: int
    """Parameters the target asked to remove (target x dense total, rounded)."""
    removed: int
    removed_fraction: float


@dataclass
class WidthsReport:
    query_heads: int
    kv_groups: int
    ffn_channels: int
    """Of one expert in a mixture-of-experts layer."""
    experts: int = 0
    """Experts of a mixture-of-experts layer (0: a dense MLP)."""


@dataclass
class LayerReport:
    index: int
    dense: WidthsReport
    pruned: WidthsReport | None
    """None: the layer was removed whole."""
    requested_sparsity: float
    """S_i, the fraction of the layer's linear weights the allocation asked to remove."""
    activated_weights: float | None = None
    """N_i (activation-density only)."""
    block_influence: float | None = None
    """1 - mean cos(h_in, h_out) (layer removal only)."""


@dataclass
class SearchReport:
    """What the ``searched`` allocation's search did (KL: mean per token, nats, on the search samples)."""

    generations: int
    offspring: int
    samples: int
    evaluations: int
    seconds: float
    start_kl: float
    """KL divergence to the dense model of the activation-density allocation it started from."""
    best_kl: float


@dataclass
class AllocationReport:
    strategy: str
    activation_threshold: float | None
    """The absolute gamma the activated weights were counted above (activation-density only)."""
    search: SearchReport | None = None
    rounds: int = 1
    """Rounds of pruning (``pruning.rounds``); with more than one the per-layer sparsity is what each layer lost
    over all of them."""


@dataclass
class StatisticsReport:
    source: str
    samples: int
    seqlen: int
    seed: int
    objective: str
    collected: list[str]
    """What the statistics provide (``prune.statistics.Statistic`` values)."""
    cache_path: str
    reused: bool
    """True when everything needed came from the cache."""
    peak_memory_bytes: int | None = None
    """Of the pass computed in this run: CUDA allocator peak, or process RSS high-water mark on CPU."""
    pass_added_bytes: int | None = None
    model_weight_bytes: int | None = None
    peak_over_weights: float | None = None


@dataclass
class PerplexityReport:
    dataset: str
    seqlen: int
    windows: int
    predicted_tokens: int
    dense: float
    pruned: float
    """The saved model: after recovery when there is one."""
    before_recovery: float | None
    dense_reused_from: str | None
    """Cache file of the dense result, or None when computed in this run."""


@dataclass
class TaskAccuracy:
    acc: float
    items: int
    acc_norm: float | None = None
    """Length-normalised accuracy, where the task defines it."""
    acc_stderr: float | None = None
    """Standard error of ``acc`` over the items (lm-eval's)."""
    acc_norm_stderr: float | None = None


@dataclass
class ZeroshotScores:
    tasks: dict[str, TaskAccuracy]
    mean: float | None
    """Mean ``acc`` over the evaluated tasks of the seven-task set; None if none of them was evaluated."""
    mean_stderr: float | None = None
    """Its standard error: sqrt(sum of the tasks' squared standard errors) / tasks."""


@dataclass
class AccuracyChange:
    """Pruned minus dense ``acc`` over the same items, fractions of 1 (``eval.zeroshot.paired_change``)."""

    difference: float
    stderr: float | None
    """Of the paired difference: sd(pruned_i - dense_i) / sqrt(items); for the mean over tasks, sqrt(sum of
    the tasks' squared standard errors) / tasks. None with a single item."""
    interval95: float | None
    """Half-width of the 95% interval, 1.96 standard errors: a difference within it is no measurable change."""
    chance: float
    """Expected ``acc`` of a uniform guess among each item's choices."""

    @property
    def measurable(self) -> bool:
        """True when the 95% interval excludes no change."""
        return self.interval95 is not None and abs(self.difference) > self.interval95


@dataclass
class ZeroshotReport:
    source: str
    """``local`` or ``harness``."""
    data_dir: str | None
    limit: int | None
    seed: int
    mean_metric: str
    mean_tasks: list[str]
    dense: ZeroshotScores
    pruned: ZeroshotScores
    dense_reused_from: str | None
    changes: dict[str, AccuracyChange] = field(default_factory=dict)
    """By task, paired over the items both models scored."""
    mean_change: AccuracyChange | None = None
    """Of the mean over ``mean_tasks``."""
    margin_kept: float | None = None
    """(pruned mean - chance) / (dense mean - chance): the share of the dense model's margin above a uniform
    guess that the pruned model keeps."""
    margin_kept_interval95: float | None = None
    """Half-width of its 95% interval: the mean change's, over the dense margin (the dense mean taken as exact)."""


@dataclass
class SpeedResult:
    """Timings of one model, from ``eval.speed.measure_speed``."""

    prefill_ms_median: float
    prefill_ms_min: float
    prefill_ms_max: float
    decode_tokens_per_s_median: float
    """New tokens per second summed over the batch, decode steps only (prefill excluded)."""
    decode_tokens_per_s_min: float
    decode_tokens_per_s_max: float
    weight_bytes: int
    linear_macs_per_token: int
    """Multiply-adds of every linear layer (decoder linears and lm_head) for one token: its weight count."""
    peak_memory_bytes: int
    """Weight bytes plus the largest working memory (activations, KV cache) of one prefill + decode run."""
    compile_seconds: float | None = None
    """Seconds of the first generation with a compiled decode step (compiling it, capturing its CUDA graphs),
    before and apart from the warm-up and the timed repeats; None when the step runs eagerly."""


@dataclass
class SpeedReport:
    device: str
    dtype: str
    prompt_tokens: int
    batch_size: int
    new_tokens: int
    warmup: int
    repeats: int
    decode_loop: str
    """``dynamic`` or ``static`` (``eval.speed.DECODE_LOOPS``)."""
    dense: SpeedResult
    pruned: SpeedResult


@dataclass
class EngineSpeed:
    """Tokens per second of one GGUF file in llama.cpp (median, min, max of the timed repeats), from
    ``eval.engine.engine_speed``."""

    prompt_tokens_per_s_median: float
    prompt_tokens_per_s_min: float
    prompt_tokens_per_s_max: float
    """Prompt processing: prompt tokens / seconds of one batched evaluation of the prompt."""
    decode_tokens_per_s_median: float
    decode_tokens_per_s_min: float
    decode_tokens_per_s_max: float
    """Generation: new tokens / seconds of the greedy decode steps after the prompt."""
    file_bytes: int


@dataclass
class EngineReport:
    """The pruned model's GGUF file in llama.cpp, beside the dense model's file of the same tensor type."""

    engine: str
    """``llama.cpp (llama-cpp-python X)``."""
    tensor_type: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    warmup: int
    repeats: int
    dense: EngineSpeed
    pruned: EngineSpeed
    dense_file: str
    """The dense model's GGUF file (exported once into the cache)."""
    linear_macs_ratio: float
    """Dense / pruned linear multiply-adds per token: the speedup the removed units allow."""
    perplexity: float | None
    """The pruned file's perplexity in the engine on the run's perplexity windows (None when not measured)."""


@dataclass
class CurvePoint:
    step: int
    tokens: int
    perplexity: float


@dataclass
class RecoveryReport:
    method: str
    source: str
    trained: str
    """What trained: ``decoder layers``, ``all weights`` or ``LoRA adapters (merged into the weights)``."""
    loss: str
    optimizer: str
    heldout: str
    steps: int
    batch_size: int
    seqlen: int
    tokens_seen: int
    training_windows: int
    epochs: float
    seconds: float
    tokens_per_second: float
    resumed_from_step: int
    curve: list[CurvePoint]
    device: str
    log: str
    """File name of the per-step log."""
    state_dir: str
    """Where the resumable state lived (removed when the run succeeds)."""


@dataclass
class ExportReport:
    format: str
    path: str
    bytes: int
    remote_code: bool | None = None
    """hf: loading needs ``trust_remote_code=True`` (per-layer widths)."""
    tensor_type: str | None = None
    """gguf: the tensor type of the weight matrices."""
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    recipe: dict[str, Any]
    """The resolved recipe (defaults and --set overrides applied)."""
    model: ModelReport
    method: MethodReport
    parameters: ParametersReport
    layers: list[LayerReport]
    allocation: AllocationReport
    statistics: StatisticsReport | None
    perplexity: PerplexityReport | None
    zeroshot: ZeroshotReport | None
    speed: SpeedReport | None
    engine: EngineReport | None
    recovery: RecoveryReport | None
    exports: list[ExportReport]
    stage_seconds: dict[str, float]
    notes: list[str]
    version: int = REPORT_VERSION

    def export(self, format: str) -> ExportReport | None:
        """The export of ``format``, or None when the run did not write it."""
        return next((e for e in self.exports if e.format == format), None)


def read_report(path: Path) -> Report:
    """The :class:`Report` of a run directory or a report.json file; ValueError naming the file when it is not one."""
    path = path / "report.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable report.json ({error.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("version") != REPORT_VERSION:
        raise ValueError(f"{path}: not a report.json of this version of the toolkit (version {REPORT_VERSION})")
    try:
        return from_mapping(Report, data, "report")
    except SchemaError as error:
        raise ValueError(f"{path}: {error}") from None


def _ratio(pruned: float | None, dense: float | None) -> str:
    return f"{pruned / dense:.3f}x" if pruned is not None and dense else "n/a"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _limit(zeroshot: ZeroshotReport) -> str:
    return f", first {zeroshot.limit} items each" if zeroshot.limit else ""


def change_text(change: AccuracyChange) -> str:
    """A paired change in words, in accuracy points: "-4.90 points (95% interval ± 1.38)", or "no measurable
    change (-0.43 ± 1.62 points, 95%)" when the interval holds no change."""
    points = f"{100 * change.difference:+.2f}"
    if change.interval95 is None:
        return f"{points} points (one item: no interval)"
    if not change.measurable:
        return f"no measurable change ({points} ± {100 * change.interval95:.2f} points, 95%)"
    return f"{points} points (95% interval ± {100 * change.interval95:.2f})"


def margin_text(zeroshot: ZeroshotReport) -> str | None:
    """The share of dense's margin above chance the pruned model keeps: "28.0% ± 19.1% (95%) of dense's
    margin above chance (35.71)"; None when the report has no such share."""
    if zeroshot.margin_kept is None or zeroshot.mean_change is None:
        return None
    spread = "" if zeroshot.margin_kept_interval95 is None else f" ± {zeroshot.margin_kept_interval95:.1%} (95%)"
    return (
        f"{zeroshot.margin_kept:.1%}{spread} of dense's margin above chance ({100 * zeroshot.mean_change.chance:.2f})"
    )


def _zeroshot_section(zeroshot: ZeroshotReport) -> list[str]:
    source = (
        f"the toolkit's local task definitions over `{zeroshot.data_dir}/zeroshot`"
        if zeroshot.source == "local"
        else "lm-eval's registered tasks (Hugging Face Hub data)"
    )
    lines = [
        "## Zero-shot accuracy (%)",
        "",
        f"lm-eval-harness, {source}{_limit(zeroshot)}, seed {zeroshot.seed}. The mean is over "
        f"{', '.join(zeroshot.mean_tasks)} and uses `{zeroshot.mean_metric}`.",
        "",
        "| task | items | chance | dense acc | pruned acc | pruned - dense acc | dense acc_norm | pruned acc_norm |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]

    def change_cells(change: AccuracyChange | None) -> list[str]:
        return ["-", "-"] if change is None else [percent(change.chance, None, 1), change_text(change)]

    for task, dense in zeroshot.dense.tasks.items():
        pruned = zeroshot.pruned.tasks[task]
        chance, change = change_cells(zeroshot.changes.get(task))
        cells = [chance, percent(dense.acc, dense.acc_stderr, 1), percent(pruned.acc, pruned.acc_stderr, 1), change]
        if dense.acc_norm is not None and pruned.acc_norm is not None:
            cells += [
                percent(dense.acc_norm, dense.acc_norm_stderr, 1),
                percent(pruned.acc_norm, pruned.acc_norm_stderr, 1),
            ]
        else:
            cells += ["-", "-"]
        lines.append(f"| {task} | {dense.items} | {' | '.join(cells)} |")
    if zeroshot.dense.mean is not None and zeroshot.pruned.mean is not None:
        dense_mean = percent(zeroshot.dense.mean, zeroshot.dense.mean_stderr, 1)
        pruned_mean = percent(zeroshot.pruned.mean, zeroshot.pruned.mean_stderr, 1)
        chance, change = change_cells(zeroshot.mean_change)
        lines.append(f"| mean {zeroshot.mean_metric} | | {chance} | {dense_mean} | {pruned_mean} | {change} | | |")
    lines += [
        "",
        "± one standard error over the items; the mean's is sqrt(Σ se²) / tasks. `pruned - dense` pairs the two "
        "models item by item (lm-eval's per-item results): its 95% interval is 1.96 standard errors of the mean "
        "per-item difference, and a change within it is no measurable change. `chance` is the accuracy of a "
        "uniform guess among each item's choices.",
    ]
    margin = margin_text(zeroshot)
    if margin:
        lines += ["", f"The pruned model keeps {margin}."]
    return [*lines, ""]


def _recovery_section(recovery: RecoveryReport, ppl: PerplexityReport | None) -> list[str]:
    resumed = f" (resumed at step {recovery.resumed_from_step})" if recovery.resumed_from_step else ""
    lines = [
        "## Recovery",
        "",
        f"`{recovery.method}` on {recovery.tokens_seen:,} tokens of {recovery.source} "
        f"({recovery.steps} steps of {recovery.batch_size} x {recovery.seqlen} tokens, "
        f"{recovery.epochs:.2f} passes over its {recovery.training_windows:,} windows); trained {recovery.trained}; "
        f"loss {recovery.loss}; {recovery.optimizer}. {recovery.tokens_per_second:,.0f} training tokens/s on "
        f"{recovery.device}{resumed}. Per-step log: `{recovery.log}`.",
        "",
    ]
    if ppl and ppl.before_recovery is not None:
        lines += [
            f"| {ppl.dataset} perplexity ({ppl.seqlen} x {ppl.windows}) | dense | pruned | recovered |",
            "|---|---:|---:|---:|",
            f"| | {ppl.dense:.2f} | {ppl.before_recovery:.2f} | {ppl.pruned:.2f} |",
            "",
        ]
    return [*lines, f"![held-out perplexity during recovery](recovery.png) (held-out: {recovery.heldout})", ""]


def _engine_section(engine: EngineReport, ppl: PerplexityReport | None) -> list[str]:
    d, p = engine.dense, engine.pruned
    limit = f"(limit {engine.linear_macs_ratio:.2f}x)"
    lines = [
        "## In llama.cpp",
        "",
        f"{engine.engine}, {engine.tensor_type} files, {engine.threads} threads; dense and pruned interleaved, "
        f"{engine.warmup} warm-up and {engine.repeats} timed repeats (median; min-max in brackets). Prompt "
        f"processing: {engine.prompt_tokens} tokens in one batch; generation: {engine.new_tokens} greedy tokens "
        "after it.",
        "",
        "| | dense | pruned | pruned / dense |",
        "|---|---:|---:|---:|",
        f"| file size | {_mib(d.file_bytes)} | {_mib(p.file_bytes)} | {_ratio(p.file_bytes, d.file_bytes)} |",
        f"| prompt processing, tokens/s | {d.prompt_tokens_per_s_median:,.1f} "
        f"({d.prompt_tokens_per_s_min:,.1f}-{d.prompt_tokens_per_s_max:,.1f}) | {p.prompt_tokens_per_s_median:,.1f} "
        f"({p.prompt_tokens_per_s_min:,.1f}-{p.prompt_tokens_per_s_max:,.1f}) | "
        f"{_ratio(p.prompt_tokens_per_s_median, d.prompt_tokens_per_s_median)} {limit} |",
        f"| generation, tokens/s | {d.decode_tokens_per_s_median:,.1f} "
        f"({d.decode_tokens_per_s_min:,.1f}-{d.decode_tokens_per_s_max:,.1f}) | {p.decode_tokens_per_s_median:,.1f} "
        f"({p.decode_tokens_per_s_min:,.1f}-{p.decode_tokens_per_s_max:,.1f}) | "
        f"{_ratio(p.decode_tokens_per_s_median, d.decode_tokens_per_s_median)} {limit} |",
    ]
    if engine.perplexity is not None and ppl:
        lines.append(
            f"| {ppl.dataset} perplexity of the pruned file ({ppl.seqlen} x {ppl.windows}) | | "
            f"{engine.perplexity:.2f} | {_ratio(engine.perplexity, ppl.pruned)} of PyTorch's {ppl.pruned:.2f} |"
        )
    return [*lines, ""]


def method_description(method: MethodReport) -> str:
    """What was done, in words: ``activation-obs scores, activation-density allocation, ...``."""
    if method.scoring is None:
        return f"{method.allocation}: whole layers removed"
    return (
        f"{method.scoring} scores, {method.allocation} allocation, {method.attention_unit} attention units, "
        f"{method.reconstruction} reconstruction"
    )


def _method_line(report: Report) -> str:
    how = method_description(report.method)
    method = report.method
    return (
        f"Target: remove {method.target:.1%} of total parameters ({how}). "
        f"Removed: **{report.parameters.removed_fraction:.2%}** of total parameters."
    )


def _headline_rows(report: Report, pruned_label: str) -> list[str]:
    params, ppl, speed, zeroshot = report.parameters, report.perplexity, report.speed, report.zeroshot
    dense_total, pruned_total = params.dense.total, params.pruned.total
    dense_blocks, pruned_blocks = params.dense.decoder_blocks, params.pruned.decoder_blocks
    lines = [
        f"| metric | dense | {pruned_label} | {pruned_label} / dense |",
        "|---|---:|---:|---:|",
        f"| total parameters | {dense_total:,} | {pruned_total:,} | {_ratio(pruned_total, dense_total)} |",
        f"| decoder-block parameters | {dense_blocks:,} | {pruned_blocks:,} | {_ratio(pruned_blocks, dense_blocks)} |",
    ]
    if ppl:
        lines.append(
            f"| {ppl.dataset} perplexity ({ppl.seqlen}-token windows x {ppl.windows}) | "
            f"{ppl.dense:.2f} | {ppl.pruned:.2f} | {_ratio(ppl.pruned, ppl.dense)} |"
        )
        if ppl.before_recovery is not None:
            lines.append(
                f"| {ppl.dataset} perplexity before recovery | {ppl.dense:.2f} | {ppl.before_recovery:.2f} | "
                f"{_ratio(ppl.before_recovery, ppl.dense)} |"
            )
    if zeroshot and zeroshot.dense.mean is not None and zeroshot.pruned.mean is not None:
        label = f"zero-shot mean {zeroshot.mean_metric} ({len(zeroshot.mean_tasks)} tasks{_limit(zeroshot)})"
        dense_mean = percent(zeroshot.dense.mean, zeroshot.dense.mean_stderr)
        pruned_mean = percent(zeroshot.pruned.mean, zeroshot.pruned.mean_stderr)
        change = "n/a" if zeroshot.mean_change is None else change_text(zeroshot.mean_change)
        lines.append(f"| {label} | {dense_mean} | {pruned_mean} | {change} |")
        margin = margin_text(zeroshot)
        if margin:
            lines.append(f"| zero-shot: margin above chance kept | | | {margin} |")
    if speed:
        d, p = speed.dense, speed.pruned
        limit = d.linear_macs_per_token / p.linear_macs_per_token
        lines += [
            f"| prefill latency, median ms ({speed.batch_size} x {speed.prompt_tokens} tokens) | "
            f"{d.prefill_ms_median:.1f} | {p.prefill_ms_median:.1f} | "
            f"{_ratio(p.prefill_ms_median, d.prefill_ms_median)} |",
            f"| decode tokens/s, median ({speed.new_tokens} new tokens) | {d.decode_tokens_per_s_median:.1f} | "
            f"{p.decode_tokens_per_s_median:.1f} | "
            f"{_ratio(p.decode_tokens_per_s_median, d.decode_tokens_per_s_median)} |",
            f"| linear multiply-adds per token (lm_head included) | {d.linear_macs_per_token:,} | "
            f"{p.linear_macs_per_token:,} | {_ratio(p.linear_macs_per_token, d.linear_macs_per_token)} "
            f"(speedup limit {limit:.2f}x) |",
            f"| peak memory (weights + working) | {_mib(d.peak_memory_bytes)} | {_mib(p.peak_memory_bytes)} | "
            f"{_ratio(p.peak_memory_bytes, d.peak_memory_bytes)} |",
        ]
    return lines


def widths_columns(report: Report) -> list[str]:
    """The width columns of a per-layer table: an ``experts`` column for a mixture-of-experts model."""
    experts = ["experts", "FFN channels per expert"] if any(layer.dense.experts for layer in report.layers) else []
    return ["query heads", "KV groups", *(experts or ["FFN channels"])]


def widths_cells(layer: LayerReport, columns: list[str]) -> list[str]:
    """One layer's cells for :func:`widths_columns`: "dense → pruned", or "removed"."""
    d, p = layer.dense, layer.pruned
    values = [(d.query_heads, p and p.query_heads), (d.kv_groups, p and p.kv_groups)]
    if "experts" in columns:
        values.append((d.experts, p and p.experts))
    values.append((d.ffn_channels, p and p.ffn_channels))
    return ["removed" if p is None else f"{dense} → {pruned}" for dense, pruned in values]


def _layers_section(report: Report) -> list[str]:
    columns = widths_columns(report)
    lines = [
        "## Per-layer widths",
        "",
        "![kept width per layer](widths.png)",
        "",
        "![allocation per layer](allocation.png)",
        "",
        f"| layer | {' | '.join(columns)} | requested sparsity | activated weights |",
        "|---:|" + "---:|" * (len(columns) + 2),
    ]
    search = report.allocation.search
    if search is not None:
        lines[2:2] = [
            f"The widths were searched: {search.evaluations} candidates ({search.generations} generations of "
            f"{search.offspring} mutations) in {search.seconds:.0f} s; KL divergence to the dense model on "
            f"{search.samples} calibration samples {search.start_kl:.4f} (activation-density start) → "
            f"{search.best_kl:.4f} nats per token.",
            "",
        ]
    rounds = report.allocation.rounds
    if rounds > 1:
        lines[2:2] = [
            f"Pruned in {rounds} rounds (round r removed up to r/{rounds} of the target, scored by statistics of the "
            "model the rounds before left); the sparsity column is what each layer lost over all rounds, the "
            "activated weights those of the dense model.",
            "",
        ]
    for layer in report.layers:
        activated = f"{layer.activated_weights:,.0f}" if layer.activated_weights is not None else "-"
        sparsity = "1.000" if layer.pruned is None else f"{layer.requested_sparsity:.3f}"
        cells = [str(layer.index), *widths_cells(layer, columns), sparsity, activated]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def _export_line(export: ExportReport) -> str:
    if export.format == "hf":
        how = (
            "per-layer widths: loads with `trust_remote_code=True`"
            if export.remote_code
            else "stock configuration, no remote code"
        )
    else:
        how = f"{export.tensor_type}, {export.bytes / 2**20:,.1f} MiB"
    return f"- Export `{export.format}`: `{export.path}` ({how})." + "".join(f" {note}" for note in export.notes)


def _provenance_section(report: Report) -> list[str]:
    lines = ["## Provenance", ""]
    stats = report.statistics
    if stats:
        line = (
            f"- Activation statistics ({', '.join(stats.collected)}): {stats.samples} samples x {stats.seqlen} "
            f"tokens of {stats.source} (seed {stats.seed}, D = {stats.objective}), "
            + ("**reused** from " if stats.reused else "computed and cached at ")
            + f"`{stats.cache_path}`."
        )
        if stats.pass_added_bytes is not None and stats.peak_over_weights is not None:
            line += (
                f" Peak memory of the pass: weights + {_mib(stats.pass_added_bytes)} = "
                f"{stats.peak_over_weights:.2f}x the weight bytes."
            )
        lines.append(line)
    for name, section in (("perplexity", report.perplexity), ("zeroshot", report.zeroshot)):
        if section and section.dense_reused_from:
            lines.append(
                f"- Dense {name} reused from `{section.dense_reused_from}` "
                "(same model file, dtype, device and settings)."
            )
    lines += [f"- {note}" for note in report.notes]
    return lines + [_export_line(export) for export in report.exports]


def render_markdown(report: Report) -> str:
    """The human-readable report: headline dense vs pruned, per-layer widths, stage times, provenance."""
    pruned_label = "pruned + recovered" if report.recovery else "pruned"
    lines = [f"# Pruning report: {report.model.source}", "", _method_line(report), ""]
    lines += _headline_rows(report, pruned_label)
    lines += [""]
    if report.speed:
        speed = report.speed
        lines += [
            f"Speed: {speed.device}, {speed.dtype}, {speed.decode_loop} decode loop, dense and pruned interleaved, "
            f"{speed.warmup} warm-up and {speed.repeats} timed repeats (median; spread in report.json).",
            "",
        ]
    lines += ["![headline metrics, dense and pruned](headline.png)", ""]
    if report.engine:
        lines += _engine_section(report.engine, report.perplexity)
    if report.recovery:
        lines += _recovery_section(report.recovery, report.perplexity)
    if report.zeroshot:
        lines += _zeroshot_section(report.zeroshot)
    lines += _layers_section(report)
    lines += ["", *_provenance_section(report)]
    lines += ["", "## Stage wall times", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report.stage_seconds.items()]
    return "\n".join(lines) + "\n"


def write_report(report: Report, directory: Path) -> None:
    """``report.json``, the figures (PNG) and ``report.md``, which embeds them, into ``directory``."""
    atomic_write_text(directory / "report.json", json.dumps(to_mapping(report), indent=2) + "\n")
    write_figures(report, directory)
    atomic_write_text(directory / "report.md", render_markdown(report))
