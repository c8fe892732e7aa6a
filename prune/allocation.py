"""Per-layer pruning ratios and the budget solver that turns them into unit counts.

1. Layer sparsities S_i (fraction of the layer's linear weights to remove):
   - ``uniform``: every layer S, the decoder-level sparsity the target implies;
   - ``activation-density`` (the paper, METHOD.md section 1), with N_i the number of weights of layer i
     whose mean activation A exceeds gamma:
         N'_i = sigmoid((N_i - mean N) / std N + alpha / i)          (i = 1..L, std with ddof 0)
         S_i  = S + beta * S * (1 - N'_i * L / sum_j N'_j)
2. Budget solver: per layer, remove round(S_i * units) attention units (KV groups, or query heads from
   every group) and FFN channels for the rest of the layer's share, keeping a multiple of ``round_to``
   channels; then FFN blocks of ``round_to`` channels are removed or given back, one at a time in the
   layer furthest from its share, until the removed parameters reach the target with less than one
   block to spare. Every layer keeps >= 1 KV group, >= 1 query head per group and >= ``min_ffn_channels``.
3. Within a layer the units with the lowest scores go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prune.blocks import LINEAR_NAMES, BlockShape
from prune.pruner import LayerPlan
from prune.scoring import LayerScores
from prune.statistics import HIST_MIN, HIST_WIDTH, ActivationStatistics


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
    plans: list[LayerPlan]
    removed_parameters: int


def activation_threshold(statistics: ActivationStatistics, shape: BlockShape, gamma: float, mode: str) -> float:
    """Absolute threshold: gamma itself, or gamma times the mean A over all decoder linear weights."""
    if mode == "absolute":
        return gamma
    total = sum(float(statistics.get(i, f"{name}.row_sum").double().sum()) for i in range(shape.num_layers) for name in LINEAR_NAMES)
    return gamma * total / sum(shape.linear_weight_count(shape.layers[i]) for i in range(shape.num_layers))


def activated_count(histogram: torch.Tensor, threshold: float) -> float:
    """Number of weights with A above ``threshold``, read from a log10 histogram (linear within the cut bin)."""
    position = (math.log10(threshold) - HIST_MIN) / HIST_WIDTH
    cut = math.floor(position)
    if cut < 0:
        return float(histogram.sum())
    if cut >= len(histogram):
        return 0.0
    return float(histogram[cut + 1:].sum() + (1 - (position - cut)) * histogram[cut])


def density_sparsities(activated: list[float], sparsity: float, alpha: float, beta: float) -> list[float]:
    """The paper's S_i from per-layer activated-weight counts N_i (layer index i from 1)."""
    n = torch.tensor(activated, dtype=torch.float64)
    std = n.std(unbiased=False)
    z = (n - n.mean()) / std if std > 0 else torch.zeros_like(n)
    index = torch.arange(1, len(activated) + 1, dtype=torch.float64)
    n_prime = torch.sigmoid(z + alpha / index)
    s = sparsity + beta * sparsity * (1 - n_prime * len(activated) / n_prime.sum())
    return s.tolist()


def _attention_unit_cost(shape: BlockShape, layer: int, unit: str) -> tuple[int, int]:
    """(parameters per attention step, maximum steps) for one layer."""
    widths = shape.layers[layer]
    if unit == "kv_group":
        return shape.kv_group_params(layer), widths.kv_heads - 1
    return widths.kv_heads * shape.query_head_params(), widths.heads_per_group - 1


def _min_kept_ffn(shape: BlockShape, round_to: int, min_ffn_channels: int) -> list[int]:
    return [min(w.ffn_channels, math.ceil(min_ffn_channels / round_to) * round_to) for w in shape.layers]


def removable_parameters(shape: BlockShape, attention_unit: str, round_to: int, min_ffn_channels: int) -> int:
    """Most parameters that can go while every layer keeps its minimum units."""
    ffn_cost = shape.ffn_channel_params()
    min_kept = _min_kept_ffn(shape, round_to, min_ffn_channels)
    total = 0
    for i, widths in enumerate(shape.layers):
        step_cost, max_steps = _attention_unit_cost(shape, i, attention_unit)
        total += step_cost * max_steps + ffn_cost * (widths.ffn_channels - min_kept[i])
    return total


