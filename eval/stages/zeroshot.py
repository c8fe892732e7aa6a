"""The zero-shot evaluation: lm-eval accuracy of the dense (cached) and the pruned model on the same items, and
the change paired item by item with its 95% interval (``eval/zeroshot.py`` measures)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

import prune.models
from eval.stages.base import DenseInputs, EvaluationInputs, EvaluationStage
from eval.zeroshot import (
    LOCAL_TASKS,
    accuracy_changes,
    local_data_file,
    percent,
    resolve_source,
    zeroshot_accuracy,
)
from prune.paths import data_dir, file_identity
from prune.placement import input_device
from prune.schema import Rule, above, from_mapping, ruled

if TYPE_CHECKING:
    from eval.report import Report

SOME_TASK = Rule(lambda v: len(v) > 0, lambda: "must name at least one task", lambda: {"minItems": 1})


@dataclass
class ZeroshotSettings:
    enabled: bool = True
    tasks: list[str] = ruled(SOME_TASK, default_factory=lambda: list(LOCAL_TASKS))
    """lm-eval task names."""
    source: Literal["auto", "local", "harness"] = "auto"
    """``local``: the shipped task files over $PRUNE_DATA_DIR/zeroshot; ``harness``: lm-eval's own;
    ``auto``: local when present."""
    limit: int | None = ruled(above(0), 100)
    """Items per task (the first ones); null = all."""
    batch_size: int = ruled(above(0), 16)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bfloat16-if-fast"] = "auto"
    """The models' dtype while lm-eval scores them (a copy cast to it); ``auto``: as loaded; ``bfloat16-if-fast``:
    bfloat16 on CUDA and on CPUs with bfloat16 instructions (AVX512-BF16 or AMX), where it scores about 2.5x as many
    items per second as float32, else float32 (other CPUs convert each bfloat16 product in software: 5x and 137x
    slower than float32 on the two AVX2 CPUs measured)."""


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
    dtype: str | None = None
    """The models' dtype while scored (``evaluation.zeroshot.dtype``)."""


def scoring_dtype(setting: str, model: Any) -> torch.dtype:
    """The dtype ``evaluation.zeroshot.dtype`` (``setting``) scores ``model`` in (see ``ZeroshotSettings.dtype``)."""
    if setting == "auto":
        return next(model.parameters()).dtype
    return prune.models.resolve_dtype(setting, input_device(model))


def _zeroshot(model: Any, tokenizer: Any, settings: ZeroshotSettings) -> dict:
    source = resolve_source(settings.tasks, settings.source)
    dtype = scoring_dtype(settings.dtype, model)
    scored = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    result = zeroshot_accuracy(
        scored, tokenizer, settings.tasks, source, settings.limit, settings.batch_size, settings.seed
    )
    return result | {"dtype": str(dtype).removeprefix("torch.")}


def dense_zeroshot(inputs: DenseInputs) -> tuple[dict, str | None]:
    """The dense model's zero-shot accuracy (cached) and the cache file it was reused from (None when computed)."""
    context = inputs.context
    settings = context.recipe.evaluation.zeroshot
    source = resolve_source(settings.tasks, settings.source)
    data = data_dir()
    files = [file_identity(local_data_file(t, data)) for t in settings.tasks] if source == "local" and data else []
    key = {
        "tasks": settings.tasks,
        "source": source,
        "files": files,
        "limit": settings.limit,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "dtype": str(scoring_dtype(settings.dtype, inputs.dense)).removeprefix("torch."),  # as it resolves here
        "standard_errors": True,
        "per_item": True,
    }
    return context.cached_dense(
        inputs.dense, "zeroshot", key, lambda: _zeroshot(inputs.dense, context.tokenizer, settings)
    )


