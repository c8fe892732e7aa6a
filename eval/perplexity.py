"""Perplexity on a running text (docs/METHOD.md §4).

The text is joined and tokenized once, cut into non-overlapping windows of ``seqlen`` tokens (the
first ``windows`` of them, or all), and perplexity = exp(total NLL / predicted tokens), each window
predicting its tokens 2..seqlen from the ones before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft import PeftModel
from tqdm import tqdm
from transformers import PreTrainedModel

from prune.placement import input_device
from prune.statistics import output_logits

LOSS_CHUNK_TOKENS = 256
"""Positions whose logits exist at a time: the output head runs on this many final hidden states at once, so a
window's [seqlen, vocabulary] logits never exist (at 2,048 x 151,936 they are 594 MiB in bfloat16; 256 positions'
float32 log-probabilities are 148 MiB)."""


def window_count(n_tokens: int, seqlen: int, windows: int | None) -> int:
    """Number of windows evaluated: all complete ones, capped at ``windows``."""
    available = n_tokens // seqlen
    return available if windows is None else min(windows, available)


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    seqlen: int,
    windows: int | None,
    label: str = "",
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``tokens`` [n_tokens] (LongTensor).

    Returns ``{"perplexity", "seqlen", "windows", "predicted_tokens", "mean_nll", "window_nll"}``: NLL in nats per
    token, and each window's summed NLL (nats) in order, so that another measurement on fewer windows can be
    compared with this one on the same windows (:func:`leading_perplexity`).
    """
    count = window_count(len(tokens), seqlen, windows)
    if count == 0:
        raise ValueError(f"the evaluation text has {len(tokens)} tokens, fewer than one window of {seqlen}")
    device = input_device(model)
    causal = model.get_base_model() if isinstance(model, PeftModel) else model  # LoRA: adapters live in its modules
    window_nll, predicted = [], 0
    for k in tqdm(range(count), desc=f"perplexity {label}".strip(), unit="window", disable=not progress):
        ids = tokens[k * seqlen : (k + 1) * seqlen].to(device).unsqueeze(0)
        normed = causal.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]  # [seqlen - 1, hidden]
        targets = ids[0, 1:]
        nll = 0.0
        for start in range(0, seqlen - 1, LOSS_CHUNK_TOKENS):
            chunk = slice(start, start + LOSS_CHUNK_TOKENS)
            logits = output_logits(causal, normed[chunk]).float()  # [chunk, vocab]
            nll += float(F.cross_entropy(logits, targets[chunk], reduction="sum"))
        window_nll.append(nll)
        predicted += seqlen - 1
    mean_nll = sum(window_nll) / predicted
    return {
        "perplexity": math.exp(mean_nll),
        "seqlen": seqlen,
        "windows": count,
        "predicted_tokens": predicted,
        "mean_nll": mean_nll,
        "window_nll": window_nll,
    }


def leading_perplexity(window_nll: list[float], seqlen: int, windows: int) -> float:
    """The perplexity of the first ``windows`` windows from each window's summed NLL (nats; ``window_nll`` of
    :func:`perplexity`), each window predicting ``seqlen - 1`` tokens."""
    return math.exp(sum(window_nll[:windows]) / (windows * (seqlen - 1)))