def solve_budget(shape: BlockShape, layer_sparsity: list[float], params_to_remove: int, attention_unit: str,
                 round_to: int, min_ffn_channels: int) -> tuple[list[int], list[int]]:
    """Attention steps and kept FFN channels per layer; removal >= params_to_remove by less than one FFN step.

    Kept FFN channels are a multiple of ``round_to`` (or the layer's full width, untouched).
    Raises ImpossibleTargetError when the per-layer minimums cannot free that many parameters.
    """
    layers = range(shape.num_layers)
    ffn_cost = shape.ffn_channel_params()
    full = [w.ffn_channels for w in shape.layers]
    min_kept = _min_kept_ffn(shape, round_to, min_ffn_channels)
    attn = [_attention_unit_cost(shape, i, attention_unit) for i in layers]
    most = removable_parameters(shape, attention_unit, round_to, min_ffn_channels)
    if params_to_remove > most:
        raise ImpossibleTargetError(
            f"pruning.target: removing {params_to_remove:,} parameters is impossible; at most {most:,} can go "
            f"while every layer keeps 1 KV group, 1 query head per group and {min_ffn_channels} FFN channels"
        )
    share = [layer_sparsity[i] * shape.linear_weight_count(shape.layers[i]) for i in layers]
    units = [w.kv_heads if attention_unit == "kv_group" else w.heads_per_group for w in shape.layers]
    steps = [min(attn[i][1], max(0, round(layer_sparsity[i] * units[i]))) for i in layers]
    kept = []
    for i in layers:
        wanted = full[i] - (share[i] - steps[i] * attn[i][0]) / ffn_cost
        kept.append(full[i] if wanted >= full[i] else max(min_kept[i], min(full[i], round(wanted / round_to) * round_to)))

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
        growable = [i for i in layers if kept[i] < full[i]
                    and removed() - (min(full[i], kept[i] + round_to) - kept[i]) * ffn_cost >= params_to_remove]
        if not growable:
            break
        i = max(growable, key=lambda j: (surplus(j), -j))
        kept[i] = min(full[i], kept[i] + round_to)
    return steps, kept


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    """Indices of the ``count`` lowest scores (ties: lower index goes first; deterministic)."""
    order = sorted(range(len(scores)), key=lambda j: (float(scores[j]), j))
    return set(order[:count])


def layer_plan(shape: BlockShape, layer: int, scores: LayerScores, attention_steps: int, attention_unit: str,
               ffn_kept: int) -> LayerPlan:
    """Which units of one layer survive, given how many of each kind go."""
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
    gone_channels = _lowest(scores.ffn_channels, widths.ffn_channels - ffn_kept)
    kept_ffn = [c for c in range(widths.ffn_channels) if c not in gone_channels]
    return LayerPlan(tuple(kept_q), tuple(kept_kv), tuple(kept_ffn))


def allocate(shape: BlockShape, scores: list[LayerScores], params_to_remove: int, strategy: str,
             attention_unit: str, round_to: int, min_ffn_channels: int, statistics: ActivationStatistics | None = None,
             alpha: float = 2.0, beta: float = 0.2, gamma: float = 1.0, gamma_mode: str = "relative") -> Allocation:
    """Run the allocation stage: layer sparsities, budget solver, unit choice."""
    linear_weights = sum(shape.linear_weight_count(shape.layers[i]) for i in range(shape.num_layers))
    sparsity = params_to_remove / linear_weights
    activated, threshold = None, None
    if strategy == "uniform":
        layer_sparsity = [sparsity] * shape.num_layers
    elif strategy == "activation-density":
        if statistics is None:
            raise ValueError("activation-density allocation needs activation statistics")
        threshold = activation_threshold(statistics, shape, gamma, gamma_mode)
        activated = [activated_count(statistics.get(i, "log10_hist"), threshold) for i in range(shape.num_layers)]
        layer_sparsity = density_sparsities(activated, sparsity, alpha, beta)
    else:
        raise ValueError(f"unknown allocation strategy {strategy!r}")
    steps, ffn_kept = solve_budget(shape, layer_sparsity, params_to_remove, attention_unit, round_to, min_ffn_channels)
    plans = [layer_plan(shape, i, scores[i], steps[i], attention_unit, ffn_kept[i]) for i in range(shape.num_layers)]
    removed = sum(shape.layer_params(w) - shape.layer_params(p.widths) for w, p in zip(shape.layers, plans))
    return Allocation(layer_sparsity, activated, threshold, steps, plans, removed)
