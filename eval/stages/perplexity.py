"""The perplexity evaluation: the dense (cached) and the pruned model on the leading windows of the evaluation
text (``eval/perplexity.py`` measures)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eval.perplexity import perplexity
from eval.stages.base import DenseInputs, EvaluationInputs, EvaluationStage, ratio_text
from prune.schema import above, ruled

if TYPE_CHECKING:
    from eval.report import Report


@dataclass
class PerplexitySettings:
    dataset: str = "wikitext2"
    """``wikitext2``, ``c4``, or a ``.txt`` / ``.jsonl`` file."""
    seqlen: int = ruled(above(1), 2048)
    windows: int | None = ruled(above(0), 16)
    """Number of leading non-overlapping windows; null = all."""


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
    pruned_window_nll: list[float] = field(default_factory=list)
    """The saved model's summed NLL (nats) of each window, in order: what a check on fewer windows compares with
    (empty in a report.json written before they were kept)."""


def dense_perplexity(inputs: DenseInputs) -> tuple[dict, str | None]:
    """The dense model's perplexity (cached) and the cache file it was reused from (None when computed)."""
    context = inputs.context
    settings = context.recipe.evaluation.perplexity
    key = {"text": context.text_identity, "seqlen": settings.seqlen, "windows": settings.windows}
    return context.cached_dense(
        inputs.dense,
        "perplexity",
        key,
        lambda: perplexity(inputs.dense, context.text, settings.seqlen, settings.windows, "dense"),
    )


BROKEN_RATIO = 10.0
"""A pruned model whose perplexity is more than this multiple of the dense model's gets a warning in the report."""


def evaluate_perplexity(inputs: EvaluationInputs) -> PerplexityReport:
    """Perplexity of the dense (cached) and the pruned model on the recipe's windows of the evaluation text; a
    warning note when the pruned model's is more than :data:`BROKEN_RATIO` times the dense model's."""
    settings = inputs.settings.perplexity
    dense, reused = inputs.dense_part(STAGE)
    pruned = perplexity(inputs.pruned, inputs.context.text, settings.seqlen, settings.windows, "pruned")
    ratio = pruned["perplexity"] / dense["perplexity"]
    if ratio > BROKEN_RATIO:
        inputs.notes.append(
            f"Warning: the pruned model's perplexity is {ratio:.1f}x the dense model's (above {BROKEN_RATIO:g}x): it "
            "is likely broken. Compare with pruning.reconstruct: none, more calibration samples, or a lower "
            "pruning.target."
        )
    return PerplexityReport(
        dataset=settings.dataset,
        seqlen=settings.seqlen,
        windows=dense["windows"],
        predicted_tokens=dense["predicted_tokens"],
        dense=dense["perplexity"],
        pruned=pruned["perplexity"],
        before_recovery=inputs.before_recovery,
        dense_reused_from=reused,
        pruned_window_nll=pruned["window_nll"],
    )


def headline_rows(ppl: PerplexityReport, report: Report) -> list[str]:
    rows = [
        f"| {ppl.dataset} perplexity ({ppl.seqlen}-token windows x {ppl.windows}) | "
        f"{ppl.dense:.2f} | {ppl.pruned:.2f} | {ratio_text(ppl.pruned, ppl.dense)} |"
    ]
    if ppl.before_recovery is not None:
        rows.append(
            f"| {ppl.dataset} perplexity before recovery | {ppl.dense:.2f} | {ppl.before_recovery:.2f} | "
            f"{ratio_text(ppl.before_recovery, ppl.dense)} |"
        )
    return rows


STAGE = EvaluationStage(
    name="perplexity",
    label="perplexity",
    settings=PerplexitySettings,
    section=PerplexityReport,
    run=evaluate_perplexity,
    dense=dense_perplexity,
    headline=headline_rows,
)
