"""The evaluation stages of a run: dense and pruned model side by side, each stage returning its report section.

:data:`EVALUATIONS` lists them in the order they run; a stage runs when the recipe enables it. The
dense model's results are cached (``<cache>/dense_evaluation/``, keyed by model file, dtype, device
and the stage's settings), so only the first run of a model pays for them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval.engine import engine_available, engine_perplexity, engine_speed, open_gguf
from eval.perplexity import perplexity
from eval.report import (
    AccuracyChange,
    EngineReport,
    ExportReport,
    PerplexityReport,
    SpeedReport,
    ZeroshotReport,
    ZeroshotScores,
)
from eval.speed import linear_macs_per_token, measure_speed, resolve_decode_loop
from eval.zeroshot import accuracy_changes, local_data_file, resolve_source, zeroshot_accuracy
from prune.export import gguf_tokenizer_source
from prune.gguf_export import GGUF_EXPORT_VERSION, write_gguf
from prune.models import ModelSourceError, check_gguf
from prune.paths import DamagedCacheError, data_dir, file_identity, read_checked_json, recomputing, write_checked_json
from prune.placement import input_device
from prune.prepare import Prepared
from prune.recipe import Recipe
from prune.schema import from_mapping

DENSE_EVALUATION_VERSION = 2
"""Part of the key of cached dense-model evaluations; bump when evaluation code changes its numbers."""


@dataclass(frozen=True)
class EvaluationInputs:
    """What an evaluation stage reads."""

    prepared: Prepared
    dense: nn.Module | None
    """The dense model; None when the run pruned it in place (its parts of the evaluation are in ``dense_parts``)."""
    pruned: nn.Module
    """The model the run saves (after recovery when there is one)."""
    tokenizer: Any
    text: torch.Tensor
    """The perplexity text, tokenized once: LongTensor [n_tokens]."""
    before_recovery: float | None
    """Perplexity of the pruned model before recovery (None without recovery)."""
    directory: Path
    """The run directory being written (exports are in it)."""
    exports: list[ExportReport]
    notes: list[str]
    """The report's notes; a stage may add one."""
    dense_parts: dict[str, Any]
    """Dense parts already computed (:func:`dense_first`), by stage section; the others are computed here."""

    def dense_part(self, stage: EvaluationStage) -> Any:
        """The stage's dense part: computed before pruning in place, else now (from the cache when it holds it)."""
        if stage.section in self.dense_parts:
            return self.dense_parts[stage.section]
        assert stage.dense is not None and self.dense is not None
        return stage.dense(DenseInputs(self.prepared, self.dense, self.tokenizer, self.text))


@dataclass(frozen=True)
class DenseInputs:
    """What the dense part of an evaluation stage reads."""

    prepared: Prepared
    dense: nn.Module
    tokenizer: Any
    text: torch.Tensor


def cached_dense_evaluation(
    prepared: Prepared, model: nn.Module, name: str, settings: dict, compute: Callable[[], dict]
) -> tuple[dict, str | None]:
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
            "device": input_device(model).type,
            "name": name,
            "settings": settings,
        },
        sort_keys=True,
    )
    path = prepared.cache / "dense_evaluation" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return read_checked_json(path, DENSE_EVALUATION_VERSION), str(path)
        except DamagedCacheError as error:
            recomputing(path, error)
    result = compute()
    write_checked_json(path, result, DENSE_EVALUATION_VERSION)
    return result, None


def dense_perplexity(inputs: DenseInputs) -> tuple[dict, str | None]:
    """The dense model's perplexity (cached) and the cache file it was reused from (None when computed)."""
    prepared, settings = inputs.prepared, inputs.prepared.recipe.evaluation.perplexity
    key = {"text": prepared.evaluation_source.fingerprint(), "seqlen": settings.seqlen, "windows": settings.windows}
    return cached_dense_evaluation(
        prepared,
        inputs.dense,
        "perplexity",
        key,
        lambda: perplexity(inputs.dense, inputs.text, settings.seqlen, settings.windows, "dense"),
    )


