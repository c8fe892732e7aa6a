"""Sequential reconstruction: each pruned layer refit on the inputs the model *as already pruned below it* gives.

The one-shot ``lstsq`` refit (:mod:`prune.reconstruct`) fits every layer's ``o_proj`` / ``down_proj`` to the
dense outputs on the dense model's inputs, so the errors of the layers below are never seen. Here the
calibration samples go through the model layer by layer, in the dense model and in the model pruned so far
side by side (SparseGPT / ZipLM order). For layer i, with ``x`` a linear's input in the dense model and
``x̂`` its input in the pruned one (kept columns K, augmented with 1 for the bias), the refit

    [W'_K, b'] = [W, b] · C · (Ĝ + λ·mean(diag Ĝ[K, K])·I)⁻¹      C = Σ x̃ x̂̃_Kᵀ,  Ĝ = Σ x̂̃_K x̂̃_Kᵀ

makes the pruned linear's output on the pruned input as close as least squares allows to the dense linear's
output on the dense input: it also corrects what the layers below left wrong. ``o_proj`` is refit first;
``down_proj`` then sees inputs that pass through the refit ``o_proj``. The pruned layer is run as the dense
layer whose ``o_proj`` / ``down_proj`` outputs are replaced by the refit ones, computed from the kept columns
only (a removed head's or channel's values are never read), so no pruned module needs to exist yet.

Per layer and sample: the dense layer three times (to ``o_proj``, to ``down_proj``, whole) and the pruned one
three times; memory beyond the weights: both models' hidden states of every sample at one layer boundary
(2 x N x T x H values) and one [F+1, |K|+1] pair of sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from prune.blocks import layer_linears
from prune.pruner import LayerPlan, LayerRefit, head_rows
from prune.reconstruct import damp
from prune.statistics import call_layer, layer_arguments

RefitLinear = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(kept input columns [|K|], weight [out, |K|], bias [out]) of one refit linear."""


class _Reached(Exception):
    """Ends a layer's forward once the linear whose input is wanted has been reached."""


@contextmanager
def replaced_outputs(linears: dict[nn.Linear, RefitLinear]) -> Iterator[None]:
    """Inside the block, each linear's output is its refit one: x[..., K] @ W'ᵀ + b'."""

    def hook(refit: RefitLinear) -> Callable[..., torch.Tensor]:
        columns, weight, bias = refit

        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].index_select(-1, columns.to(args[0].device))
            return nn.functional.linear(x, weight.to(x.device, x.dtype), bias.to(x.device, x.dtype))

        return forward_hook

    handles = [linear.register_forward_hook(hook(refit)) for linear, refit in linears.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def linear_input(
    layer: nn.Module, linear: nn.Linear, hidden: torch.Tensor, arguments: dict[str, Any], refits: dict
) -> torch.Tensor:
    """The input [T, F] of ``linear`` when ``layer`` runs on ``hidden`` [1, T, H] with ``refits`` in place; the
    layer's forward stops there."""
    seen = []

    def pre_hook(module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().flatten(0, -2))
        raise _Reached

    handle = linear.register_forward_pre_hook(pre_hook)
    try:
        with replaced_outputs(refits):
            call_layer(layer, hidden, arguments)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def fit_linear(
    layer: nn.Module,
    linear: nn.Linear,
    columns: torch.Tensor,
    dense_states: list[torch.Tensor],
    pruned_states: list[torch.Tensor],
    arguments: list[dict[str, Any]],
    refits: dict[nn.Linear, RefitLinear],
    damping: float,
) -> RefitLinear:
    """The refit of ``linear`` (module docstring) over every sample: ``dense_states`` / ``pruned_states`` [1, T, H]
    enter the layer in the dense / pruned model; ``refits`` are the layer's linears already refit."""
    features, kept = linear.in_features, len(columns)
    device = linear.weight.device
    cross = torch.zeros(features + 1, kept + 1, dtype=torch.float64, device=device)  # Σ x̃ x̂̃_Kᵀ
    gram = torch.zeros(kept + 1, kept + 1, dtype=torch.float64, device=device)  # Σ x̂̃_K x̂̃_Kᵀ
    for dense, pruned, kwargs in zip(dense_states, pruned_states, arguments, strict=True):
        x = linear_input(layer, linear, dense, kwargs, {}).float()
        x_hat = linear_input(layer, linear, pruned, kwargs, refits).float().index_select(1, columns.to(device))
        cross[:features, :kept] += x.T @ x_hat
        cross[:features, kept] += x.double().sum(0)
        cross[features, :kept] += x_hat.double().sum(0)
        cross[features, kept] += len(x)
        gram[:kept, :kept] += x_hat.T @ x_hat
        gram[:kept, kept] += x_hat.double().sum(0)
        gram[kept, :kept] = gram[:kept, kept]
        gram[kept, kept] += len(x)
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, device=device)
    full = torch.cat([linear.weight.detach().double(), bias.detach().double()[:, None]], 1)  # [out, F+1]
    target = full @ cross  # [out, |K|+1]
    solution = torch.linalg.solve(damp(gram, torch.arange(kept, device=device), damping), target.T).T
    return columns, solution[:, :-1].to(linear.weight.dtype), solution[:, -1].to(linear.weight.dtype)


def sequential_refit(
    model: PreTrainedModel, samples: list[torch.Tensor], head_dim: int, damping: float, progress: bool = True
) -> LayerRefit:
    """The layer refit for :func:`prune.pruner.prune_model` that reconstructs sequentially (module docstring).

    ``samples``: calibration token ids, each [T]. The returned function must be called for the layers in order,
    every layer kept (it carries both models' hidden states from one layer to the next); each call returns the
    layer's refit ``o_proj`` / ``down_proj`` weights and biases (state-dict entries relative to the layer).
    """
    dense_states, arguments = [], []
    for ids in samples:
        state, kwargs = layer_arguments(model, ids)
        dense_states.append(state)
        arguments.append(kwargs)
    pruned_states = list(dense_states)
    expected = [0]
    bar = tqdm(total=len(arguments[0]), desc="sequential reconstruction", unit="layer", disable=not progress)

    def refit(index: int, layer: nn.Module, plan: LayerPlan) -> dict[str, torch.Tensor]:
        if index != expected[0]:
            raise ValueError(f"sequential reconstruction reached layer {index} after layer {expected[0] - 1}")
        expected[0] += 1
        linears = layer_linears(layer)
        o_proj, down_proj = linears["o_proj"], linears["down_proj"]
        kwargs = [per_layer[index] for per_layer in arguments]
        refits: dict[nn.Linear, RefitLinear] = {}
        with torch.no_grad():
            o_columns = head_rows(plan.kept_query_heads, head_dim)
            refits[o_proj] = fit_linear(layer, o_proj, o_columns, dense_states, pruned_states, kwargs, {}, damping)
            ffn_columns = torch.tensor(plan.kept_ffn_channels)
            refits[down_proj] = fit_linear(
                layer, down_proj, ffn_columns, dense_states, pruned_states, kwargs, dict(refits), damping
            )
            for s, state in enumerate(kwargs):
                dense_states[s] = call_layer(layer, dense_states[s], state)
                with replaced_outputs(refits):
                    pruned_states[s] = call_layer(layer, pruned_states[s], state)
        bar.update()
        if expected[0] == len(arguments[0]):
            bar.close()
        return {
            f"{name}.{part}": tensor.contiguous()
            for name, linear in (("self_attn.o_proj", o_proj), ("mlp.down_proj", down_proj))
            for part, tensor in zip(("weight", "bias"), refits[linear][1:], strict=True)
        }

    return refit
