"""The speed evaluation: prefill latency and decode throughput of the dense and the pruned model in PyTorch,
interleaved in this process (``eval/speed.py`` measures)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from eval.speed import SpeedResult, measure_speed, resolve_decode_loop
from eval.stages.base import EvaluationInputs, EvaluationStage, mib, ratio_text
from prune.schema import above, at_least, ruled

if TYPE_CHECKING:
    from eval.report import Report


@dataclass
class SpeedSettings:
    enabled: bool = True
    prompt_tokens: int = ruled(above(0), 128)
    batch_size: int = ruled(above(0), 1)
    new_tokens: int = ruled(above(0), 64)
    warmup: int = ruled(at_least(0), 1)
    repeats: int = ruled(above(0), 5)
    decode_loop: Literal["auto", "dynamic", "static"] = "auto"
    """``static``: a preallocated KV cache, decode steps in CUDA graphs on a GPU; ``auto``: static on CUDA only."""


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


def evaluate_speed(inputs: EvaluationInputs) -> SpeedReport:
    """Prefill latency and decode throughput of the dense and the pruned model, interleaved in this process."""
    speed = inputs.settings.speed
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


def headline_rows(speed: SpeedReport, report: Report) -> list[str]:
    d, p = speed.dense, speed.pruned
    limit = d.linear_macs_per_token / p.linear_macs_per_token
    return [
        f"| prefill latency, median ms ({speed.batch_size} x {speed.prompt_tokens} tokens) | "
        f"{d.prefill_ms_median:.1f} | {p.prefill_ms_median:.1f} | "
        f"{ratio_text(p.prefill_ms_median, d.prefill_ms_median)} |",
        f"| decode tokens/s, median ({speed.new_tokens} new tokens) | {d.decode_tokens_per_s_median:.1f} | "
        f"{p.decode_tokens_per_s_median:.1f} | "
        f"{ratio_text(p.decode_tokens_per_s_median, d.decode_tokens_per_s_median)} |",
        f"| linear multiply-adds per token (lm_head included) | {d.linear_macs_per_token:,} | "
        f"{p.linear_macs_per_token:,} | {ratio_text(p.linear_macs_per_token, d.linear_macs_per_token)} "
        f"(speedup limit {limit:.2f}x) |",
        f"| peak memory (weights + working) | {mib(d.peak_memory_bytes)} | {mib(p.peak_memory_bytes)} | "
        f"{ratio_text(p.peak_memory_bytes, d.peak_memory_bytes)} |",
    ]


def markdown_section(speed: SpeedReport, report: Report) -> list[str]:
    return [
        "## Speed in PyTorch",
        "",
        f"{speed.device}, {speed.dtype}, {speed.decode_loop} decode loop, dense and pruned interleaved, "
        f"{speed.warmup} warm-up and {speed.repeats} timed repeats (median; spread in report.json).",
        "",
    ]


STAGE = EvaluationStage(
    name="speed",
    label="speed",
    settings=SpeedSettings,
    section=SpeedReport,
    run=evaluate_speed,
    enabled=lambda recipe: recipe.evaluation.speed.enabled,
    headline=headline_rows,
    markdown=markdown_section,
)
