"""Recovering a pruned layer's output without training, from calibration statistics.

Removing query heads or FFN channels removes input columns of ``o_proj`` / ``down_proj``. For such
a linear ``W`` [out, F] with kept input columns ``K`` and removed ``R``, and the dense model's
calibration inputs ``X`` [F, tokens]:

- ``bias`` (FLAP's bias compensation): keep ``W[:, K]`` and add ``W[:, R] · mean(X_R)`` as a bias, so
  the output keeps its mean;
- ``lstsq``: refit the kept columns and a bias so that the output matches the dense one in the least
  squares sense over the calibration tokens. With ``x̃ = [x; 1]`` and ``S = E[x̃ x̃ᵀ]`` (from the
  accumulated ``X Xᵀ``, ``Σ x`` and the token count):

      [W'_K, b'] = [W, b] · S_λ[:, K̃] · S_λ[K̃, K̃]⁻¹      K̃ = K ∪ {bias},  S_λ = S + λ·mean(diag S[K, K])·I_K

  (``I_K``: ones on the kept features' diagonal), the structured, closed-form counterpart of what SparseGPT/OBS
  do for single weights. ``λ`` is the relative damping (``pruning.damping``): a ridge on the change of the kept
  weights, ``W'_K = W_K + W_R S[R, K̃] S_λ[K̃, K̃]⁻¹`` restricted to K, so that as ``λ`` grows the refit tends to
  ``bias``'s (the kept weights as they are and the removed columns' mean output as a bias), never to zero
  weights; it is the refit the ``obs`` score assumes (whose ridge is scaled by the mean diagonal over every input,
  not the kept ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy
import scipy.linalg
import scipy.linalg.lapack
import torch
from torch import nn

from prune.pruner import LayerPlan, head_rows
from prune.statistics import ActivationStatistics, Statistic

RECONSTRUCTED_LINEARS = {"self_attn.o_proj": "o_in", "mlp.down_proj": "down_in"}
GROUP_COLUMNS = 512
"""Columns of L⁻¹ read at a time by :func:`removal_errors`."""


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


ROW_BLOCK = 256
"""Rows of Σ x xᵀ converted to float64 at a time by :func:`least_squares_refit`."""


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
    S_λ[:, K̃] and S_λ[K̃, K̃] are built from ``xxt`` ``ROW_BLOCK`` rows at a time and S_λ[K̃, K̃] is
    factorised in place (:func:`cholesky_in_place`), so the float64 matrices that exist at once are S_λ[K̃, K̃]
    and [W, b] S_λ[:, K̃] [out, |K|+1]: no [F+1, F+1] one.
    """
    weight, features, device = weight.detach(), weight.shape[1], weight.device
    old_bias = (
        bias.to(device, torch.float64)
        if bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64, device=device)
    )
    sums, kept_here = x_sum.to(device, torch.float64), kept.to(device)
    bias_row = torch.cat([sums[kept_here], sums.new_tensor([tokens])])  # S[F, K̃] · tokens: [Σ x[K], tokens]
    kept_rows = kept.to(xxt.device)
    target = old_bias[:, None] * bias_row  # [W, b] S[:, K̃] · tokens [out, |K|+1], the bias row's part first
    for first in range(0, features, ROW_BLOCK):
        end = min(first + ROW_BLOCK, features)
        rows = xxt[first:end, kept_rows].to(device, torch.float64)  # S[first:end, K] · tokens
        block = weight[:, first:end].double()
        target[:, :-1].addmm_(block, rows)  # in place: no [out, |K|] product beside it
        target[:, -1].addmv_(block, sums[first:end])
    target.div_(tokens)
    ridge = damping * float(xxt.diagonal()[kept_rows].double().mean()) / tokens  # λ · mean(diag S[K, K])
    target[:, :-1].add_(weight[:, kept_here].double(), alpha=ridge)  # [W, b] S_λ[:, K̃]: S_λ[R, K] = S[R, K]
    try:
        lower = cholesky_in_place(_damped_kept_gram(xxt, kept_rows, bias_row, tokens, ridge))
        solution = cholesky_solve(target.T, lower).T
    except torch.linalg.LinAlgError:  # not positive definite: no damping, and fewer independent inputs than columns
        solution = torch.linalg.solve(_damped_kept_gram(xxt, kept_rows, bias_row, tokens, ridge), target.T).T
    return solution[:, :-1], solution[:, -1]


def _damped_kept_gram(
    xxt: torch.Tensor, kept: torch.Tensor, bias_row: torch.Tensor, tokens: int, ridge: float
) -> torch.Tensor:
    """S_λ[K̃, K̃] [|K|+1, |K|+1] (float64, on ``bias_row``'s device): S[K̃, K̃] from Σ x xᵀ [F, F] at the kept columns
    ``kept`` (on ``xxt``'s device), ``ROW_BLOCK`` rows converted at a time, and the bias row [Σ x[K], tokens], with
    ``ridge`` added to the kept features' diagonal (not the bias's)."""
    gram = torch.empty(len(kept) + 1, len(kept) + 1, dtype=torch.float64, device=bias_row.device)
    for first in range(0, len(kept), ROW_BLOCK):
        block = kept[first : first + ROW_BLOCK]
        gram[first : first + len(block), :-1].copy_(xxt[block[:, None], kept[None, :]])  # converted while copied
    gram[-1, :] = gram[:, -1] = bias_row
    gram.div_(tokens).diagonal()[:-1] += ridge
    return gram


