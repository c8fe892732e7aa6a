"""Allocation: which units of which layers go, for a parameter budget.

Strategies (:data:`ALLOCATIONS`, by ``allocation.strategy``; docs/METHOD.md §3):

1. Layer sparsities S_i (fraction of the layer's linear weights to remove), then the budget solver:
   - ``uniform``: every layer S, the decoder-level sparsity the target implies;
   - ``activation-density`` (the paper), with N_i the number of weights of layer i
     whose mean activation A exceeds gamma:
         N'_i = sigmoid((N_i - mean N) / std N + alpha / i)          (i = 1..L, std with ddof 0)
         S_i  = S + beta * S * (1 - N'_i * L / sum_j N'_j)
2. Budget solver: per layer, remove round(S_i * units) attention units (KV groups, or query heads from
   every group) and FFN channels for the rest of the layer's share, keeping a multiple of ``round_to``
   channels; then FFN blocks of ``round_to`` channels are removed or given back, one at a time in the
   layer furthest from its share, until the removed parameters reach the target with less than one
   block to spare. Every layer keeps >= 1 KV group, >= 1 query head per group and >= ``min_ffn_channels``.
3. Within a layer the units with the lowest scores go.

- ``global`` (FLAP): every removal step of the model ranked by its standardised score, lowest first.
- ``shortgpt``: whole layers, lowest Block Influence first (no unit scores).
- ``searched``: starts from ``activation-density`` and searches the per-layer attention steps and FFN widths
  for the lowest KL divergence to the dense model on calibration tokens, at the same budget
  (:mod:`prune.search`; ``allocation.search_*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prune.blocks import LINEAR_NAMES, BlockShape, LayerWidths
from prune.pruner import LayerPlan, keep_everything
from prune.scoring import LayerScores
from prune.search import Candidate, Fitness, SearchOutcome, SearchSpace, search_widths
from prune.statistics import HIST_MIN, HIST_WIDTH, ActivationStatistics, Statistic

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from prune.recipe import AllocationSection, PruningSection


class ImpossibleTargetError(ValueError):
    """The requested removal cannot be reached within the per-layer minimums."""


@dataclass
class Allocation:
    """Result of the allocation stage."""

    layer_sparsity: list[float]
    """S_i requested per layer (fraction of the layer's linear weights)."""
    activated_weights: list[float] | None
    """N_i per layer (activation-density only)."""
    threshold: float | None
    """Absolute gamma used for N_i."""
    attention_steps: list[int]
    """Attention units removed per layer (KV groups, or query heads per group)."""
    plans: list[LayerPlan | None]
    """Kept units per layer; ``None`` where the whole layer is removed."""
    removed_parameters: int
    block_influence: list[float] | None = None
    """1 - mean cos(h_in, h_out) per layer (layer removal only)."""
    search: SearchOutcome | None = None
    """What the ``searched`` strategy found and what it cost."""
    rounds: int = 1
    """Rounds of pruning it sums up (``layer_sparsity``: then the fraction each layer lost over all of them)."""


def activation_threshold(statistics: ActivationStatistics, shape: BlockShape, gamma: float, mode: str) -> float:
    """Absolute threshold: gamma itself, or gamma times the mean A over all decoder linear weights."""
    if mode == "absolute":
        return gamma
    total = sum(
        float(statistics.get(i, f"{name}.row_sum").double().sum())
        for i in range(shape.num_layers)
        for name in LINEAR_NAMES
    )
    return gamma * total / sum(shape.linear_weight_count(shape.layers[i]) for i in range(shape.num_layers))


def activated_count(histogram: torch.Tensor, threshold: float) -> float:
    """Number of weights with A above ``threshold``, read from a log10 histogram (linear within the cut bin)."""
    position = (math.log10(threshold) - HIST_MIN) / HIST_WIDTH
    cut = math.floor(position)
    if cut < 0:
        return float(histogram.sum())
    if cut >= len(histogram):
        return 0.0
    return float(histogram[cut + 1 :].sum() + (1 - (position - cut)) * histogram[cut])


def density_sparsities(activated: list[float], sparsity: float, alpha: float, beta: float) -> list[float]:
    """The paper's S_i from per-layer activated-weight counts N_i (layer index i from 1)."""
    n = torch.tensor(activated, dtype=torch.float64)
    std = n.std(unbiased=False)
    z = (n - n.mean()) / std if std > 0 else torch.zeros_like(n)
    index = torch.arange(1, len(activated) + 1, dtype=torch.float64)
    n_prime = torch.sigmoid(z + alpha / index)
    s = sparsity + beta * sparsity * (1 - n_prime * len(activated) / n_prime.sum())
    return s.tolist()


def _attention_unit_cost(shape: BlockShape, layer: int, unit: str, protected: frozenset[int]) -> tuple[int, int]:
    """(parameters per attention step, maximum steps) for one layer."""
    widths = shape.layers[layer]
    if unit == "kv_group":
        cost, steps = shape.kv_group_params(layer), widths.kv_heads - 1
    else:
        cost, steps = widths.kv_heads * shape.query_head_params(), widths.heads_per_group - 1
    return cost, 0 if layer in protected else steps


def ffn_multiple(pruning: PruningSection) -> int:
    """``pruning.round_to``, a recipe's null resolved for the device before pruning (``prune.prepare.for_device``)."""
    if pruning.round_to is None:
        raise ValueError("pruning.round_to: null is resolved for the device first (prune.prepare.for_device)")
    return pruning.round_to


def min_expert_channels(channels: int, round_to: int, min_ffn_channels: int) -> int:
    """Fewest FFN channels a layer (or one expert of ``channels``) keeps: ``min_ffn_channels`` rounded up to
    ``round_to``, at most all of them."""
    return min(channels, math.ceil(min_ffn_channels / round_to) * round_to)


def _min_kept_ffn(shape: BlockShape, round_to: int, min_ffn_channels: int, protected: frozenset[int]) -> list[int]:
    """Fewest FFN channels each layer keeps (a mixture-of-experts layer: as many experts as the router picks per
    token, each with its minimum)."""
    return [
        w.all_ffn_channels
        if i in protected
        else min_expert_channels(w.ffn_channels, round_to, min_ffn_channels)
        * max(1, min(w.experts, shape.experts_per_token))
        for i, w in enumerate(shape.layers)
    ]


def removable_parameters(
    shape: BlockShape,
    attention_unit: str,
    round_to: int,
    min_ffn_channels: int,
    protected: frozenset[int] = frozenset(),
) -> int:
    """Most parameters that can go while every layer keeps its minimum units (``protected`` layers keep all)."""
    ffn_cost = shape.ffn_channel_params()
    min_kept = _min_kept_ffn(shape, round_to, min_ffn_channels, protected)
    total = 0
    for i, widths in enumerate(shape.layers):
        step_cost, max_steps = _attention_unit_cost(shape, i, attention_unit, protected)
        total += step_cost * max_steps + ffn_cost * (widths.all_ffn_channels - min_kept[i])
    return total


def _check_removable(
    shape: BlockShape,
    params_to_remove: int,
    attention_unit: str,
    round_to: int,
    min_ffn_channels: int,
    protected: frozenset[int],
) -> None:
    most = removable_parameters(shape, attention_unit, round_to, min_ffn_channels, protected)
    if params_to_remove > most:
        raise ImpossibleTargetError(
            f"pruning.target: removing {params_to_remove:,} parameters is impossible; at most {most:,} can go "
            f"while every layer keeps 1 KV group, 1 query head per group and {min_ffn_channels} FFN channels"
            + (f" and {len(protected)} layers are protected" if protected else "")
        )


def solve_budget(
    shape: BlockShape,
    layer_sparsity: list[float],
    params_to_remove: int,
    attention_unit: str,
    round_to: int,
    min_ffn_channels: int,
    protected: frozenset[int] = frozenset(),
) -> tuple[list[int], list[int]]:
    """Attention steps and kept FFN channels per layer; removal >= params_to_remove by less than one FFN step.

    Kept FFN channels are a multiple of ``round_to`` (or the layer's full width, untouched); in a
    mixture-of-experts layer they count the channels of every expert (:func:`expert_plan` turns them into
    experts and channels).
    Raises ImpossibleTargetError when the per-layer minimums cannot free that many parameters.
    """
    layers = range(shape.num_layers)
    ffn_cost = shape.ffn_channel_params()
    full = [w.all_ffn_channels for w in shape.layers]
    min_kept = _min_kept_ffn(shape, round_to, min_ffn_channels, protected)
    attn = [_attention_unit_cost(shape, i, attention_unit, protected) for i in layers]
    _check_removable(shape, params_to_remove, attention_unit, round_to, min_ffn_channels, protected)
    share = [layer_sparsity[i] * shape.linear_weight_count(shape.layers[i]) for i in layers]
    units = [w.kv_heads if attention_unit == "kv_group" else w.heads_per_group for w in shape.layers]
    steps = [min(attn[i][1], max(0, round(layer_sparsity[i] * units[i]))) for i in layers]
    kept = []
    for i in layers:
        wanted = full[i] - (share[i] - steps[i] * attn[i][0]) / ffn_cost
        kept.append(
            full[i] if wanted >= full[i] else max(min_kept[i], min(full[i], round(wanted / round_to) * round_to))
        )

    def removed() -> int:
        return sum(steps[i] * attn[i][0] + (full[i] - kept[i]) * ffn_cost for i in layers)

    def surplus(i: int) -> float:
        return steps[i] * attn[i][0] + (full[i] - kept[i]) * ffn_cost - share[i]

    def narrower(i: int) -> int:
        return (kept[i] - 1) // round_to * round_to

    while removed() < params_to_remove:
        shrinkable = [i for i in layers if narrower(i) >= min_kept[i]]
        if shrinkable:
            i = min(shrinkable, key=lambda j: (surplus(j), j))
            kept[i] = narrower(i)
        else:
            i = min((j for j in layers if steps[j] < attn[j][1]), key=lambda j: (surplus(j), j))
            steps[i] += 1
    while True:
        growable = [
            i
            for i in layers
            if kept[i] < full[i]
            and removed() - (min(full[i], kept[i] + round_to) - kept[i]) * ffn_cost >= params_to_remove
        ]
        if not growable:
            break
        i = max(growable, key=lambda j: (surplus(j), -j))
        kept[i] = min(full[i], kept[i] + round_to)
    return steps, kept


def standardized(scores: list[LayerScores], attention_unit: str) -> list[LayerScores]:
    """Scores z-standardised per (layer, unit kind) (docs/METHOD.md §3, FLAP): each layer's attention units
    and its FFN channels get mean 0 and standard deviation 1 (population), so units are ranked across layers
    by how far they fall below the rest of their own layer and kind."""
    attention_name = "kv_groups" if attention_unit == "kv_group" else "query_heads"
    result = []
    for s in scores:
        r = LayerScores(s.query_heads, s.kv_groups, s.ffn_channels)
        for name in (attention_name, "ffn_channels"):
            values = getattr(s, name).double()
            std = values.std(unbiased=False) if len(values) > 1 else values.new_zeros(())
            setattr(r, name, (values - values.mean()) / (std if std > 0 else 1))
        result.append(r)
    return result


def _removal_steps(
    shape: BlockShape,
    layer: int,
    scores: LayerScores,
    attention_unit: str,
    round_to: int,
    min_kept_ffn: int,
    protected: frozenset[int],
) -> list[tuple[float, int, str, int]]:
    """(score, layer, kind, parameters) of each removal step of one layer, in removal order.

    Attention steps remove the lowest-scored KV group, or the lowest-scored query head of every group;
    FFN steps remove the lowest-scored channels down to the next multiple of ``round_to``. A step's
    score is the mean score of its units, made non-decreasing along the layer so that no step is ranked
    before the one it follows.
    """
    widths = shape.layers[layer]
    step_cost, max_steps = _attention_unit_cost(shape, layer, attention_unit, protected)
    if attention_unit == "kv_group":
        attention_scores = sorted(scores.kv_groups.tolist())[:max_steps]
    else:
        per_group = scores.query_heads.view(widths.kv_heads, widths.heads_per_group).sort(dim=1).values
        attention_scores = per_group.mean(0).tolist()[:max_steps]
    attention = [(score, step_cost) for score in attention_scores]
    channel_scores = sorted(scores.ffn_channels.tolist())
    ffn, kept = [], widths.ffn_channels
    while (kept - 1) // round_to * round_to >= min_kept_ffn:
        narrower = (kept - 1) // round_to * round_to
        block = channel_scores[widths.ffn_channels - kept : widths.ffn_channels - narrower]
        ffn.append((sum(block) / len(block), len(block) * shape.ffn_channel_params()))
        kept = narrower
    steps = []
    for kind, sequence in (("attention", attention), ("ffn", ffn)):
        highest = -math.inf
        for score, cost in sequence:
            highest = max(highest, score)
            steps.append((highest, layer, kind, cost))
    return steps


def ranked_budget(
    shape: BlockShape,
    scores: list[LayerScores],
    params_to_remove: int,
    attention_unit: str,
    round_to: int,
    min_ffn_channels: int,
    protected: frozenset[int] = frozenset(),
) -> tuple[list[int], list[int]]:
    """Attention steps and kept FFN channels per layer from one ranking of every removal step of the model.

    Scores are standardised (:func:`standardized`); steps go in increasing score (ties: lower layer
    first) until ``params_to_remove`` is reached, then the FFN steps taken last are given back while
    the removal stays at or above it.
    """
    _check_removable(shape, params_to_remove, attention_unit, round_to, min_ffn_channels, protected)
    min_kept = _min_kept_ffn(shape, round_to, min_ffn_channels, protected)
    z = standardized(scores, attention_unit)
    candidates = [
        c
        for i in range(shape.num_layers)
        for c in _removal_steps(shape, i, z[i], attention_unit, round_to, min_kept[i], protected)
    ]
    order = sorted(range(len(candidates)), key=lambda k: (candidates[k][0], candidates[k][1], k))
    taken, removed = [], 0
    for k in order:
        if removed >= params_to_remove:
            break
        taken.append(k)
        removed += candidates[k][3]
    last_ffn_step = {}
    for k in taken:
        if candidates[k][2] == "ffn":
            last_ffn_step[candidates[k][1]] = k
    for k in sorted(last_ffn_step.values(), key=lambda k: candidates[k][0], reverse=True):
        if removed - candidates[k][3] >= params_to_remove:
            taken.remove(k)
            removed -= candidates[k][3]
    steps = [0] * shape.num_layers
    kept = [w.ffn_channels for w in shape.layers]
    for k in taken:
        _, layer, kind, cost = candidates[k]
        if kind == "attention":
            steps[layer] += 1
        else:
            kept[layer] -= cost // shape.ffn_channel_params()
    return steps, kept


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    """Indices of the ``count`` lowest scores (ties: lower index goes first; deterministic)."""
    order = sorted(range(len(scores)), key=lambda j: (float(scores[j]), j))
    return set(order[:count])


def expert_ranking(scores: torch.Tensor, widths: LayerWidths) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's channels best first ([experts, channels] indices) and the cumulative sums of their scores
    ([experts, channels]: entry f - 1 is the score of the expert's f best channels), from channel scores
    ``scores`` [experts * channels] of a mixture-of-experts layer."""
    ranked = scores.double().view(widths.experts, widths.ffn_channels).sort(dim=1, descending=True, stable=True)
    return ranked.indices, ranked.values.cumsum(dim=1)


def expert_widths(
    cumulative: torch.Tensor, kept: int, experts_per_token: int, round_to: int, min_channels: int
) -> tuple[int, int]:
    """(experts n, channels per expert f) of a mixture-of-experts layer that may keep ``kept`` channels over all
    its experts: of every n >= ``experts_per_token`` and f (a multiple of ``round_to`` and >= ``min_channels``, or
    all) with n * f <= ``kept``, the pair whose n best experts keep the highest score with their f best channels
    each (ties: more channels kept). ``cumulative``: :func:`expert_ranking`'s sums."""
    experts, channels = cumulative.shape
    if kept >= experts * channels:
        return experts, channels
    best: tuple[float, int, int, int] | None = None
    for n in range(max(1, experts_per_token), experts + 1):
        f = channels if kept // n >= channels else kept // n // round_to * round_to
        if f < max(1, min_channels):
            continue
        total = float(cumulative[:, f - 1].sort(descending=True, stable=True).values[:n].sum())
        if best is None or (total, n * f) > (best[0], best[1]):
            best = (total, n * f, n, f)
    if best is None:
        raise ImpossibleTargetError(f"{kept} FFN channels cannot keep {experts_per_token} experts")
    return best[2], best[3]


def expert_plan(
    scores: torch.Tensor, widths: LayerWidths, kept: int, experts_per_token: int, round_to: int, min_channels: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Kept experts and kept channels (``e * channels + c``) of a mixture-of-experts layer that may keep ``kept``
    channels over all its experts, from channel scores ``scores`` [experts * channels]: the (experts, channels
    per expert) of :func:`expert_widths`, each kept expert keeping its best channels (ties: lower indices)."""
    channels = widths.ffn_channels
    indices, cumulative = expert_ranking(scores, widths)
    n, f = expert_widths(cumulative, kept, experts_per_token, round_to, min_channels)
    sums = cumulative[:, f - 1].tolist()
    kept_experts = sorted(sorted(range(widths.experts), key=lambda e: (-sums[e], e))[:n])
    slots = [e * channels + int(c) for e in kept_experts for c in indices[e, :f].tolist()]
    return tuple(kept_experts), tuple(sorted(slots))


def layer_plan(
    shape: BlockShape,
    layer: int,
    scores: LayerScores,
    attention_steps: int,
    attention_unit: str,
    ffn_kept: int,
    round_to: int = 1,
    min_ffn_channels: int = 1,
) -> LayerPlan:
    """Which units of one layer survive, given how many of each kind go (``ffn_kept``: FFN channels over all
    experts of a mixture-of-experts layer, which :func:`expert_plan` shares out by ``round_to`` and
    ``min_ffn_channels`` per expert)."""
    widths = shape.layers[layer]
    g = widths.heads_per_group
    if attention_unit == "kv_group":
        gone_groups = _lowest(scores.kv_groups, attention_steps)
        kept_kv = [j for j in range(widths.kv_heads) if j not in gone_groups]
        kept_q = [h for h in range(widths.query_heads) if h // g in kept_kv]
    else:
        kept_kv = list(range(widths.kv_heads))
        kept_q = []
        for j in kept_kv:
            group = list(range(j * g, (j + 1) * g))
            gone = _lowest(scores.query_heads[group], attention_steps)
            kept_q += [h for k, h in enumerate(group) if k not in gone]
    if widths.experts:
        minimum = min_expert_channels(widths.ffn_channels, round_to, min_ffn_channels)
        experts, slots = expert_plan(scores.ffn_channels, widths, ffn_kept, shape.experts_per_token, round_to, minimum)
        return LayerPlan(tuple(kept_q), tuple(kept_kv), slots, experts)
    gone_channels = _lowest(scores.ffn_channels, widths.ffn_channels - ffn_kept)
    kept_ffn = [c for c in range(widths.ffn_channels) if c not in gone_channels]
    return LayerPlan(tuple(kept_q), tuple(kept_kv), tuple(kept_ffn))


def block_influence(statistics: ActivationStatistics, num_layers: int) -> list[float]:
    """ShortGPT's Block Influence per layer: 1 - mean over calibration tokens of cos(h_in, h_out)."""
    return [1 - float(statistics.get(i, "cos_sum")) / statistics.tokens for i in range(num_layers)]


@dataclass(frozen=True)
class AllocationProblem:
    """What an allocation strategy decides from: the model's shape, the unit scores (None for strategies that
    use none), the parameters to remove, the recipe's sections, the statistics and the protected layers."""

    shape: BlockShape
    scores: list[LayerScores] | None
    params_to_remove: int
    settings: AllocationSection
    pruning: PruningSection
    statistics: ActivationStatistics | None
    protected: frozenset[int]
    model: PreTrainedModel | None = None
    """The dense model (strategies that evaluate candidates)."""
    samples: torch.Tensor | None = None
    """Calibration token ids [N, T] (strategies that evaluate candidates)."""

    @property
    def pruned_layers(self) -> list[int]:
        return [i for i in range(self.shape.num_layers) if i not in self.protected]

    @property
    def sparsity(self) -> float:
        """The decoder-level sparsity S the target implies over the layers that may be pruned."""
        weights = sum(self.shape.linear_weight_count(self.shape.layers[i]) for i in self.pruned_layers)
        return self.params_to_remove / weights


def _plans_from_counts(problem: AllocationProblem, steps: list[int], ffn_kept: list[int]) -> list[LayerPlan]:
    assert problem.scores is not None
    p = problem.pruning
    return [
        layer_plan(
            problem.shape,
            i,
            problem.scores[i],
            steps[i],
            p.attention_unit,
            ffn_kept[i],
            ffn_multiple(p),
            p.min_ffn_channels,
        )
        for i in range(problem.shape.num_layers)
    ]


def _removed(shape: BlockShape, plans: list[LayerPlan | None]) -> int:
    return sum(
        shape.whole_layer_params(w) if p is None else shape.layer_params(w) - shape.layer_params(p.widths)
        for w, p in zip(shape.layers, plans, strict=True)
    )


def _by_layer_sparsity(
    problem: AllocationProblem, layer_sparsity: list[float], activated: list[float] | None, threshold: float | None
) -> Allocation:
    """Per-layer sparsities S_i -> the budget solver -> the lowest-scored units of each layer go."""
    p = problem.pruning
    steps, ffn_kept = solve_budget(
        problem.shape,
        layer_sparsity,
        problem.params_to_remove,
        p.attention_unit,
        ffn_multiple(p),
        p.min_ffn_channels,
        problem.protected,
    )
    kept = _plans_from_counts(problem, steps, ffn_kept)
    if problem.shape.experts_per_token:
        kept = _spend_expert_surplus(problem, steps, ffn_kept, kept)
    plans: list[LayerPlan | None] = list(kept)
    return Allocation(layer_sparsity, activated, threshold, steps, plans, _removed(problem.shape, plans))


def _spend_expert_surplus(
    problem: AllocationProblem, steps: list[int], ffn_kept: list[int], plans: list[LayerPlan]
) -> list[LayerPlan]:
    """Plans whose mixture-of-experts layers keep what the budget leaves over. A layer keeps experts x channels
    per expert <= its share of channels, so the removal can exceed the budget by much more than the solver's
    one FFN step; while it does, the layer whose next larger share (the next one that changes its experts or
    channels and keeps more) adds the fewest parameters gets it, as long as the removal stays >= the budget."""
    shape, p, scores = problem.shape, problem.pruning, problem.scores
    assert scores is not None
    round_to = ffn_multiple(p)
    plans, ffn_kept = list(plans), list(ffn_kept)
    surplus = _removed(shape, list(plans)) - problem.params_to_remove

    rankings = {i: expert_ranking(scores[i].ffn_channels, w)[1] for i, w in enumerate(shape.layers)}

    def larger(i: int) -> tuple[int, int, LayerPlan] | None:
        """(added parameters, share, plan) of layer i's next larger share that keeps more channels, if any."""
        widths, current = shape.layers[i], plans[i]
        minimum = min_expert_channels(widths.ffn_channels, round_to, p.min_ffn_channels)
        share, steps_of_n = ffn_kept[i], range(max(1, shape.experts_per_token), widths.experts + 1)
        while share < widths.all_ffn_channels:  # the next share at which some n gets a wider f
            share = min([widths.all_ffn_channels, *((share // (n * round_to) + 1) * n * round_to for n in steps_of_n)])
            n, f = expert_widths(rankings[i], share, shape.experts_per_token, round_to, minimum)
            if n * f > len(current.kept_ffn_channels):
                plan = layer_plan(shape, i, scores[i], steps[i], p.attention_unit, share, round_to, p.min_ffn_channels)
                return shape.layer_params(plan.widths) - shape.layer_params(current.widths), share, plan
        return None

    options = {i: larger(i) for i in range(shape.num_layers) if i not in problem.protected}
    while True:
        fitting = [(option, i) for i, option in options.items() if option is not None and option[0] <= surplus]
        if not fitting:
            return plans
        (added, share, plan), i = min(fitting, key=lambda item: (item[0][0], item[1]))
        plans[i], ffn_kept[i], surplus = plan, share, surplus - added
        options[i] = larger(i)


def over_rounds(
    shape: BlockShape, first: Allocation, plans: list[LayerPlan | None], attention_unit: str, rounds: int
) -> Allocation:
    """The allocation of pruning in rounds, over the dense ``shape``: the composed ``plans`` of every round, the
    sparsity each layer ended with, and the first round's activation counts and threshold (those of the dense
    model)."""
    steps = []
    for widths, plan in zip(shape.layers, plans, strict=True):
        if plan is None:
            steps.append(0)
        elif attention_unit == "kv_group":
            steps.append(widths.kv_heads - plan.widths.kv_heads)
        else:
            steps.append(widths.heads_per_group - plan.widths.heads_per_group)
    layer_sparsity = achieved_sparsity(shape, plans)
    return Allocation(
        layer_sparsity, first.activated_weights, first.threshold, steps, plans, _removed(shape, plans), rounds=rounds
    )


def achieved_sparsity(shape: BlockShape, plans: list[LayerPlan] | list[LayerPlan | None]) -> list[float]:
    """The fraction of each layer's linear weights the plans remove (1 for a removed layer)."""
    return [
        1.0 if plan is None else 1 - shape.linear_weight_count(plan.widths) / shape.linear_weight_count(w)
        for w, plan in zip(shape.layers, plans, strict=True)
    ]


def uniform_allocation(problem: AllocationProblem) -> Allocation:
    """Every pruned layer gets the sparsity S the target implies."""
    layer_sparsity = [0.0 if i in problem.protected else problem.sparsity for i in range(problem.shape.num_layers)]
    return _by_layer_sparsity(problem, layer_sparsity, None, None)


def density_allocation(problem: AllocationProblem) -> Allocation:
    """The paper's S_i from each layer's count of activated weights (module docstring)."""
    statistics, settings, shape = problem.statistics, problem.settings, problem.shape
    assert statistics is not None
    threshold = activation_threshold(statistics, shape, settings.gamma, settings.gamma_mode)
    activated = [activated_count(statistics.get(i, "log10_hist"), threshold) for i in range(shape.num_layers)]
    pruned = problem.pruned_layers
    sparsities = density_sparsities([activated[i] for i in pruned], problem.sparsity, settings.alpha, settings.beta)
    layer_sparsity = [0.0] * shape.num_layers
    for i, s_i in zip(pruned, sparsities, strict=True):
        layer_sparsity[i] = s_i
    return _by_layer_sparsity(problem, layer_sparsity, activated, threshold)


def global_allocation(problem: AllocationProblem) -> Allocation:
    """FLAP's global ranking of every removal step of the model (:func:`ranked_budget`)."""
    p, shape = problem.pruning, problem.shape
    assert problem.scores is not None
    steps, ffn_kept = ranked_budget(
        shape,
        problem.scores,
        problem.params_to_remove,
        p.attention_unit,
        ffn_multiple(p),
        p.min_ffn_channels,
        problem.protected,
    )
    kept = _plans_from_counts(problem, steps, ffn_kept)
    layer_sparsity = achieved_sparsity(shape, kept)
    plans: list[LayerPlan | None] = list(kept)
    return Allocation(layer_sparsity, None, None, steps, plans, _removed(shape, plans))


def searched_allocation(problem: AllocationProblem) -> Allocation:
    """The activation-density allocation, then the search of :mod:`prune.search` from it."""
    shape, p, settings, scores = problem.shape, problem.pruning, problem.settings, problem.scores
    assert scores is not None and problem.model is not None and problem.samples is not None
    assert problem.statistics is not None
    start = density_allocation(problem)
    layers = range(shape.num_layers)
    attention = [_attention_unit_cost(shape, i, p.attention_unit, problem.protected) for i in layers]
    space = SearchSpace(
        attention_cost=tuple(cost for cost, _ in attention),
        max_attention_steps=tuple(steps for _, steps in attention),
        ffn_cost=shape.ffn_channel_params(),
        round_to=ffn_multiple(p),
        full_ffn=tuple(w.ffn_channels for w in shape.layers),
        min_ffn=tuple(_min_kept_ffn(shape, ffn_multiple(p), p.min_ffn_channels, problem.protected)),
        budget=problem.params_to_remove,
    )

    def plan_for(layer: int, steps: int, kept: int) -> LayerPlan:
        return layer_plan(shape, layer, scores[layer], steps, p.attention_unit, kept)

    first = Candidate(tuple(start.attention_steps), tuple(plan.widths.ffn_channels for plan in start.plans if plan))
    samples = list(problem.samples[: settings.search_samples])
    fitness = Fitness(problem.model, samples, plan_for, problem.statistics, shape.head_dim, p.damping)
    outcome = search_widths(space, first, fitness, settings.search_generations, settings.search_offspring)
    best = outcome.best
    kept = [plan_for(i, best.attention_steps[i], best.ffn_kept[i]) for i in layers]
    layer_sparsity = achieved_sparsity(shape, kept)
    plans: list[LayerPlan | None] = list(kept)
    return Allocation(
        layer_sparsity,
        start.activated_weights,
        start.threshold,
        list(best.attention_steps),
        plans,
        _removed(shape, plans),
        search=outcome,
    )


def layer_removal(problem: AllocationProblem) -> Allocation:
    """ShortGPT: remove whole layers, lowest Block Influence first, until the target is reached."""
    shape, statistics = problem.shape, problem.statistics
    assert statistics is not None
    influence = block_influence(statistics, shape.num_layers)
    removed_layers: set[int] = set()
    removed = 0
    for i in sorted(problem.pruned_layers, key=lambda j: (influence[j], j)):
        if removed >= problem.params_to_remove:
            break
        removed_layers.add(i)
        removed += shape.whole_layer_params(shape.layers[i])
    if removed < problem.params_to_remove or len(removed_layers) == shape.num_layers:
        raise ImpossibleTargetError(
            f"pruning.target: removing {problem.params_to_remove:,} parameters would remove every layer"
        )
    plans = [None if i in removed_layers else plan for i, plan in enumerate(keep_everything(shape))]
    layer_sparsity = [float(i in removed_layers) for i in range(shape.num_layers)]
    return Allocation(layer_sparsity, None, None, [0] * shape.num_layers, plans, removed, influence)


def removable_units(shape: BlockShape, pruning: PruningSection, protected: frozenset[int]) -> int:
    """Most parameters unit removal can take (every layer keeps its minimum units)."""
    return removable_parameters(
        shape, pruning.attention_unit, ffn_multiple(pruning), pruning.min_ffn_channels, protected
    )


def removable_layers(shape: BlockShape, pruning: PruningSection, protected: frozenset[int]) -> int:
    """Most parameters layer removal can take: every unprotected layer but the largest."""
    sizes = sorted(shape.whole_layer_params(w) for i, w in enumerate(shape.layers) if i not in protected)
    return sum(sizes[:-1]) if len(sizes) == shape.num_layers else sum(sizes)


@dataclass(frozen=True)
class AllocationStrategy:
    """An allocation strategy: how the parameters to remove are spread over layers and units."""

    allocate: Callable[[AllocationProblem], Allocation]
    needs: frozenset[Statistic]
    """What the statistics pass must collect for it (beyond what the scorer needs)."""
    uses_scores: bool
    """Whether it chooses units by the scorer's scores (layer removal does not score units)."""
    most_removable: Callable[[BlockShape, PruningSection, frozenset[int]], int]
    """The most parameters it can remove from a model of that shape."""
    evaluates: bool = False
    """Whether it runs the dense model on calibration samples (``AllocationProblem.model`` / ``samples``)."""
    prunes_experts: bool = True
    """Whether it allocates mixture-of-experts layers (experts and their channels)."""


ALLOCATIONS: dict[str, AllocationStrategy] = {
    "uniform": AllocationStrategy(uniform_allocation, frozenset(), True, removable_units),
    "activation-density": AllocationStrategy(
        density_allocation, frozenset({Statistic.GRADIENT_PRODUCTS}), True, removable_units
    ),
    "global": AllocationStrategy(global_allocation, frozenset(), True, removable_units, prunes_experts=False),
    "shortgpt": AllocationStrategy(layer_removal, frozenset({Statistic.LAYER_COSINES}), False, removable_layers),
    "searched": AllocationStrategy(
        searched_allocation,
        frozenset({Statistic.GRADIENT_PRODUCTS, Statistic.INPUT_SUMS, Statistic.SECOND_MOMENTS}),
        True,
        removable_units,
        evaluates=True,
        prunes_experts=False,
    ),
}
"""Allocation strategies by recipe name (``allocation.strategy``)."""


def allocate(
    shape: BlockShape,
    scores: list[LayerScores] | None,
    params_to_remove: int,
    settings: AllocationSection,
    pruning: PruningSection,
    statistics: ActivationStatistics | None = None,
    protected: frozenset[int] = frozenset(),
    model: PreTrainedModel | None = None,
    samples: torch.Tensor | None = None,
) -> Allocation:
    """Run the allocation stage with the strategy ``settings.strategy``; ``protected`` layers stay whole.
    ``model`` (dense) and ``samples`` (calibration token ids [N, T]): for a strategy that evaluates candidates."""
    problem = AllocationProblem(
        shape, scores, params_to_remove, settings, pruning, statistics, protected, model, samples
    )
    return ALLOCATIONS[settings.strategy].allocate(problem)
