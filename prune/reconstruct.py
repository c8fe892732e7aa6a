"""Recovering a pruned layer's output without training, from calibration statistics.

Removing query heads or FFN channels removes input columns of ``o_proj`` / ``down_proj``. For such
a linear ``W`` [out, F] with kept input columns ``K`` and removed ``R``, and the dense model's
calibration inputs ``X`` [F, tokens]:

- ``bias`` (FLAP's bias compensation): keep ``W[:, K]`` and add ``W[:, R] · mean(X_R)`` as a bias, so
  the output keeps its mean;
- ``lstsq``: refit the kept columns and a bias so that the output matches the dense one in the least
  squares sense over the calibration tokens. With ``x̃ = [x; 1]`` and ``S = E[x̃ x̃ᵀ]`` (from the
  accumulated ``X Xᵀ``, ``Σ x`` and the token count):

      [W'_K, b'] = [W, b] · S[:, K̃] · (S[K̃, K̃] + λ·mean(diag S[K, K])·I)⁻¹      K̃ = K ∪ {bias}

  the structured, closed-form counterpart of what SparseGPT/OBS do for single weights. ``λ`` is the
  relative damping (``pruning.damping``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from prune.pruner import LayerPlan, head_rows
from prune.statistics import ActivationStatistics, Statistic

RECONSTRUCTED_LINEARS = {"self_attn.o_proj": "o_in", "mlp.down_proj": "down_in"}
GROUP_COLUMNS = 512
"""Columns of S⁻¹ solved at a time by :func:`removal_errors`."""


def compensated_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, input_mean: torch.Tensor
) -> torch.Tensor:
    """Bias [out] that restores the mean output after dropping the input columns not in ``kept``."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept] = False
    restored = weight.double()[:, removed] @ input_mean.double()[removed]
    return restored if bias is None else bias.double() + restored