def evaluate_perplexity(inputs: EvaluationInputs) -> PerplexityReport:
    """Perplexity of the dense (cached) and the pruned model on the recipe's windows of the evaluation text."""
    settings = inputs.prepared.recipe.evaluation.perplexity
    dense, reused = inputs.dense_part(PERPLEXITY)
    pruned = perplexity(inputs.pruned, inputs.text, settings.seqlen, settings.windows, "pruned")
    return PerplexityReport(
        dataset=settings.dataset,
        seqlen=settings.seqlen,
        windows=dense["windows"],
        predicted_tokens=dense["predicted_tokens"],
        dense=dense["perplexity"],
        pruned=pruned["perplexity"],
        before_recovery=inputs.before_recovery,
        dense_reused_from=reused,
    )


def _zeroshot(model: nn.Module, tokenizer: Any, recipe: Recipe) -> dict:
    zs = recipe.evaluation.zeroshot
    source = resolve_source(zs.tasks, zs.source)
    return zeroshot_accuracy(model, tokenizer, zs.tasks, source, zs.limit, zs.batch_size, zs.seed)


def dense_zeroshot(inputs: DenseInputs) -> tuple[dict, str | None]:
    """The dense model's zero-shot accuracy (cached) and the cache file it was reused from (None when computed)."""
    zs = inputs.prepared.recipe.evaluation.zeroshot
    source = resolve_source(zs.tasks, zs.source)
    data = data_dir()
    files = [file_identity(local_data_file(t, data)) for t in zs.tasks] if source == "local" and data else []
    key = {
        "tasks": zs.tasks,
        "source": source,
        "files": files,
        "limit": zs.limit,
        "batch_size": zs.batch_size,
        "seed": zs.seed,
        "standard_errors": True,
        "per_item": True,
    }
    return cached_dense_evaluation(
        inputs.prepared,
        inputs.dense,
        "zeroshot",
        key,
        lambda: _zeroshot(inputs.dense, inputs.tokenizer, inputs.prepared.recipe),
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
    )


def evaluate_zeroshot(inputs: EvaluationInputs) -> ZeroshotReport:
    """Zero-shot accuracy of the dense (cached) and the pruned model through lm-eval, paired by item."""
    dense, reused = inputs.dense_part(ZEROSHOT)
    return zeroshot_report(dense, _zeroshot(inputs.pruned, inputs.tokenizer, inputs.prepared.recipe), reused)


def evaluate_speed(inputs: EvaluationInputs) -> SpeedReport:
    """Prefill latency and decode throughput of the dense and the pruned model, interleaved in this process."""
    speed = inputs.prepared.recipe.evaluation.speed
    assert inputs.dense is not None  # a run that measures speed keeps the dense model
    results = measure_speed(
        {"dense": inputs.dense, "pruned": inputs.pruned},
        speed.prompt_tokens,
        speed.batch_size,
        speed.new_tokens,
        speed.warmup,
        speed.repeats,
        speed.decode_loop,
    )
    parameter = next(inputs.dense.parameters())
    device = parameter.device
    return SpeedReport(
        device=(
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        ),
        dtype=str(parameter.dtype).removeprefix("torch."),
        prompt_tokens=speed.prompt_tokens,
        batch_size=speed.batch_size,
        new_tokens=speed.new_tokens,
        warmup=speed.warmup,
        repeats=speed.repeats,
        decode_loop=resolve_decode_loop(speed.decode_loop, device),
        dense=results["dense"],
        pruned=results["pruned"],
    )


def dense_gguf(prepared: Prepared, dense: nn.Module, tokenizer: Any, tensor_type: str) -> Path:
    """The dense model as a GGUF file of ``tensor_type``, exported once into ``<cache>/gguf/`` (keyed by the model
    file, its dtype and the export's version) for like-for-like comparisons in the engine."""
    key = json.dumps(
        {
            "version": GGUF_EXPORT_VERSION,
            "model": prepared.model_source.fingerprint(),
            "dtype": str(next(dense.parameters()).dtype),
        },
        sort_keys=True,
    )
    path = prepared.cache / "gguf" / f"dense-{hashlib.sha256(key.encode()).hexdigest()[:16]}-{tensor_type}.gguf"
    if path.is_file():
        try:
            check_gguf(path)
            return path
        except ModelSourceError as error:
            recomputing(path, DamagedCacheError(str(error).removeprefix("model.source: ")))
    source = prepared.model_source
    write_gguf(dense, tokenizer, path, tensor_type, gguf_tokenizer_source(source), Path(source.location).stem)
    return path


