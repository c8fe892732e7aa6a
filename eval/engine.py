"""GGUF files run in llama.cpp, through its Python binding (``llama-cpp-python``, the optional ``engine`` extra).

What a deployed model is judged by, measured in the engine itself:

- :func:`engine_logits` / :func:`greedy_tokens`: next-token logits of a token sequence and greedy
  generation (argmax of the last position, one token at a time);
- :func:`engine_perplexity`: the perplexity protocol of ``eval/perplexity.py`` (non-overlapping
  windows, each predicting its tokens 2..seqlen) on the engine's logits;
- :func:`engine_speed`: prompt processing (one batched evaluation of the prompt) and generation
  (greedy decode steps after it) in tokens per second by the engine's own timers, several files
  interleaved, warm-up repeats discarded, median and spread of the timed repeats.

Comparisons with the PyTorch model use a float32 KV cache (``exact_cache``), since the engine's default
float16 cache rounds keys and values; speed uses the engine's defaults, as a deployment would.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

GGML_TYPE_F32 = 0
"""ggml's type id of float32 (the KV cache type for exact comparisons)."""
ENGINE_UBATCH = 512
"""Positions per physical batch (llama.cpp's default): its compute buffer holds this many rows of logits, so a
2048-token window of a 152k vocabulary needs 0.3 GB there instead of 1.2 GB."""


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


def engine_available() -> bool:
    """Whether the llama.cpp binding is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def open_gguf(path: Path, context: int, threads: int, all_logits: bool, exact_cache: bool) -> Iterator[Any]:
    """A llama.cpp model of the GGUF file ``path`` with a context of ``context`` tokens, closed on exit.

    ``all_logits``: keep the logits of every evaluated position (``Llama.scores``); ``exact_cache``: a float32
    KV cache instead of the engine's default float16.
    """
    from llama_cpp import Llama

    cache_type = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if exact_cache else {}
    llm = Llama(
        str(path),
        n_ctx=context,
        n_batch=context,
        n_ubatch=min(context, ENGINE_UBATCH),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=all_logits,
        verbose=False,
        **cache_type,
    )
    try:
        yield llm
    finally:
        llm.close()


def engine_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """Next-token logits [len(ids), vocab] (float32) of a fresh sequence (needs ``all_logits``)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: llm.n_tokens])


def _last_logits(llm: Any) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def greedy_tokens(llm: Any, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``ids`` (argmax of the last position's logits, one decode step each)."""
    llm.reset()
    llm.eval(ids)
    generated = []
    for _ in range(new_tokens):
        token = int(np.argmax(_last_logits(llm)))
        generated.append(token)
        llm.eval([token])
    return generated


WINDOW_NLL_ROWS = 256
"""Positions whose log-softmax :func:`window_nll` computes at once (in float64)."""


def window_nll(logits: np.ndarray, window: list[int], rows: int = WINDOW_NLL_ROWS) -> float:
    """Summed negative log-likelihood (nats) of ``window[1:]`` under ``logits`` [>= len(window) - 1, vocab] (row i:
    the logits after ``window[: i + 1]``), in float64 over ``rows`` positions at a time: a 2048-token window of a
    152k vocabulary is 1.2 GB of float32 logits, and a float64 copy of all of them would be 2.5 GB more."""
    targets = torch.tensor(window[1:])
    total = 0.0
    for start in range(0, len(targets), rows):
        chunk = torch.from_numpy(logits[start : min(start + rows, len(targets))]).double()
        total -= float(torch.log_softmax(chunk, -1).gather(1, targets[start : start + rows, None]).sum())
    return total


def engine_window_nll(llm: Any, window: list[int]) -> float:
    """Summed negative log-likelihood (nats) of ``window[1:]`` from the engine's logits, the window decoded
    ``ENGINE_UBATCH`` positions per call and each call's logits read in place in llama.cpp's output buffer: that
    buffer then holds so many rows, not the window's (a 2048-token window of a 152k vocabulary: 0.3 GB, not 1.2),
    and no copy of them is made (``Llama.eval`` with ``logits_all`` copies every row into ``Llama.scores``)."""
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # the sequence starts afresh
    step, vocab, total = min(ENGINE_UBATCH, llm.n_batch), llm.n_vocab(), 0.0
    for start in range(0, len(window) - 1, step):  # the last token is only a target
        chunk = window[start : start + step]
        llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
        llm._ctx.decode(llm._batch)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), vocab))
        total += window_nll(logits, window[start : start + len(chunk) + 1])
    return total