def zeroshot_report(dense: dict, pruned: dict, dense_reused_from: str | None) -> ZeroshotReport:
    """The report section of two ``eval.zeroshot.zeroshot_accuracy`` results on the same items: both models'
    accuracies, their paired changes and the share of dense's margin above chance the pruned model keeps."""

    def scores(result: dict) -> ZeroshotScores:
        fields = {"tasks": result["tasks"], "mean": result["mean"], "mean_stderr": result["mean_stderr"]}
        return from_mapping(ZeroshotScores, fields, "zeroshot")

    changes, mean_change = accuracy_changes(dense, pruned)
    margin_kept = margin_kept_interval95 = None
    if mean_change is not None and dense["mean"] > mean_change["chance"]:  # a share of a margin that exists
        margin = dense["mean"] - mean_change["chance"]
        margin_kept = (pruned["mean"] - mean_change["chance"]) / margin
        if mean_change["interval95"] is not None:
            margin_kept_interval95 = mean_change["interval95"] / margin
    return ZeroshotReport(
        source=dense["source"],
        data_dir=dense["data_dir"],
        limit=dense["limit"],
        seed=dense["seed"],
        mean_metric=dense["mean_metric"],
        mean_tasks=dense["mean_tasks"],
        dense=scores(dense),
        pruned=scores(pruned),
        dense_reused_from=dense_reused_from,
        changes={task: from_mapping(AccuracyChange, change, "zeroshot") for task, change in changes.items()},
        mean_change=None if mean_change is None else from_mapping(AccuracyChange, mean_change, "zeroshot"),
        margin_kept=margin_kept,
        margin_kept_interval95=margin_kept_interval95,
        dtype=dense.get("dtype"),
    )


def evaluate_zeroshot(inputs: EvaluationInputs) -> ZeroshotReport:
    """Zero-shot accuracy of the dense (cached) and the pruned model through lm-eval, paired by item."""
    dense, reused = inputs.dense_part(STAGE)
    pruned = _zeroshot(inputs.pruned, inputs.context.tokenizer, inputs.settings.zeroshot)
    return zeroshot_report(dense, pruned, reused)


def items_text(zeroshot: ZeroshotReport) -> str:
    """``, first 100 items each`` for a limited run, else nothing."""
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


def headline_rows(zeroshot: ZeroshotReport, report: Report) -> list[str]:
    if zeroshot.dense.mean is None or zeroshot.pruned.mean is None:
        return []
    label = f"zero-shot mean {zeroshot.mean_metric} ({len(zeroshot.mean_tasks)} tasks{items_text(zeroshot)})"
    dense_mean = percent(zeroshot.dense.mean, zeroshot.dense.mean_stderr)
    pruned_mean = percent(zeroshot.pruned.mean, zeroshot.pruned.mean_stderr)
    change = "n/a" if zeroshot.mean_change is None else change_text(zeroshot.mean_change)
    rows = [f"| {label} | {dense_mean} | {pruned_mean} | {change} |"]
    margin = margin_text(zeroshot)
    if margin:
        rows.append(f"| zero-shot: margin above chance kept | | | {margin} |")
    return rows


def markdown_section(zeroshot: ZeroshotReport, report: Report) -> list[str]:
    source = (
        f"the toolkit's local task definitions over `{zeroshot.data_dir}/zeroshot`"
        if zeroshot.source == "local"
        else "lm-eval's registered tasks (Hugging Face Hub data)"
    )
    lines = [
        "## Zero-shot accuracy (%)",
        "",
        f"lm-eval-harness, {source}{items_text(zeroshot)}, {zeroshot.dtype or 'the models as loaded'}, seed "
        f"{zeroshot.seed}. The mean is over "
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


STAGE = EvaluationStage(
    name="zeroshot",
    label="zero-shot",
    settings=ZeroshotSettings,
    section=ZeroshotReport,
    run=evaluate_zeroshot,
    enabled=lambda recipe: recipe.evaluation.zeroshot.enabled,
    dense=dense_zeroshot,
    headline=headline_rows,
    markdown=markdown_section,
)