def second_moment(
    xxt: torch.Tensor, x_sum: torch.Tensor, tokens: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """S = E[x̃ x̃ᵀ] [F+1, F+1] (float64) of the bias-augmented input x̃ = [x; 1] from Σ x xᵀ, Σ x and the token count."""
    features = len(x_sum)
    second = torch.empty(features + 1, features + 1, dtype=torch.float64, device=device)
    second[:features, :features].copy_(xxt)  # converted while copied: no float64 temporary of Σ x xᵀ
    second[:features, features] = second[features, :features] = x_sum.to(device, torch.float64)
    second[features, features] = tokens
    return second.div_(tokens)


def damp(second: torch.Tensor, features: torch.Tensor, damping: float) -> torch.Tensor:
    """``second`` itself, with ``damping`` times the mean of its diagonal at ``features`` added there (in place:
    these matrices are [F+1, F+1] float64, 1 GB for a 7B model's FFN)."""
    second[features, features] += damping * float(second[features, features].mean())
    return second


def least_squares_refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    xxt: torch.Tensor,
    x_sum: torch.Tensor,
    tokens: int,
    damping: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [out, |K|] and bias [out] (float64, on ``weight``'s device) of the refit in the module docstring.

    ``xxt`` [F, F] = Σ x xᵀ and ``x_sum`` [F] = Σ x over ``tokens`` calibration tokens of the dense input.
    """
    features, device = weight.shape[1], weight.device
    second = second_moment(xxt, x_sum, tokens, device)
    columns = torch.cat([kept.to(device), torch.tensor([features], device=device)])
    old_bias = (
        bias.to(device, torch.float64)
        if bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64, device=device)
    )
    full = torch.cat([weight.double(), old_bias[:, None]], 1)
    target = full @ second[:, columns]  # [out, |K|+1]; the [F+1, |K|+1] gather is freed before the gram's
    del full
    gram = damp(second[columns[:, None], columns[None, :]], torch.arange(len(kept), device=device), damping)
    del second
    solution = torch.linalg.solve(gram, target.T).T
    return solution[:, :-1], solution[:, -1]


def removal_errors(weight: torch.Tensor, second: torch.Tensor, groups: torch.Tensor, damping: float) -> torch.Tensor:
    """Output error [n_groups] of removing each group of input columns alone, the others refit (float64, CPU).

    ``weight`` [out, F]; ``second`` [F+1, F+1] from :func:`second_moment`, on the device the solve runs on (damped
    and factorised in place: pass it without keeping a reference, so that one [F+1, F+1] matrix exists at a
    time); ``groups`` [n_groups, size] column indices. With S the damped second moment (damping on the F input
    features), the least-squares refit of the other columns and the bias leaves the mean squared output error per
    token (Optimal Brain Surgeon, for a group R of columns)

        E_R = trace(W_R (S⁻¹[R, R])⁻¹ W_Rᵀ)

    S (positive definite: the second moment of [x; 1] with the features damped) = L Lᵀ, so S⁻¹[C, C] =
    (L⁻¹ e_C)ᵀ (L⁻¹ e_C) for GROUP_COLUMNS columns C at a time. L⁻¹ is lower triangular, so L⁻¹ e_C is zero above
    row m = min(C) and its other rows solve the trailing block L[m:, m:]: about F³/3 multiply-adds for all
    chunks, on top of the factorisation's F³/3 (an LU solve of every column costs 2F³ more), and the whole
    inverse never exists.
    """
    features, device = weight.shape[1], second.device
    damped = damp(second, torch.arange(features, device=device), damping)
    del second
    lower = torch.linalg.cholesky(damped)
    del damped
    groups = groups.to(device)
    w_groups = weight.detach().to(device, torch.float64)[:, groups].permute(1, 2, 0)  # [n_groups, size, out]
    n_groups, size = groups.shape
    per_chunk = max(1, GROUP_COLUMNS // size)
    blocks = torch.empty(n_groups, size, size, dtype=torch.float64, device=device)  # S⁻¹[R, R] per group
    for first in range(0, n_groups, per_chunk):
        chunk = groups[first : first + per_chunk]  # [count, size]
        count, columns = len(chunk), chunk.flatten()
        top = int(columns.min())
        unit = torch.zeros(features + 1 - top, len(columns), dtype=torch.float64, device=device)
        unit[columns - top, torch.arange(len(columns), device=device)] = 1
        half = torch.linalg.solve_triangular(lower[top:, top:], unit, upper=False)  # rows top.. of L⁻¹ e_C
        solved = half.T @ half  # S⁻¹[columns, columns]
        blocks[first : first + count] = solved.view(count, size, count, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return (w_groups * torch.linalg.solve(blocks, w_groups)).sum(dim=(1, 2)).cpu()


@dataclass(frozen=True)
class LinearInputs:
    """Calibration statistics of one linear's dense input: Σ x [F], Σ x xᵀ [F, F] (None if not collected), tokens."""

    x_sum: torch.Tensor
    xxt: torch.Tensor | None
    tokens: int

    @classmethod
    def of(cls, statistics: ActivationStatistics, layer: int, site: str) -> LinearInputs:
        """The statistics pass's sums of input site ``site`` (``o_in``, ``down_in``, ...) of ``layer``."""
        return cls(statistics.get(layer, f"{site}.x_sum"), statistics.find(layer, f"{site}.xxt"), statistics.tokens)


def bias_refit(
    weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, inputs: LinearInputs, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's bias compensation: the kept columns [out, |K|] unchanged, and the restoring bias [out]."""
    weight = weight.detach().cpu()
    return weight[:, kept], compensated_bias(weight, bias, kept, inputs.x_sum.double() / inputs.tokens)


def lstsq_refit(
    weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, inputs: LinearInputs, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares refit of the kept columns and a bias (module docstring)."""
    if inputs.xxt is None:
        raise ValueError("the lstsq refit needs the input second moments (Σ x xᵀ) from the statistics pass")
    return least_squares_refit(weight.detach(), bias, kept, inputs.xxt, inputs.x_sum, inputs.tokens, damping)


@dataclass(frozen=True)
class Reconstruction:
    """How the outputs of o_proj / down_proj are recovered after their input columns were removed.

    ``refit(weight [out, F], bias [out] | None, kept [|K|] column indices, inputs, damping)`` returns the
    new weight [out, |K|] and bias [out]; None keeps the sliced weight and adds no bias.
    """

    refit: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None
    needs: frozenset[Statistic]
    sequential: bool = False
    """Refit layer by layer on the calibration inputs of the model as already pruned (:mod:`prune.sequential`,
    which needs the calibration samples, not statistics) instead of by ``refit``."""

    @property
    def adds_biases(self) -> bool:
        """o_proj and down_proj get a bias (the parameters it adds count against the target)."""
        return self.refit is not None or self.sequential


RECONSTRUCTIONS: dict[str, Reconstruction] = {
    "none": Reconstruction(None, frozenset()),
    "bias": Reconstruction(bias_refit, frozenset({Statistic.INPUT_SUMS})),
    "lstsq": Reconstruction(lstsq_refit, frozenset({Statistic.INPUT_SUMS, Statistic.SECOND_MOMENTS})),
    "lstsq-sequential": Reconstruction(None, frozenset(), sequential=True),
}
"""Reconstructions by recipe name (``pruning.reconstruct``)."""


def reconstructed_layer(
    index: int,
    dense_layer: nn.Module,
    plan: LayerPlan,
    head_dim: int,
    statistics: ActivationStatistics,
    method: str,
    damping: float,
) -> dict[str, torch.Tensor]:
    """The refit o_proj / down_proj weights and biases of one pruned layer (state-dict entries relative to the
    layer, in the dense weights' dtype), by the reconstruction ``method``; nothing for ``none``.

    ``index``: the layer's index in ``dense_layer``'s model, whose statistics are used.
    """
    refit = RECONSTRUCTIONS[method].refit
    if refit is None:
        return {}
    kept_inputs = {
        "self_attn.o_proj": head_rows(plan.kept_query_heads, head_dim),
        "mlp.down_proj": torch.tensor(plan.kept_ffn_channels),
    }
    tensors = {}
    for name, site in RECONSTRUCTED_LINEARS.items():
        source = cast(nn.Linear, dense_layer.get_submodule(name))
        inputs = LinearInputs.of(statistics, index, site)
        weight, bias = refit(source.weight, _bias(source), kept_inputs[name], inputs, damping)
        device, dtype = source.weight.device, source.weight.dtype
        tensors[f"{name}.weight"] = weight.to(device, dtype).contiguous()
        tensors[f"{name}.bias"] = bias.to(device, dtype).contiguous()
    return tensors


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().cpu()
