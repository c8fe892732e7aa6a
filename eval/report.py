"""The run's report: a typed :class:`Report`, written as ``report.json`` (every measured number; keys in
docs/outputs.md) and ``report.md`` (the same, for people, with figures). Each evaluation stage
(``eval/stages/``) owns its section of both.

Every reader (``report.md``, the figures, the benchmark scripts) reads a :class:`Report`, built from
``report.json`` by :func:`read_report`, never the raw mapping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.figures import write_figures
from eval.stages import EVALUATIONS
from eval.stages.base import mib, ratio_text
from eval.stages.engine import EngineReport
from eval.stages.perplexity import PerplexityReport
from eval.stages.speed import SpeedReport
from eval.stages.zeroshot import ZeroshotReport
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
    """Fraction of the dense parameters the recipe asked to remove, of all of them or of the decoder blocks'
    (``target_of``)."""
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
    target_of: str = "all"
    """``all`` parameters or the ``decoder`` blocks' (``pruning.target_of``)."""


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
    evaluations: dict[str, Any]
    """Each evaluation stage's section (``eval.stages.EVALUATIONS``) by the stage's name, in the order they ran; a
    stage that did not run has none. In report.json each is a top-level key (null when it did not run)."""
    recovery: RecoveryReport | None
    exports: list[ExportReport]
    stage_seconds: dict[str, float]
    notes: list[str]
    version: int = REPORT_VERSION

    @property
    def perplexity(self) -> PerplexityReport | None:
        return self.evaluations.get("perplexity")

    @property
    def zeroshot(self) -> ZeroshotReport | None:
        return self.evaluations.get("zeroshot")

    @property
    def speed(self) -> SpeedReport | None:
        return self.evaluations.get("speed")

    @property
    def engine(self) -> EngineReport | None:
        return self.evaluations.get("engine")

    @property
    def warnings(self) -> list[str]:
        """The notes that warn (a pruned model that looks broken): shown first in report.md and by the command."""
        return [note for note in self.notes if note.startswith("Warning:")]

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
    sections = {name: data.pop(name, None) for name in EVALUATIONS}
    try:
        report = from_mapping(Report, {**data, "evaluations": {}}, "report")
        for name, section in sections.items():
            if section is not None:
                report.evaluations[name] = from_mapping(EVALUATIONS[name].section, section, f"report.{name}")
    except SchemaError as error:
        raise ValueError(f"{path}: {error}") from None
    return report


def report_mapping(report: Report) -> dict:
    """The report as report.json holds it: every evaluation stage's section at the top level under its name."""
    mapping = to_mapping(report)
    sections = mapping.pop("evaluations")
    if set(EVALUATIONS) & set(mapping):
        raise ValueError(f"evaluation stages named like report keys: {sorted(set(EVALUATIONS) & set(mapping))}")
    return mapping | {name: sections.get(name) for name in EVALUATIONS}


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
    method, counts = report.method, report.parameters
    removed_blocks = 1 - counts.pruned.decoder_blocks / counts.dense.decoder_blocks
    return (
        f"Target: remove {method.target:.1%} of {'total' if method.target_of == 'all' else 'decoder-block'} "
        f"parameters ({how}). Removed: **{report.parameters.removed_fraction:.2%}** of total parameters, "
        f"{removed_blocks:.2%} of the decoder blocks' parameters."
    )


def _headline_rows(report: Report, pruned_label: str) -> list[str]:
    params = report.parameters
    dense_total, pruned_total = params.dense.total, params.pruned.total
    dense_blocks, pruned_blocks = params.dense.decoder_blocks, params.pruned.decoder_blocks
    lines = [
        f"| metric | dense | {pruned_label} | {pruned_label} / dense |",
        "|---|---:|---:|---:|",
        f"| total parameters | {dense_total:,} | {pruned_total:,} | {ratio_text(pruned_total, dense_total)} |",
        f"| decoder-block parameters | {dense_blocks:,} | {pruned_blocks:,} | "
        f"{ratio_text(pruned_blocks, dense_blocks)} |",
    ]
    for name, section in report.evaluations.items():
        headline = EVALUATIONS[name].headline
        if headline is not None:
            lines += headline(section, report)
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
                f" Peak memory of the pass: weights + {mib(stats.pass_added_bytes)} = "
                f"{stats.peak_over_weights:.2f}x the weight bytes."
            )
        lines.append(line)
    for name, section in report.evaluations.items():
        if getattr(section, "dense_reused_from", None):
            lines.append(
                f"- Dense {name} reused from `{section.dense_reused_from}` "
                "(same model file, dtype, device and settings)."
            )
    lines += [f"- {note}" for note in report.notes]
    return lines + [_export_line(export) for export in report.exports]


def render_markdown(report: Report) -> str:
    """The human-readable report: headline dense vs pruned, each evaluation's section, recovery, per-layer widths,
    provenance, stage times."""
    pruned_label = "pruned + recovered" if report.recovery else "pruned"
    lines = [f"# Pruning report: {report.model.source}", "", _method_line(report), ""]
    lines += [f"**{note}**\n" for note in report.warnings]
    lines += _headline_rows(report, pruned_label)
    lines += ["", "![headline metrics, dense and pruned](headline.png)", ""]
    for name, section in report.evaluations.items():
        markdown = EVALUATIONS[name].markdown
        if markdown is not None:
            lines += markdown(section, report)
    if report.recovery:
        lines += _recovery_section(report.recovery, report.perplexity)
    lines += _layers_section(report)
    lines += ["", *_provenance_section(report)]
    lines += ["", "## Stage wall times", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report.stage_seconds.items()]
    return "\n".join(lines) + "\n"


def write_report(report: Report, directory: Path) -> None:
    """``report.json``, the figures (PNG) and ``report.md``, which embeds them, into ``directory``."""
    atomic_write_text(directory / "report.json", json.dumps(report_mapping(report), indent=2) + "\n")
    write_figures(report, directory)
    atomic_write_text(directory / "report.md", render_markdown(report))