def engine_perplexity(
    llm: Any, tokens: torch.Tensor, seqlen: int, windows: int | None, progress: bool = True
) -> dict[str, float]:
    """Perplexity of the engine's logits on ``tokens`` [n_tokens]: the first ``windows`` non-overlapping windows
    of ``seqlen`` tokens (all when None), exp(total NLL / predicted tokens); ``llm`` opened with a context of at
    least ``seqlen`` (``all_logits`` not needed).

    Returns ``{"perplexity", "windows", "predicted_tokens", "mean_nll"}`` (NLL in nats per token).
    """
    available = len(tokens) // seqlen
    count = available if windows is None else min(windows, available)
    total, predicted = 0.0, 0
    for k in tqdm(range(count), desc="engine perplexity", unit="window", disable=not progress):
        total += engine_window_nll(llm, tokens[k * seqlen : (k + 1) * seqlen].tolist())
        predicted += seqlen - 1
    mean_nll = total / predicted
    return {"perplexity": math.exp(mean_nll), "windows": count, "predicted_tokens": predicted, "mean_nll": mean_nll}


def engine_speed(
    paths: dict[str, Path],
    prompt_tokens: int,
    new_tokens: int,
    warmup: int,
    repeats: int,
    threads: int,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, EngineSpeed]:
    """Speed of every file of ``paths`` (name -> GGUF file), interleaved repeat by repeat, in one process.

    Each run: the context is cleared, a random prompt of ``prompt_tokens`` tokens is evaluated in one batch
    (prompt processing), then ``new_tokens`` greedy decode steps follow (generation). Times are the engine's
    own (``llama_perf_context``: from the start of each evaluation to its end, as llama.cpp reports tokens
    per second), so the Python loop around the engine does not count.
    """
    import llama_cpp

    context = prompt_tokens + new_tokens + 8
    with ExitStack() as stack:
        models = {
            name: stack.enter_context(open_gguf(path, context, threads, all_logits=False, exact_cache=False))
            for name, path in paths.items()
        }
        vocab = min(llm.n_vocab() for llm in models.values())
        prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        runs = [(r, name) for r in range(warmup + repeats) for name in models]
        for r, name in tqdm(runs, desc="engine speed", unit="run", disable=not progress):
            llm = models[name]
            llm.reset()
            llama_cpp.llama_perf_context_reset(llm.ctx)
            llm.eval(prompt)
            for _ in range(new_tokens):
                llm.eval([int(np.argmax(_last_logits(llm)))])
            llama_cpp.llama_synchronize(llm.ctx)  # the engine books a decode's time when it finishes
            timers = llama_cpp.llama_perf_context(llm.ctx)
            if timers.n_p_eval != prompt_tokens or timers.n_eval != new_tokens:
                raise RuntimeError(f"llama.cpp counted {timers.n_p_eval} + {timers.n_eval} evaluated tokens")
            if r >= warmup:
                times[name].append((timers.t_p_eval_ms / 1000, timers.t_eval_ms / 1000))
    results = {}
    for name, runs_of_file in times.items():
        prompt_rates = [prompt_tokens / p for p, _ in runs_of_file]
        decode_rates = [new_tokens / d for _, d in runs_of_file]
        results[name] = EngineSpeed(
            statistics.median(prompt_rates),
            min(prompt_rates),
            max(prompt_rates),
            statistics.median(decode_rates),
            min(decode_rates),
            max(decode_rates),
            paths[name].stat().st_size,
        )
    return results
