"""Searched widths: per-layer attention steps and FFN widths chosen by an evolutionary search (EvoPress-style) for
the lowest KL divergence to the dense model on calibration tokens, at the exact parameter budget.

A candidate gives every layer a number of attention steps (query heads per group, or KV groups) and a number of
kept FFN channels; which units go at a given count is the scorer's choice (lowest scores first). The search is a
(1 + λ) evolution: each generation draws ``offspring`` mutations of the current best, each moving one removal
step from one layer to another (an attention step, or ``round_to`` FFN channels) and then restoring the budget
(:meth:`SearchSpace.repaired`: removal >= the budget by less than one FFN step, the budget solver's invariant);
the best child replaces the parent when its fitness is lower.

Fitness: the mean over the search tokens (the first calibration samples) of KL(dense || candidate) between the
next-token distributions. A candidate is evaluated on the dense model itself, with forward hooks that replace
each layer's ``o_proj`` / ``down_proj`` output by the one-shot least-squares refit computed from the kept input
columns only (what the pruned model computes, since a removed head's or channel's values reach the layer's
output through those two linears alone); the refits are cached per layer and width, so a generation mostly
reuses them (after each generation only the best candidate's are kept). No model is built per candidate and the
dense weights are never modified.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from prune.blocks import decoder_layers, dense_linears
from prune.placement import input_device
from prune.pruner import LayerPlan, head_rows
from prune.reconstruct import LinearInputs
from prune.sequential import RefitLinear, refit_linear, replaced_outputs
from prune.statistics import ActivationStatistics


@dataclass(frozen=True)
class Candidate:
    """Per layer: attention steps removed and FFN channels kept."""

    attention_steps: tuple[int, ...]
    ffn_kept: tuple[int, ...]


@dataclass(frozen=True)
class SearchSpace:
    """What a candidate may be: per-layer bounds, the parameter cost of each step, and the budget (parameters to
    remove)."""

    attention_cost: tuple[int, ...]
    """Parameters one attention step removes, per layer."""
    max_attention_steps: tuple[int, ...]
    ffn_cost: int
    """Parameters one FFN channel holds."""
    round_to: int
    full_ffn: tuple[int, ...]
    min_ffn: tuple[int, ...]
    budget: int

    def removed(self, candidate: Candidate) -> int:
        """Parameters the candidate removes."""
        attention = sum(s * c for s, c in zip(candidate.attention_steps, self.attention_cost, strict=True))
        ffn = sum(full - kept for full, kept in zip(self.full_ffn, candidate.ffn_kept, strict=True))
        return attention + ffn * self.ffn_cost

    def narrower(self, kept: int) -> int:
        return (kept - 1) // self.round_to * self.round_to

    def wider(self, layer: int, kept: int) -> int:
        return min(self.full_ffn[layer], kept + self.round_to)

    def repaired(self, candidate: Candidate, rng: random.Random) -> Candidate:
        """The candidate with FFN widths (then attention steps) of random layers changed until it removes at least
        the budget and no FFN can widen by one step without falling short."""
        steps, kept = list(candidate.attention_steps), list(candidate.ffn_kept)
        layers = range(len(kept))

        def removed() -> int:
            return self.removed(Candidate(tuple(steps), tuple(kept)))

        while removed() < self.budget:
            shrinkable = [i for i in layers if self.narrower(kept[i]) >= self.min_ffn[i]]
            if shrinkable:
                i = rng.choice(shrinkable)
                kept[i] = self.narrower(kept[i])
            else:
                i = rng.choice([j for j in layers if steps[j] < self.max_attention_steps[j]])
                steps[i] += 1
        while True:
            surplus = removed() - self.budget
            growable = [
                i
                for i in layers
                if kept[i] < self.full_ffn[i] and (self.wider(i, kept[i]) - kept[i]) * self.ffn_cost <= surplus
            ]
            if not growable:
                return Candidate(tuple(steps), tuple(kept))
            i = rng.choice(growable)
            kept[i] = self.wider(i, kept[i])

    def mutated(self, candidate: Candidate, rng: random.Random) -> Candidate:
        """One removal step moved from one layer to another (an attention step or ``round_to`` FFN channels, with
        equal chance when both can move), then :meth:`repaired`."""
        steps, kept = list(candidate.attention_steps), list(candidate.ffn_kept)
        layers = range(len(kept))
        moves = []
        attention_from = [i for i in layers if steps[i] > 0]
        attention_to = [i for i in layers if steps[i] < self.max_attention_steps[i]]
        if attention_from and attention_to:
            moves.append("attention")
        ffn_from = [i for i in layers if kept[i] < self.full_ffn[i]]
        ffn_to = [i for i in layers if self.narrower(kept[i]) >= self.min_ffn[i]]
        if ffn_from and ffn_to:
            moves.append("ffn")
        if not moves:
            return candidate
        if rng.choice(moves) == "attention":
            steps[rng.choice(attention_from)] -= 1
            steps[rng.choice(attention_to)] += 1
        else:
            i = rng.choice(ffn_from)
            kept[i] = self.wider(i, kept[i])
            j = rng.choice([j for j in layers if self.narrower(kept[j]) >= self.min_ffn[j]])
            kept[j] = self.narrower(kept[j])
        return self.repaired(Candidate(tuple(steps), tuple(kept)), rng)


def kl_divergence(dense_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of KL(dense || other) for log-probabilities [T, V] (float32)."""
    return (dense_log_probs.exp() * (dense_log_probs - log_probs)).sum()