def cholesky_solve(right: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """X [n, k] with L Lᵀ X = ``right`` [n, k] for the lower Cholesky factor ``lower`` [n, n] of
    :func:`cholesky_in_place` (float64). On the CPU through SciPy, which solves with L where it lies (torch copies
    it first); elsewhere ``torch.cholesky_solve``."""
    if lower.device.type != "cpu":
        return torch.cholesky_solve(right, lower)
    return torch.from_numpy(scipy.linalg.cho_solve((lower.numpy(), True), right.numpy(), check_finite=False))


def cholesky_in_place(matrix: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor L [n, n] of a symmetric positive definite float64 ``matrix`` [n, n].

    On the CPU it is computed over ``matrix`` itself (LAPACK's potrf through SciPy, on the same memory read
    column-major, which for a symmetric matrix is the same matrix; the upper triangle is zeroed): no second n x n
    matrix (642 MiB at an FFN width of 8,960); on other devices ``torch.linalg.cholesky`` returns a new
    one. The returned tensor is column-major, as LAPACK and ``torch.linalg`` want it; ``matrix`` must not be used
    after this call. ``torch.linalg.LinAlgError`` when ``matrix`` is not positive definite.
    """
    if matrix.device.type != "cpu":
        return torch.linalg.cholesky(matrix)
    column_major = matrix.numpy().T  # F-contiguous: potrf writes into it instead of into a copy
    try:
        factor = scipy.linalg.cholesky(column_major, lower=True, overwrite_a=True, check_finite=False)
    except numpy.linalg.LinAlgError as error:  # the same error type as torch.linalg.cholesky's
        raise torch.linalg.LinAlgError(str(error)) from None
    return torch.from_numpy(factor)


def lower_inverse_in_place(lower: torch.Tensor) -> torch.Tensor:
    """L⁻¹ [n, n] (lower triangular, float64) of the factor ``lower`` of :func:`cholesky_in_place`.

    On the CPU it is computed over ``lower`` itself (LAPACK's trtri through SciPy); on other devices it is solved
    into an identity matrix (:func:`lower_inverse_by_solve`), a second n x n matrix. ``lower`` must not be used
    after this call.
    """
    if lower.device.type != "cpu":
        return lower_inverse_by_solve(lower)
    inverse, info = scipy.linalg.lapack.dtrtri(lower.numpy(), lower=1, overwrite_c=1)
    if info != 0:
        raise torch.linalg.LinAlgError(f"the triangular factor is singular (LAPACK trtri info {info})")
    return torch.from_numpy(inverse)


def lower_inverse_by_solve(lower: torch.Tensor) -> torch.Tensor:
    """L⁻¹ of a lower triangular [n, n] matrix by a triangular solve written into an identity matrix (in place)."""
    identity = torch.eye(len(lower), dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False, out=identity)


def removal_errors(weight: torch.Tensor, second: torch.Tensor, groups: torch.Tensor, damping: float) -> torch.Tensor:
    """Output error [n_groups] of removing each group of input columns alone, the others refit (float64, CPU).

    ``weight`` [out, F]; ``second`` [F+1, F+1] from :func:`second_moment`, on the device the solve runs on (damped
    and factorised in place: pass it without keeping a reference, so that one [F+1, F+1] matrix exists at a
    time); ``groups`` [n_groups, size] column indices. With S the damped second moment (damping on the F input
    features), the least-squares refit of the other columns and the bias leaves the mean squared output error per
    token (Optimal Brain Surgeon, for a group R of columns)

        E_R = trace(W_R (S⁻¹[R, R])⁻¹ W_Rᵀ)

    S (positive definite: the second moment of [x; 1] with the features damped) = L Lᵀ, so S⁻¹[C, C] =
    (L⁻¹ e_C)ᵀ (L⁻¹ e_C) for GROUP_COLUMNS columns C at a time. L⁻¹ (lower triangular, so L⁻¹ e_C is zero above
    row min(C)) is computed over L (:func:`lower_inverse_in_place`): F³/3 multiply-adds on top of the
    factorisation's F³/3 (an LU solve of every column costs 2F³ more), and on the CPU one [F+1, F+1] matrix from
    the second moment to L⁻¹.
    """
    features, device = weight.shape[1], second.device
    damped = damp(second, torch.arange(features, device=device), damping)
    del second
    lower = cholesky_in_place(damped)
    del damped
    inverse = lower_inverse_in_place(lower)
    del lower
    groups = groups.to(device)
    w_groups = weight.detach()[:, groups.to(weight.device)].to(device, torch.float64).permute(1, 2, 0)  # [n, size, out]
    n_groups, size = groups.shape
    per_chunk = max(1, GROUP_COLUMNS // size)
    blocks = torch.empty(n_groups, size, size, dtype=torch.float64, device=device)  # S⁻¹[R, R] per group
    for first in range(0, n_groups, per_chunk):
        chunk = groups[first : first + per_chunk]  # [count, size]
        count, columns = len(chunk), chunk.flatten()
        top = int(columns.min())
        half = inverse[top:, columns]  # rows top.. of L⁻¹ e_C (the rows above are zero)
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
