"""Memory plan of a run: the estimated peak memory of every stage, from the model's shape and the recipe alone
(before any weight is loaded), and the check that stops a run its device cannot hold.

Every estimate is the weights resident at that stage plus the largest set of tensors the stage holds at once
(bytes). The terms, with b the bytes of the model's dtype, H the hidden size, F the largest FFN width,
P the weights of the largest decoder block, V the vocabulary, N x T the calibration samples x tokens:

- activation statistics: the samples' hidden states at two layer boundaries (2 N T H b); with gradients,
  one layer's weight gradients (P b), float32 per-weight sums (4 P, twice with summed gradients) and the
  log10 histogram's copies of the largest linear (12 H F); with second moments, their float32 sum and one
  sample's product (8 F^2); one sample's recomputed layer activations (T (4 F + 6 H) b, twice with
  gradients) and the objective's logits (nll: 12 T V; max_logit: 4 V);
- scoring and pruning with the second moments, measured by ``benchmarks/largest_steps.py``: on a GPU one
  float64 (F + 1)^2 matrix beside its Cholesky factor (scoring), or the float32 matrix read from disk, the float64
  one and its gather at the kept columns (the lstsq refit): 18 (F + 1)^2 covers both; on a CPU the factor and the
  inverse are written over the matrix and the refit builds only the kept block, 14 (F + 1)^2 for the scoring
  and 8 (F + 1)^2 for a refit;
- allocation, ``searched``: the dense model's float32 log-probabilities on the search samples (4 n T V, n =
  ``allocation.search_samples``) and one candidate's (12 T V), one (F + 1)^2 refit solve, and the cached
  refit o_proj / down_proj weights of the best candidate and of one generation's offspring;
- pruning: one pruned decoder block being built (P b); the whole pruned model besides the dense one
  when a later stage needs the dense model (recovery, speed); a sequential reconstruction's hidden states
  (N T H b), one linear's input moments (4 F^2), their refit (as above) and one layer's activations;
- evaluation: the models it needs, and a perplexity window's layer activations (seqlen (4 F + 6 H) b) with the
  float32 log-probabilities of 256 of its positions (12 256 V: the output head runs on 256 positions at a time), or
  the float32 logits of a zero-shot batch (12 batch 512 V; lm-eval's requests are assumed to be at most 512 tokens);
- recovery: the teacher, the student, the student's gradients and AdamW's two moments (float32 for the
  trained parameters; LoRA adapters only with ``lora``) and the float32 logits of teacher and student;
- llama.cpp (host memory, the PyTorch weights freed before it): the dense and the pruned GGUF file (the speed
  measurement holds both), llama.cpp's output and compute buffers of ``ENGINE_UBATCH`` rows of float32 logits
  (8 ENGINE_UBATCH V) with the float64 rows the loss is computed in (16 256 V), and a float16 KV cache of a
  perplexity window.

The estimates are compared with measured peaks in BENCHMARKS.md (scale rehearsal).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

import prune.models
from eval.engine import ENGINE_UBATCH, WINDOW_NLL_ROWS
from eval.perplexity import LOSS_CHUNK_TOKENS
from prune.allocation import ALLOCATIONS
from prune.blocks import BlockShape
from prune.gguf_export import TENSOR_TYPES
from prune.recipe import Recipe
from prune.reconstruct import RECONSTRUCTIONS
from prune.statistics import BACKWARD, Statistic

ZEROSHOT_REQUEST_TOKENS = 512
"""Assumed length of the longest lm-eval request in a zero-shot batch (tokens)."""


class MemoryPlanError(ValueError):
    """A stage's estimated peak exceeds the memory of the device it runs on."""


@dataclass(frozen=True)
class StageMemory:
    """One stage's estimated peak (bytes, weights included), what dominates it beyond the weights, and the recipe
    keys that lower it."""

    stage: str
    peak_bytes: int
    dominant: str | None
    """The largest part beyond the weights (None: the weights alone)."""
    advice: str
    host: bool = False
    """In host memory whatever the recipe's device (llama.cpp runs on the CPU)."""

    def describe(self) -> str:
        size = f"{self.peak_bytes / 2**30:.2f} GiB"
        return (
            f"{size}, the weights alone"
            if self.dominant is None
            else f"{size}, most beyond the weights: {self.dominant}"
        )