class Fitness:
    """Mean per-token KL(dense || candidate) on ``samples`` (token ids, each [T]) (module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        samples: list[torch.Tensor],
        plan_for: Callable[[int, int, int], LayerPlan],
        statistics: ActivationStatistics,
        head_dim: int,
        damping: float,
    ):
        self.model, self.samples, self.plan_for = model, samples, plan_for
        self.statistics, self.head_dim, self.damping = statistics, head_dim, damping
        self.layers = [dense_linears(layer) for layer in decoder_layers(model)]
        self.refits: dict[tuple[str, int, int], RefitLinear] = {}
        self.dense = [self._log_probs(ids) for ids in samples]

    def _log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(input_ids=ids[None].to(input_device(self.model)), use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def _refit(self, layer: int, linear: nn.Linear, site: str, columns: torch.Tensor) -> RefitLinear:
        return refit_linear(linear, columns, LinearInputs.of(self.statistics, layer, site), self.damping)

    def replacements(self, candidate: Candidate) -> dict[nn.Linear, RefitLinear]:
        """The refit o_proj / down_proj of every layer, as the pruner refits them (a layer that keeps every
        unit too: its refit returns the dense weights)."""
        replaced = {}
        for i, (steps, kept) in enumerate(zip(candidate.attention_steps, candidate.ffn_kept, strict=True)):
            o_proj, down_proj = self.layers[i]["o_proj"], self.layers[i]["down_proj"]
            if ("attention", i, steps) not in self.refits:
                heads = self.plan_for(i, steps, kept).kept_query_heads
                self.refits["attention", i, steps] = self._refit(i, o_proj, "o_in", head_rows(heads, self.head_dim))
            if ("ffn", i, kept) not in self.refits:
                channels = torch.tensor(self.plan_for(i, steps, kept).kept_ffn_channels)
                self.refits["ffn", i, kept] = self._refit(i, down_proj, "down_in", channels)
            replaced[o_proj] = self.refits["attention", i, steps]
            replaced[down_proj] = self.refits["ffn", i, kept]
        return replaced

    def keep_only(self, candidate: Candidate) -> None:
        """Forget every cached refit ``candidate`` does not use (memory: one pruned model's o_proj / down_proj
        weights, plus what one generation adds)."""
        used = {("attention", i, s) for i, s in enumerate(candidate.attention_steps)}
        used |= {("ffn", i, k) for i, k in enumerate(candidate.ffn_kept)}
        self.refits = {key: refit for key, refit in self.refits.items() if key in used}

    def __call__(self, candidate: Candidate) -> float:
        total, tokens = 0.0, 0
        with replaced_outputs(self.replacements(candidate)):
            for ids, dense in zip(self.samples, self.dense, strict=True):
                total += float(kl_divergence(dense, self._log_probs(ids)))
                tokens += len(ids)
        return total / tokens


@dataclass(frozen=True)
class SearchOutcome:
    """The best candidate found and what finding it cost."""

    best: Candidate
    start_kl: float
    """Fitness of the starting candidate (mean KL per token, nats)."""
    best_kl: float
    evaluations: int
    """Candidates evaluated (the start included)."""
    seconds: float


def search_widths(
    space: SearchSpace,
    start: Candidate,
    fitness: Fitness,
    generations: int,
    offspring: int,
) -> SearchOutcome:
    """The (1 + ``offspring``) evolution from ``start`` for ``generations`` generations (module docstring), its
    mutations drawn from a generator seeded with 0."""
    started = time.perf_counter()
    rng = random.Random(0)
    parent = start
    parent_fitness = start_fitness = fitness(parent)
    evaluations = 1
    bar = tqdm(range(generations), desc="allocation search", unit="generation")
    with bar:
        for _ in bar:
            children = {space.mutated(parent, rng) for _ in range(offspring)} - {parent}
            for child in sorted(children, key=lambda c: (c.attention_steps, c.ffn_kept)):
                value = fitness(child)
                evaluations += 1
                if value < parent_fitness:
                    parent, parent_fitness = child, value
            fitness.keep_only(parent)
            bar.set_postfix(kl=f"{parent_fitness:.4f}")
    return SearchOutcome(parent, start_fitness, parent_fitness, evaluations, time.perf_counter() - started)
