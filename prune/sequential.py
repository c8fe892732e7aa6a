"""Sequential reconstruction: each pruned layer refit on the inputs the model *as already pruned below it* gives.

The one-shot ``lstsq`` refit (:mod:`prune.reconstruct`) fits every layer's ``o_proj`` / ``down_proj`` on the
dense model's inputs, which the pruned model never sees past its first pruned layer. Here the calibration
samples go through the model pruned so far, layer by layer (SparseGPT / ZipLM order): for layer i, ``x̂`` is a
linear's input when layer i of the dense model runs on the hidden states the pruned layers below produce, and
the refit is the one-shot formula with the second moment of ``x̂`` (Ŝ = E[x̂̃ x̂̃ᵀ], x̂̃ = [x̂; 1]):

    [W'_K, b'] = [W, b] · Ŝ[:, K̃] · (Ŝ[K̃, K̃] + λ·mean(diag Ŝ[K, K])·I)⁻¹      K̃ = K ∪ {bias}

so the pruned linear matches the dense linear on the inputs the pruned model actually produces. ``o_proj`` is
refit first; ``down_proj``'s inputs then pass through the refit ``o_proj``. The pruned layer is run as the dense
layer whose ``o_proj`` / ``down_proj`` outputs are replaced by the refit ones, computed from the kept columns
only (a removed head's or channel's values are never read), so no pruned module needs to exist yet.

Per layer and sample: the layer runs to ``o_proj``, then to ``down_proj``; the pass to ``down_proj`` keeps the
attention module's output and the kept columns of ``down_proj``'s input, from which the layer's output follows
without running its attention or its MLP's other linears again. Memory beyond the weights: the hidden states of
every sample at one layer boundary (N x T x H values), one linear's input moments (as the statistics pass holds
them) and, in memory without a scratch directory (else one sample's at a time), every sample's attention output
(T x H values) and kept columns of ``down_proj``'s input (T x |K|).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from prune.blocks import dense_linears
from prune.placement import module_device
from prune.pruner import LayerPlan, LayerRefit, head_rows
from prune.reconstruct import LinearInputs, lstsq_refit
from prune.statistics import add_gram, call_layer, filled_gram, layer_arguments

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


@contextmanager
def returning(outputs: dict[nn.Module, Any]) -> Iterator[None]:
    """Inside the block, calling each module of ``outputs`` returns the output given for it, computing nothing (a
    ``forward`` of its own, as accelerate's offload sets, is restored after it)."""
    own = {module: module.__dict__.get("forward") for module in outputs}
    for module, output in outputs.items():
        module.forward = lambda *args, _output=output, **kwargs: _output
    try:
        yield
    finally:
        for module, forward in own.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def pruned_inputs(
    layer: nn.Module,
    linear: nn.Linear,
    states: list[torch.Tensor],
    arguments: list[dict[str, Any]],
    refits: dict[nn.Linear, RefitLinear],
    each: Callable[[torch.Tensor], None] = lambda x: None,
) -> LinearInputs:
    """Σ x̂ xᵀ̂ [F, F] (float32), Σ x̂ [F] (float64) and the token count of ``linear``'s input x̂ when ``layer`` runs
    on every sample's hidden state ``states`` [1, T, H] with the linears already refit (``refits``) in place;
    ``each`` receives every sample's x̂ [T, F] (in the layer's dtype) in turn."""
    features, device = linear.in_features, linear.weight.device
    xxt = torch.zeros(features, features, device=device)
    x_sum = torch.zeros(features, dtype=torch.float64, device=device)
    tokens = 0
    for state, kwargs in zip(states, arguments, strict=True):
        x = linear_input(layer, linear, state, kwargs, refits)
        each(x)
        x = x.float()
        add_gram(xxt, x)
        x_sum += x.double().sum(0)
        tokens += len(x)
    return LinearInputs(x_sum, filled_gram(xxt), tokens)


class SampleTensors:
    """A tuple of tensors per sample, kept in memory or, with a ``scratch`` directory, in a file per sample there,
    each read back and removed once (so that one sample's tensors are in memory at a time)."""

    def __init__(self, scratch: Path | None):
        self.scratch = scratch
        self.kept: list[tuple[torch.Tensor, ...]] = []
        self.count = 0

    def append(self, tensors: tuple[torch.Tensor, ...]) -> None:
        if self.scratch is None:
            self.kept.append(tensors)
        else:
            torch.save(tuple(t.cpu() for t in tensors), self.scratch / f"sample-{self.count}.pt")
        self.count += 1

    def take(self, index: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        if self.scratch is None:
            tensors, self.kept[index] = self.kept[index], ()
            return tensors
        path = self.scratch / f"sample-{index}.pt"
        tensors = torch.load(path, weights_only=True)
        path.unlink()
        return tuple(t.to(device) for t in tensors)


def parent_module(layer: nn.Module, child: nn.Module) -> nn.Module:
    """The module of ``layer`` that holds ``child`` (``self_attn`` for ``o_proj``, ``mlp`` for ``down_proj``)."""
    path = next(path for path, module in layer.named_modules() if module is child)
    return layer.get_submodule(path.rpartition(".")[0])


def fit_linear(
    layer: nn.Module,
    linear: nn.Linear,
    columns: torch.Tensor,
    states: list[torch.Tensor],
    arguments: list[dict[str, Any]],
    refits: dict[nn.Linear, RefitLinear],
    damping: float,
) -> RefitLinear:
    """The refit of ``linear`` (module docstring): :func:`prune.reconstruct.lstsq_refit` on the pruned model's
    inputs to it."""
    return refit_linear(linear, columns, pruned_inputs(layer, linear, states, arguments, refits), damping)


def refit_linear(linear: nn.Linear, columns: torch.Tensor, inputs: LinearInputs, damping: float) -> RefitLinear:
    """``linear`` refit on the kept input ``columns`` by :func:`prune.reconstruct.lstsq_refit` from ``inputs``'
    moments, in the linear's dtype."""
    bias = None if linear.bias is None else linear.bias.detach()
    weight, new_bias = lstsq_refit(linear.weight.detach(), bias, columns, inputs, damping)
    return columns, weight.to(linear.weight.dtype), new_bias.to(linear.weight.dtype)


def sequential_refit(
    model: PreTrainedModel,
    samples: list[torch.Tensor],
    head_dim: int,
    damping: float,
    progress: bool = True,
    scratch: Path | None = None,
) -> LayerRefit:
    """The layer refit for :func:`prune.pruner.prune_model` that reconstructs sequentially (module docstring).

    ``samples``: calibration token ids, each [T]. The returned function must be called for the layers in order,
    every layer kept (it carries the pruned model's hidden states from one layer to the next); each call returns the
    layer's refit ``o_proj`` / ``down_proj`` weights and biases (state-dict entries relative to the layer).
    ``scratch``: a directory (made here) for each sample's attention output and kept ``down_proj`` inputs of the
    layer being refit; None: they stay in memory.
    """
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    states, arguments = [], []
    for ids in samples:
        state, kwargs = layer_arguments(model, ids)
        states.append(state)
        arguments.append(kwargs)
    expected = [0]
    bars: list[tqdm] = []  # started with the first layer: inside the pruning stage, after its announcement line

    def refit(index: int, layer: nn.Module, plan: LayerPlan) -> dict[str, torch.Tensor]:
        if index != expected[0]:
            raise ValueError(f"sequential reconstruction reached layer {index} after layer {expected[0] - 1}")
        if index == 0:
            bars.append(
                tqdm(total=len(arguments[0]), desc="sequential reconstruction", unit="layer", disable=not progress)
            )
        bar = bars[-1]
        expected[0] += 1
        linears = dense_linears(layer)
        o_proj, down_proj = linears["o_proj"], linears["down_proj"]
        kwargs = [per_layer[index] for per_layer in arguments]
        refits: dict[nn.Linear, RefitLinear] = {}
        with torch.no_grad():
            o_columns = head_rows(plan.kept_query_heads, head_dim)
            refits[o_proj] = fit_linear(layer, o_proj, o_columns, states, kwargs, {}, damping)
            ffn_columns = torch.tensor(plan.kept_ffn_channels)
            attention, mlp = parent_module(layer, o_proj), parent_module(layer, down_proj)
            attention_output: list[torch.Tensor] = []  # the sample's, the refit o_proj in place
            kept = SampleTensors(scratch)  # each sample's attention output [1, T, H] and x̂[:, K] [T, |K|]

            def keep(x: torch.Tensor) -> None:
                kept.append((attention_output.pop(), x.index_select(-1, ffn_columns.to(x.device))))

            handle = attention.register_forward_hook(lambda module, args, output: attention_output.append(output[0]))
            try:
                inputs = pruned_inputs(layer, down_proj, states, kwargs, dict(refits), keep)
            finally:
                handle.remove()
            refits[down_proj] = refit_linear(down_proj, ffn_columns, inputs, damping)
            del inputs
            _, weight, bias = refits[down_proj]
            for s, state in enumerate(kwargs):  # the layer's output: its residual adds and norms around the two
                attention_out, x = kept.take(s, module_device(layer))
                mlp_output = nn.functional.linear(x, weight.to(x.device, x.dtype), bias.to(x.device, x.dtype))
                with returning({attention: (attention_out, None), mlp: mlp_output.view(*states[s].shape)}):
                    states[s] = call_layer(layer, states[s], state)
        bar.update()
        if expected[0] == len(arguments[0]):
            bar.close()
        return {
            f"{name}.{part}": tensor.contiguous()
            for name, linear in (("self_attn.o_proj", o_proj), ("mlp.down_proj", down_proj))
            for part, tensor in zip(("weight", "bias"), refits[linear][1:], strict=True)
        }

    return refit