def dense_engine(inputs: DenseInputs) -> dict[str, Any] | None:
    """The dense model's GGUF file of the recipe's type (cached) and its linear multiply-adds per token; None
    when llama.cpp's binding is not installed."""
    if not engine_available():
        return None
    tensor_type = inputs.prepared.recipe.export.gguf_type
    return {
        "file": dense_gguf(inputs.prepared, inputs.dense, inputs.tokenizer, tensor_type),
        "macs": linear_macs_per_token(inputs.dense),
    }


def evaluate_engine(inputs: EvaluationInputs) -> EngineReport | None:
    """Speed of the exported GGUF file in llama.cpp against the dense model's file of the same type, and its
    perplexity from the engine's logits; None (with a note) when the engine is not installed."""
    exported = next((e for e in inputs.exports if e.format == "gguf"), None)
    dense = inputs.dense_part(ENGINE)
    if exported is None or exported.tensor_type is None or dense is None:
        inputs.notes.append("llama.cpp is not installed: the engine stage was skipped (pip install 'prune[engine]').")
        return None
    settings, ppl = inputs.prepared.recipe.evaluation.engine, inputs.prepared.recipe.evaluation.perplexity
    threads = settings.threads or torch.get_num_threads()
    paths = {"dense": dense["file"], "pruned": inputs.directory / exported.path}
    speed = engine_speed(paths, settings.prompt_tokens, settings.new_tokens, settings.warmup, settings.repeats, threads)
    measured = None
    if settings.perplexity:
        with open_gguf(paths["pruned"], ppl.seqlen, threads, all_logits=True, exact_cache=False) as llm:
            measured = engine_perplexity(llm, inputs.text, ppl.seqlen, ppl.windows)["perplexity"]
    return EngineReport(
        engine=f"llama.cpp (llama-cpp-python {version('llama-cpp-python')})",
        tensor_type=exported.tensor_type,
        threads=threads,
        prompt_tokens=settings.prompt_tokens,
        new_tokens=settings.new_tokens,
        warmup=settings.warmup,
        repeats=settings.repeats,
        dense=speed["dense"],
        pruned=speed["pruned"],
        dense_file=str(paths["dense"]),
        linear_macs_ratio=dense["macs"] / linear_macs_per_token(inputs.pruned),
        perplexity=measured,
    )


@dataclass(frozen=True)
class EvaluationStage:
    name: str
    """Stage name in the progress output and in ``stage_seconds``."""
    section: str
    """The :class:`eval.report.Report` field it fills."""
    enabled: Callable[[Recipe], bool]
    run: Callable[[EvaluationInputs], Any]
    dense: Callable[[DenseInputs], Any] | None = None
    """Its part that needs the dense model, which a run pruning in place computes before pruning."""


PERPLEXITY = EvaluationStage("perplexity", "perplexity", lambda recipe: True, evaluate_perplexity, dense_perplexity)
ZEROSHOT = EvaluationStage(
    "zero-shot", "zeroshot", lambda recipe: recipe.evaluation.zeroshot.enabled, evaluate_zeroshot, dense_zeroshot
)
SPEED = EvaluationStage("speed", "speed", lambda recipe: recipe.evaluation.speed.enabled, evaluate_speed)
ENGINE = EvaluationStage(
    "engine (llama.cpp)",
    "engine",
    lambda recipe: recipe.evaluation.engine.enabled and "gguf" in recipe.export.formats,
    evaluate_engine,
    dense_engine,
)
EVALUATIONS = (PERPLEXITY, ZEROSHOT, SPEED, ENGINE)
"""The evaluation stages, in the order they run."""


def dense_first(inputs: DenseInputs, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """The dense part of every enabled stage, computed now (before pruning in place), by section; adds the time
    of each to ``stage_seconds`` under ``<stage> (dense)``."""
    parts = {}
    for stage in EVALUATIONS:
        if stage.dense is not None and stage.enabled(inputs.prepared.recipe):
            start = time.perf_counter()
            parts[stage.section] = stage.dense(inputs)
            stage_seconds[f"{stage.name} (dense)"] = time.perf_counter() - start
    return parts
