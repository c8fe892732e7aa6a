"""What every evaluation stage shares: the stage's description (:class:`EvaluationStage`) and what it reads.

An evaluation stage is one module of ``eval/stages/`` that owns its recipe settings (a dataclass whose rules sit on
its fields), its report section (a dataclass), how it measures the dense and the pruned model, and its part of
``report.md``; one entry in :data:`eval.stages.EVALUATIONS` makes it part of every run: its settings under
``evaluation.<name>`` in recipes, its section under ``<name>`` in report.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RunContext:
    """What the run lends every evaluation: its recipe, the perplexity text and the caches of the dense model."""

    recipe: Any
    """The run's recipe (``prune.recipe.Recipe``); a stage's settings are ``recipe.evaluation.<name>``."""
    tokenizer: Any
    text: torch.Tensor
    """The perplexity text, tokenized once: LongTensor [n_tokens]."""
    text_identity: str
    """What identifies the perplexity text (its file's identity), for cache keys."""
    cached_dense: Callable[[nn.Module, str, dict, Callable[[], dict]], tuple[dict, str | None]]
    """``cached_dense(model, name, settings, compute)``: the dense model's result of evaluation ``name`` with
    ``settings``, from the cache when that model file, dtype and device were evaluated so before, else ``compute()``
    (then cached); with the cache file it was reused from (None when computed)."""
    dense_gguf: Callable[[nn.Module, str], Path]
    """``dense_gguf(model, tensor_type)``: the dense model as a GGUF file of that type, exported once into the cache."""


@dataclass(frozen=True)
class DenseInputs:
    """What the dense part of an evaluation stage reads."""

    context: RunContext
    dense: nn.Module


@dataclass(frozen=True)
class EvaluationInputs:
    """What an evaluation stage reads."""

    context: RunContext
    dense: nn.Module | None
    """The dense model; None when the run pruned it in place (its parts of the evaluation are in ``dense_parts``)."""
    pruned: nn.Module
    """The model the run saves (after recovery when there is one)."""
    before_recovery: float | None
    """Perplexity of the pruned model before recovery (None without recovery)."""
    directory: Path
    """The run directory being written (exports are in it)."""
    exports: list[Any]
    """The run's exports (``eval.report.ExportReport``)."""
    notes: list[str]
    """The report's notes; a stage may add one."""
    dense_parts: dict[str, Any]
    """Dense parts already computed (``eval.stages.dense_first``), by stage name; the others are computed here."""

    @property
    def settings(self) -> Any:
        """The recipe's settings of every evaluation, by stage name (``inputs.settings.perplexity.seqlen``)."""
        return self.context.recipe.evaluation

    def dense_part(self, stage: EvaluationStage) -> Any:
        """The stage's dense part: computed before pruning in place, else now (from the cache when it holds it)."""
        if stage.name in self.dense_parts:
            return self.dense_parts[stage.name]
        assert stage.dense is not None and self.dense is not None
        return stage.dense(DenseInputs(self.context, self.dense))


@dataclass(frozen=True)
class EvaluationStage:
    """One evaluation of a run, dense and pruned model side by side."""

    name: str
    """Its key under ``evaluation:`` in recipes, in report.json and in ``Report.evaluations``."""
    label: str
    """Its name in the progress output and in ``stage_seconds``."""
    settings: type
    """Dataclass of its recipe settings (defaults and the fields' rules)."""
    section: type
    """Dataclass of its report section."""
    run: Callable[[EvaluationInputs], Any]
    """Measures; returns the section, or None when it was skipped (with a note saying why)."""
    enabled: Callable[[Any], bool] = lambda recipe: True
    """Whether a recipe runs it (reads the whole recipe: a stage may depend on an export)."""
    dense: Callable[[DenseInputs], Any] | None = None
    """Its part that needs the dense model, which a run pruning in place computes before pruning."""
    headline: Callable[[Any, Any], list[str]] | None = None
    """``headline(section, report)``: its rows of report.md's headline table (metric | dense | pruned | ratio)."""
    markdown: Callable[[Any, Any], list[str]] | None = None
    """``markdown(section, report)``: its section of report.md."""
    reads_weights: bool = True
    """Whether its run computes with the PyTorch models; False: it reads only their shapes (parameter counts,
    multiply-adds), so a run frees the models' weights before it when no later stage computes with them."""
    keyed_by: tuple[str, ...] = ()
    """Other evaluations whose recipe settings its result depends on: a resumed run keeps an earlier attempt's
    result only when theirs are the same too."""


def ratio_text(pruned: float | None, dense: float | None) -> str:
    """``pruned / dense`` as ``0.731x``; ``n/a`` without both."""
    return f"{pruned / dense:.3f}x" if pruned is not None and dense else "n/a"


def mib(n: int) -> str:
    """Bytes in MiB: ``12.3 MiB``."""
    return f"{n / 2**20:,.1f} MiB"