def planned_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the run will load the model in: ``model.dtype``; for ``auto`` bfloat16 when the run is to use
    CUDA (``model.device`` cuda..., or auto with CUDA present), else float32; for ``bfloat16-if-fast`` bfloat16
    also on a CPU with bfloat16 instructions."""
    return prune.models.resolve_dtype(recipe.model.dtype, torch.device("cuda" if planned_on_cuda(recipe) else "cpu"))


def planned_on_cuda(recipe: Recipe) -> bool:
    """Whether the run is to use CUDA: ``model.device`` cuda..., or auto with CUDA present."""
    device = recipe.model.device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def bfloat16_product_slowdown() -> float:
    """How many times longer a [128, 1024] x [1024, 1024] matrix product takes in bfloat16 than in float32 on this
    CPU (the best of 3 timings of each; 1.8 s in all on a 2-core CPU that converts bfloat16 in software)."""
    times = {}
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(128, 1024, generator=generator).to(dtype)
        b = torch.randn(1024, 1024, generator=generator).to(dtype)
        a @ b  # the first product pays for kernel selection
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        times[dtype] = best
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def slow_dtype_note(recipe: Recipe) -> str | None:
    """One line when the run is to compute in bfloat16 (``model.dtype``, or ``evaluation.zeroshot.dtype`` of an
    enabled zero-shot evaluation) on a CPU without bfloat16 instructions, where each bfloat16 matrix product is
    converted in software, with the slowdown measured now (``bfloat16_product_slowdown``): a [256, 1536] x
    [1536, 8960] product took 0.69 s in bfloat16 and 0.13 s in float32 on one 2-core AVX2 CPU, 10.7 s against 78 ms
    on another, and 4.3 ms against 27 ms on one with AMX; else None."""
    zeroshot = recipe.evaluation.zeroshot
    keys = [
        key
        for key, bfloat16 in (
            ("model.dtype", planned_dtype(recipe) == torch.bfloat16),
            ("evaluation.zeroshot.dtype", zeroshot.enabled and zeroshot.dtype == "bfloat16"),
        )
        if bfloat16
    ]
    if planned_on_cuda(recipe) or not keys or prune.models.cpu_has_bfloat16_instructions():
        return None
    return (
        f"note: {' and '.join(keys)} bfloat16 on a CPU without bfloat16 instructions (AVX512-BF16 or AMX): a matrix "
        f"product took {bfloat16_product_slowdown():.0f}x as long as in float32 here; float32 is faster where twice "
        "the weights' memory fits"
    )


SEQUENTIAL_STATES = "the pruned model's hidden states of calibration.samples x calibration.seqlen tokens"
SMALLER_DTYPE = "load the model in a smaller model.dtype or use a device with more memory"


def _largest(terms: dict[str, int]) -> str:
    return max(terms, key=lambda name: terms[name])


def estimate_memory(
    recipe: Recipe,
    shape: BlockShape,
    vocab_size: int,
    total_parameters: int,
    needs: frozenset[Statistic],
    in_place: bool,
) -> list[StageMemory]:
    """The estimated peak of each stage the recipe runs, in order (see the module docstring for the terms).

    ``needs``: what the statistics pass collects; ``in_place``: whether pruning modifies the dense model (no later
    stage needs it)."""
    b = planned_dtype(recipe).itemsize
    hidden, vocab = shape.hidden_size, vocab_size
    weights = total_parameters * b
    decoder_share = sum(shape.linear_weight_count(w) for w in shape.layers) / total_parameters  # about
    kept_fraction = 1 - recipe.pruning.target * (1 if recipe.pruning.target_of == "all" else decoder_share)
    pruned_weights = round(weights * kept_fraction)
    widest = max(max(w.ffn_channels, w.query_heads * shape.head_dim) for w in shape.layers)
    block = max(shape.linear_weight_count(w) for w in shape.layers)
    samples, seqlen = recipe.calibration.samples, recipe.calibration.seqlen
    stages = [StageMemory("load model", weights, None, SMALLER_DTYPE)]

    if needs:
        backward = bool(needs & BACKWARD)
        terms = {
            "hidden states of calibration.samples x calibration.seqlen tokens": 2 * samples * seqlen * hidden * b,
            "one layer's activations": seqlen * (4 * widest + 6 * hidden) * b * (2 if backward else 1),
        }
        if backward:
            sums = 2 if Statistic.SUMMED_GRADIENTS in needs else 1
            terms["one layer's weight gradients and per-weight sums"] = block * b + 4 * block * sums
            terms["the density histogram's copies of one linear"] = 12 * hidden * widest
            terms["the objective's logits"] = 12 * seqlen * vocab if recipe.scoring.objective == "nll" else 4 * vocab
        if Statistic.SECOND_MOMENTS in needs:
            terms["one layer's second moments"] = 8 * widest * widest
        dominant = _largest(terms)
        advice = "lower calibration.samples or calibration.seqlen" if "calibration" in dominant else SMALLER_DTYPE
        stages.append(StageMemory("activation statistics", weights + sum(terms.values()), dominant, advice))

    on_cuda = planned_on_cuda(recipe)
    scoring_solve = (18 if on_cuda else 14) * (widest + 1) ** 2
    refit_solve = (18 if on_cuda else 8) * (widest + 1) ** 2
    if Statistic.SECOND_MOMENTS in needs:
        stages.append(
            StageMemory("scoring", weights + scoring_solve, "one float64 second-moment matrix", SMALLER_DTYPE)
        )
    if ALLOCATIONS[recipe.allocation.strategy].evaluates:
        settings = recipe.allocation
        terms = {
            "the dense log-probabilities of allocation.search_samples x calibration.seqlen tokens": (
                4 * settings.search_samples * seqlen * vocab + 12 * seqlen * vocab
            ),
            "the refit o_proj / down_proj of the best candidate and of one generation's offspring": (
                sum(hidden * (w.query_heads * shape.head_dim + w.ffn_channels) for w in shape.layers)
                + settings.search_offspring * 2 * hidden * widest
            )
            * b,
        }
        advice = "lower allocation.search_samples or calibration.seqlen"
        stages.append(StageMemory("allocation", weights + refit_solve + sum(terms.values()), _largest(terms), advice))
    pruning_terms = {"one pruned decoder block": block * b}
    reconstruction = RECONSTRUCTIONS[recipe.pruning.reconstruct]
    if Statistic.SECOND_MOMENTS in needs & reconstruction.needs:  # the refit reads them
        pruning_terms["one float64 second-moment matrix"] = refit_solve
    if reconstruction.sequential:
        pruning_terms[SEQUENTIAL_STATES] = samples * seqlen * hidden * b
        pruning_terms["one linear's input moments, its refit and one layer's activations"] = (
            4 * widest * widest + refit_solve + seqlen * (4 * widest + 6 * hidden) * b
        )
    if not in_place:
        pruning_terms["the pruned model beside the dense one"] = pruned_weights
    dominant = _largest(pruning_terms)
    advice = SMALLER_DTYPE
    if dominant.startswith("the pruned"):
        advice = "disable evaluation.speed (it keeps the dense model)"
    elif dominant == SEQUENTIAL_STATES:
        advice = "lower calibration.samples or calibration.seqlen"
    stages.append(StageMemory("pruning", weights + sum(pruning_terms.values()), dominant, advice))

    resident = pruned_weights if in_place else weights + pruned_weights
    if recipe.recovery.method != "none":
        rec = recipe.recovery
        trained = pruned_weights if rec.method == "distill" else 0
        terms = {
            "gradients and AdamW moments of the trained parameters": trained + 2 * (trained // b) * 4,
            "teacher and student logits (recovery.batch_size x recovery.seqlen)": 2
            * 12
            * rec.batch_size
            * rec.seqlen
            * vocab,
            "the student's activations": rec.batch_size * rec.seqlen * hidden * shape.num_layers * 16 * b,
        }
        advice = "lower recovery.batch_size or recovery.seqlen, or use recovery.method: lora"
        stages.append(StageMemory("recovery", weights + pruned_weights + sum(terms.values()), _largest(terms), advice))
    window = recipe.evaluation.perplexity.seqlen
    terms = {
        "one layer's activations of a window": window * (4 * widest + 6 * hidden) * b,
        f"the float32 log-probabilities of {LOSS_CHUNK_TOKENS} positions": 12 * LOSS_CHUNK_TOKENS * vocab,
    }
    advice = "lower evaluation.perplexity.seqlen"
    stages.append(StageMemory("perplexity", resident + sum(terms.values()), _largest(terms), advice))
    if recipe.evaluation.zeroshot.enabled:
        batch = 12 * recipe.evaluation.zeroshot.batch_size * ZEROSHOT_REQUEST_TOKENS * vocab
        advice = "lower evaluation.zeroshot.batch_size"
        stages.append(StageMemory("zero-shot", resident + batch, "float32 logits of a batch", advice))
    if recipe.evaluation.speed.enabled:
        speed = recipe.evaluation.speed
        tokens = speed.batch_size * (speed.prompt_tokens + speed.new_tokens)
        kv_cache = 2 * sum(w.kv_heads for w in shape.layers) * shape.head_dim * tokens * b
        prompt_logits = 4 * speed.batch_size * speed.prompt_tokens * vocab
        peak = weights + pruned_weights + 2 * kv_cache + prompt_logits
        advice = "disable evaluation.speed (python -m eval.speed measures the pruned shape on random weights)"
        stages.append(StageMemory("speed", peak, "the pruned model beside the dense one", advice))
    if recipe.evaluation.engine.enabled and "gguf" in recipe.export.formats:
        file_bytes = total_parameters * TENSOR_TYPES[recipe.export.gguf_type].bytes_per_weight
        kv_cache = 2 * sum(w.kv_heads for w in shape.layers) * shape.head_dim * window * 2
        logits = 8 * ENGINE_UBATCH * vocab + 16 * WINDOW_NLL_ROWS * vocab
        peak = round(file_bytes * (1 + kept_fraction)) + logits + kv_cache
        advice = "a smaller export.gguf_type, or disable evaluation.engine"
        stages.append(StageMemory("engine (llama.cpp)", peak, "the dense and the pruned GGUF file", advice, host=True))
    return stages


def available_bytes(device: torch.device) -> int:
    """Memory a run can use on ``device`` now: free CUDA memory, or the system's available memory (Linux
    ``MemAvailable``; else the physical memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(stages: list[StageMemory], available: int, where: str) -> None:
    """MemoryPlanError naming the first stage whose estimate exceeds ``available`` bytes on ``where`` and the
    recipe keys that lower it."""
    for stage in stages:
        if stage.peak_bytes > available:
            raise MemoryPlanError(
                f"the {stage.stage} stage needs an estimated {stage.describe()}; {where} has "
                f"{available / 2**30:.2f} GiB available: {stage.advice} (--dry-run prints every stage's estimate; "
                "--ignore-memory-estimate runs anyway)"
            )
