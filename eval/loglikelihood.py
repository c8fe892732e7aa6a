"""Log-likelihoods of continuations, each shared context run once: the zero-shot stage's scorer.

A multiple-choice item asks for the log-likelihood of every choice after the same context. lm-eval's
``HFLM`` runs context + choice once per choice; :func:`shared_context_loglikelihoods` runs each distinct
context once, keeps its key/value cache, and runs all of that context's continuations in one batch on it
(right-padded, the padding masked). The numbers are those of running each pair whole, up to float
rounding (the cache splits one matrix product into two). :class:`SharedContextLM` is ``HFLM`` with this
scorer; pairs longer than the model's window go through ``HFLM``'s own code (it truncates them from the left).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm
from transformers import PreTrainedModel

from eval.speed import cache_keyword
from prune.placement import input_device

Request = tuple[tuple[str, str], list[int], list[int]]
"""lm-eval's log-likelihood request: ((context text, continuation text), context tokens, continuation tokens)."""


@torch.inference_mode()
def context_loglikelihoods(
    model: PreTrainedModel, context: list[int], continuations: list[list[int]]
) -> list[tuple[float, bool]]:
    """(log-likelihood in nats, whether every token is the greedy one) of each continuation after ``context``.

    ``context``: token ids (at least one); ``continuations``: token ids (at least one each).
    """
    device, keyword = input_device(model), cache_keyword(model)
    output = model(input_ids=torch.tensor([context], device=device), use_cache=True)
    first = F.log_softmax(output.logits[0, -1].float(), dim=-1)  # [vocab]: predicts each continuation's first token
    tails = [c[:-1] for c in continuations]  # the tokens that predict a continuation's later tokens
    width = max(len(t) for t in tails)
    later = None
    if width:
        cache = getattr(output, keyword)
        cache.batch_repeat_interleave(len(tails))
        ids = torch.tensor([t + [0] * (width - len(t)) for t in tails], device=device)
        mask = torch.tensor([[1] * (len(context) + len(t)) + [0] * (width - len(t)) for t in tails], device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=True, **{keyword: cache}).logits
        later = F.log_softmax(logits.float(), dim=-1)  # [continuations, width, vocab]
    results = []
    for i, continuation in enumerate(continuations):
        rows = (
            first.unsqueeze(0) if later is None else torch.cat([first.unsqueeze(0), later[i, : len(continuation) - 1]])
        )
        targets = torch.tensor(continuation, device=rows.device)
        total = float(rows.gather(1, targets.unsqueeze(1)).sum())
        results.append((total, bool((rows.argmax(dim=1) == targets).all())))
    return results


def shared_context_loglikelihoods(
    model: PreTrainedModel, requests: list[Request], progress: bool = True
) -> list[tuple[float, bool]]:
    """:func:`context_loglikelihoods` of every request, in the requests' order, each distinct context run once."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (_, context, _) in enumerate(requests):
        groups.setdefault(tuple(context), []).append(index)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    with tqdm(
        total=len(requests), desc="log-likelihoods, shared contexts", unit="request", disable=not progress
    ) as bar:
        for shared_context, members in groups.items():
            scored = context_loglikelihoods(model, list(shared_context), [requests[i][2] for i in members])
            for index, result in zip(members, scored, strict=True):
                results[index] = result
            bar.update(len(members))
    return results


class SharedContextLM(HFLM):
    """lm-eval's ``HFLM`` whose log-likelihoods run each shared context once (:func:`shared_context_loglikelihoods`)."""

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        fits = [len(r[1]) + len(r[2]) <= self.max_length + 1 for r in requests]
        shared = shared_context_loglikelihoods(
            self.model, [r for r, f in zip(requests, fits, strict=True) if f], progress=not disable_tqdm
        )
        for request, result in zip([r for r, f in zip(requests, fits, strict=True) if f], shared, strict=True):
            self.cache_hook.add_partial("loglikelihood", request[0], result)
        too_long = [r for r, f in zip(requests, fits, strict=True) if not f]
        longer = super()._loglikelihood_tokens(too_long, disable_tqdm, override_bs) if too_long else []
        shared_results, longer_results = iter(shared), iter(longer)
        return [next(shared_results) if f else next(longer_results) for f in fits]
