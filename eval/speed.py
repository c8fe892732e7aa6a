"""Inference speed of several models measured side by side (METHOD.md section 4).

Each repeat runs every model once, in turn (interleaved, so drift in machine speed hits all of them
alike): a prefill of ``prompt_tokens`` random tokens for ``batch_size`` sequences, then
``new_tokens`` greedy decode steps that reuse the KV cache. Warm-up repeats are discarded; the
report gives the median and the spread (min, max) of the timed repeats. On CUDA every clock read
is preceded by a synchronisation.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from prune.memory import current_bytes, peak_bytes, reset_peak


@dataclass
class SpeedResult:
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

    def as_dict(self) -> dict:
        return asdict(self)


def synchronized_clock(device: torch.device) -> float:
    """Seconds from a monotonic clock, read after all queued work on ``device`` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cache_keyword(model) -> str:
    """Name of the KV-cache argument and output field: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.inference_mode()
def prefill_and_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """One greedy generation with the KV cache; returns (prefill seconds, decode seconds)."""
    device = prompt.device
    start = synchronized_clock(device)
    out = model(input_ids=prompt, use_cache=True)
    next_token = out.logits[:, -1].argmax(-1, keepdim=True)
    prefilled = synchronized_clock(device)
    keyword = cache_keyword(model)
    cache = getattr(out, keyword)
    for _ in range(new_tokens):
        out = model(input_ids=next_token, use_cache=True, **{keyword: cache})
        cache = getattr(out, keyword)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
    done = synchronized_clock(device)
    return prefilled - start, done - prefilled


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def linear_macs_per_token(model) -> int:
    """Multiply-adds per token of all ``nn.Linear`` layers, lm_head included (a tied lm_head still computes).

    Prefill compute and the weight bytes a decode step reads both scale with it, so dense / pruned of
    this number is the speedup the removed units allow (attention over the context excluded).
    """
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def measure_speed(models: dict, prompt_tokens: int, batch_size: int, new_tokens: int, warmup: int, repeats: int,
                  seed: int = 0, progress: bool = True) -> dict[str, SpeedResult]:
    """Time every model of ``models`` (name -> model, all on one device) interleaved; results by name."""
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, first.config.vocab_size, (batch_size, prompt_tokens), generator=generator).to(device)
    timings = {name: [] for name in models}
    working = {name: 0 for name in models}
    runs = [(r, name) for r in range(warmup + repeats) for name in models]
    for r, name in tqdm(runs, desc="speed (prefill + decode)", unit="run", disable=not progress):
        before = current_bytes(device)
        reset_peak(device)
        result = prefill_and_decode(models[name], prompt, new_tokens)
        working[name] = max(working[name], peak_bytes(device) - before)
        if r >= warmup:
            timings[name].append(result)
    results = {}
    for name, runs_of_model in timings.items():
        prefill_ms = [1000 * p for p, _ in runs_of_model]
        rates = [batch_size * new_tokens / d for _, d in runs_of_model]
        results[name] = SpeedResult(
            prefill_ms_median=statistics.median(prefill_ms), prefill_ms_min=min(prefill_ms), prefill_ms_max=max(prefill_ms),
            decode_tokens_per_s_median=statistics.median(rates), decode_tokens_per_s_min=min(rates),
            decode_tokens_per_s_max=max(rates), weight_bytes=weight_bytes(models[name]),
            linear_macs_per_token=linear_macs_per_token(models[name]),
            peak_memory_bytes=weight_bytes(models[name]) + working[name],
        )
    return results
