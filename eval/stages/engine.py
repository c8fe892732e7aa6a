"""The engine evaluation: the exported GGUF file in llama.cpp beside the dense model's file of the same tensor
type, speed and perplexity (``eval/engine.py`` measures)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import torch

from eval.engine import EngineSpeed, engine_available, engine_perplexity, engine_speed, open_gguf
from eval.perplexity import leading_perplexity, window_count
from eval.speed import linear_macs_per_token
from eval.stages.base import DenseInputs, EvaluationInputs, EvaluationStage, mib, ratio_text
from prune.schema import above, at_least, ruled

if TYPE_CHECKING:
    from eval.report import Report


@dataclass
class EngineSettings:
    """The exported GGUF file in llama.cpp (needs ``export.formats`` with gguf and the ``engine`` extra)."""

    enabled: bool = True
    threads: int | None = ruled(above(0), None)
    """CPU threads of the engine; null = as many as torch uses."""
    prompt_tokens: int = ruled(above(1), 128)
    new_tokens: int = ruled(above(0), 64)
    warmup: int = ruled(at_least(0), 1)
    repeats: int = ruled(above(0), 5)
    perplexity_windows: int = ruled(at_least(0), 2)
    """The first this many windows of the perplexity evaluation (at most as many as it has) through the pruned file,
    its perplexity from the engine's logits beside PyTorch's on the same windows: a check of the file, which a few
    windows make (PyTorch's perplexity on all of them is the measurement); 0 = none."""


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
    """The pruned file's perplexity in the engine on the first ``perplexity_windows`` perplexity windows (None when
    not measured)."""
    perplexity_windows: int | None = None
    """How many windows ``perplexity`` is of (0 when not measured; None in a report.json written before the check
    ran on fewer windows than the perplexity evaluation: all of its windows)."""


def dense_engine(inputs: DenseInputs) -> dict[str, Any] | None:
    """The dense model's GGUF file of the recipe's type (cached) and its linear multiply-adds per token; None
    when llama.cpp's binding is not installed."""
    if not engine_available():
        return None
    tensor_type = inputs.context.recipe.export.gguf_type
    return {"file": inputs.context.dense_gguf(inputs.dense, tensor_type), "macs": linear_macs_per_token(inputs.dense)}


def evaluate_engine(inputs: EvaluationInputs) -> EngineReport | None:
    """Speed of the exported GGUF file in llama.cpp against the dense model's file of the same type, and its
    perplexity from the engine's logits; None (with a note) when the engine is not installed."""
    exported = next((e for e in inputs.exports if e.format == "gguf"), None)
    dense = inputs.dense_part(STAGE)
    if exported is None or exported.tensor_type is None or dense is None:
        inputs.notes.append("llama.cpp is not installed: the engine stage was skipped (pip install 'prune[engine]').")
        return None
    settings, ppl = inputs.settings.engine, inputs.settings.perplexity
    threads = settings.threads or torch.get_num_threads()
    paths = {"dense": dense["file"], "pruned": inputs.directory / exported.path}
    speed = engine_speed(paths, settings.prompt_tokens, settings.new_tokens, settings.warmup, settings.repeats, threads)
    windows = min(settings.perplexity_windows, window_count(len(inputs.context.text), ppl.seqlen, ppl.windows))
    measured = None
    if windows:
        with open_gguf(paths["pruned"], ppl.seqlen, threads, all_logits=False, exact_cache=False) as llm:
            measured = engine_perplexity(llm, inputs.context.text, ppl.seqlen, windows)["perplexity"]
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
        perplexity_windows=windows if measured is not None else 0,
    )


def markdown_section(engine: EngineReport, report: Report) -> list[str]:
    d, p, ppl = engine.dense, engine.pruned, report.perplexity
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
        f"| file size | {mib(d.file_bytes)} | {mib(p.file_bytes)} | {ratio_text(p.file_bytes, d.file_bytes)} |",
        f"| prompt processing, tokens/s | {d.prompt_tokens_per_s_median:,.1f} "
        f"({d.prompt_tokens_per_s_min:,.1f}-{d.prompt_tokens_per_s_max:,.1f}) | {p.prompt_tokens_per_s_median:,.1f} "
        f"({p.prompt_tokens_per_s_min:,.1f}-{p.prompt_tokens_per_s_max:,.1f}) | "
        f"{ratio_text(p.prompt_tokens_per_s_median, d.prompt_tokens_per_s_median)} {limit} |",
        f"| generation, tokens/s | {d.decode_tokens_per_s_median:,.1f} "
        f"({d.decode_tokens_per_s_min:,.1f}-{d.decode_tokens_per_s_max:,.1f}) | {p.decode_tokens_per_s_median:,.1f} "
        f"({p.decode_tokens_per_s_min:,.1f}-{p.decode_tokens_per_s_max:,.1f}) | "
        f"{ratio_text(p.decode_tokens_per_s_median, d.decode_tokens_per_s_median)} {limit} |",
    ]
    if engine.perplexity is not None and ppl:
        windows = ppl.windows if engine.perplexity_windows is None else engine.perplexity_windows
        pytorch = (
            leading_perplexity(ppl.pruned_window_nll, ppl.seqlen, windows) if windows < ppl.windows else ppl.pruned
        )
        lines.append(
            f"| {ppl.dataset} perplexity of the pruned file (the first {windows} of the {ppl.seqlen}-token windows) "
            f"| | {engine.perplexity:.2f} | {ratio_text(engine.perplexity, pytorch)} of PyTorch's {pytorch:.2f} on "
            "the same windows |"
        )
    return [*lines, ""]


STAGE = EvaluationStage(
    name="engine",
    label="engine (llama.cpp)",
    settings=EngineSettings,
    section=EngineReport,
    run=evaluate_engine,
    enabled=lambda recipe: recipe.evaluation.engine.enabled and "gguf" in recipe.export.formats,
    dense=dense_engine,
    markdown=markdown_section,
    reads_weights=False,  # it runs the GGUF files; of the PyTorch model it reads the shapes
    keyed_by=("perplexity",),  # its check runs the perplexity evaluation's first windows
)
