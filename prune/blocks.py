"""Explicit description of a LLaMA-family decoder block: its structural units and what they cost.

Every stage that needs to know which rows and columns belong to a KV group, a query head or an
FFN channel asks this module, so the layout is written down once.

Layout (docs/METHOD.md §2), per decoder layer, with ``head_dim`` = d and ``g`` query heads per KV group:
- query head ``h``: rows ``h*d : (h+1)*d`` of ``q_proj`` and the same columns of ``o_proj``;
  it reads KV head ``h // g`` (the order ``repeat_kv`` uses).
- KV group ``j``: rows ``j*d : (j+1)*d`` of ``k_proj`` and ``v_proj`` plus its query heads ``j*g .. j*g+g-1``.
- FFN channel ``c``: row ``c`` of ``gate_proj`` and ``up_proj``, column ``c`` of ``down_proj``.

In a mixture-of-experts layer (Mixtral, Qwen3-MoE) ``gate_proj``, ``up_proj`` and ``down_proj`` are
:class:`ExpertLinears`, weights with a leading expert dimension ([experts, out, in]), and FFN channel ``c``
of expert ``e`` is numbered ``e * channels + c`` in the layer (channels: those of one expert). Every expert
keeps the same number of channels, so that the layer stays one 3-D tensor per projection; expert ``e`` goes
with row ``e`` of the router ``mlp.gate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PretrainedConfig

from prune.families import Family, family_of

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTENTION_LINEARS + MLP_LINEARS


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one decoder layer: query heads, KV heads (= KV groups), FFN channels (of one expert in a
    mixture-of-experts layer) and experts (0: one dense MLP)."""

    query_heads: int
    kv_heads: int
    ffn_channels: int
    experts: int = 0

    @property
    def heads_per_group(self) -> int:
        return self.query_heads // self.kv_heads

    @property
    def all_ffn_channels(self) -> int:
        """FFN channels of the layer: those of every expert together (the dense MLP's channels)."""
        return self.ffn_channels * max(1, self.experts)


@dataclass(frozen=True)
class BlockShape:
    """Shape facts of a decoder-only model that the pruning stages need.

    ``attention_bias``: q/k/v carry biases (Qwen2); o_proj never does in the supported families.
    ``experts_per_token``: experts the router picks per token (0: dense MLPs).
    """

    model_type: str
    hidden_size: int
    head_dim: int
    num_layers: int
    attention_bias: bool
    mlp_bias: bool
    layers: tuple[LayerWidths, ...]
    experts_per_token: int = 0

    def kv_group_params(self, layer: int) -> int:
        """Parameters removed with one KV group of ``layer`` (its k/v rows and its query heads)."""
        g = self.layers[layer].heads_per_group
        per_head_rows = self.hidden_size * self.head_dim + (self.head_dim if self.attention_bias else 0)
        return (2 + g) * per_head_rows + g * self.head_dim * self.hidden_size

    def query_head_params(self) -> int:
        """Parameters removed with one query head (its q rows and o columns; k/v stay)."""
        q_rows = self.hidden_size * self.head_dim + (self.head_dim if self.attention_bias else 0)
        return q_rows + self.head_dim * self.hidden_size

    def ffn_channel_params(self) -> int:
        """Parameters removed with one FFN channel (gate row, up row, down column), of one expert in a
        mixture-of-experts layer."""
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    def linear_weight_count(self, widths: LayerWidths) -> int:
        """Weights (no biases) of the 7 linear layers of one decoder block with the given widths (every expert's
        gate, up and down projections in a mixture-of-experts layer; not its router)."""
        d, h = self.head_dim, self.hidden_size
        return (2 * widths.query_heads + 2 * widths.kv_heads) * d * h + 3 * widths.all_ffn_channels * h

    def layer_params(self, widths: LayerWidths) -> int:
        """Parameters of the 7 linear layers of one decoder block with the given widths, biases and a
        mixture-of-experts router ([experts, hidden]) included."""
        biases = (widths.query_heads + 2 * widths.kv_heads) * self.head_dim if self.attention_bias else 0
        if self.mlp_bias:
            biases += 2 * widths.ffn_channels + self.hidden_size
        return self.linear_weight_count(widths) + biases + widths.experts * self.hidden_size

    def whole_layer_params(self, widths: LayerWidths) -> int:
        """Parameters of a whole decoder block: its linears and its two RMSNorm weights."""
        return self.layer_params(widths) + 2 * self.hidden_size


def block_shape(config: PretrainedConfig) -> BlockShape:
    """Read a transformers config (stock or pruned) into a :class:`BlockShape`.

    Raises UnsupportedFamilyError (a ValueError) for a family :data:`prune.families.FAMILIES` does not describe.
    """
    model_type = config.model_type
    family = family_of(config)
    n = config.num_hidden_layers
    heads = getattr(config, "layer_num_attention_heads", None) or [config.num_attention_heads] * n
    kv = (
        getattr(config, "layer_num_key_value_heads", None)
        or [config.num_key_value_heads or config.num_attention_heads] * n
    )
    ffn_key, experts, per_token = "intermediate_size", [0] * n, 0
    if family.experts is not None:
        _check_every_layer_has_experts(config)
        ffn_key, per_token = family.experts.channels, config.num_experts_per_tok
        experts = getattr(config, "layer_num_experts", None) or [getattr(config, family.experts.experts)] * n
    ffn = getattr(config, "layer_intermediate_size", None) or [getattr(config, ffn_key)] * n
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return BlockShape(
        model_type=model_type,
        hidden_size=config.hidden_size,
        head_dim=head_dim,
        num_layers=n,
        attention_bias=family.qkv_bias or bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        layers=tuple(
            LayerWidths(int(q), int(k), int(f), int(e)) for q, k, f, e in zip(heads, kv, ffn, experts, strict=True)
        ),
        experts_per_token=per_token,
    )


def _check_every_layer_has_experts(config: PretrainedConfig) -> None:
    """ValueError for a mixture-of-experts configuration some of whose layers have a dense MLP (Qwen3-MoE's
    ``mlp_only_layers`` and ``decoder_sparse_step``): the toolkit prunes models whose every layer has experts."""
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ValueError(
            f"{config.model_type} models with dense MLP layers (mlp_only_layers, decoder_sparse_step) are not "
            "supported; every layer must have experts"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` model of a supported family."""
    return cast(nn.ModuleList, model.get_submodule("model.layers"))


class ExpertLinears(nn.Module):
    """One projection of every expert of a mixture-of-experts layer: ``weight`` [experts, out, in], no bias.
    A holder of weights that :class:`SplitExperts` reads; it is not called."""

    bias = None

    def __init__(self, weight: torch.Tensor, requires_grad: bool):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    @property
    def in_features(self) -> int:
        return self.weight.shape[2]


Projection = nn.Linear | ExpertLinears
"""One of the 7 projections of a decoder block: a linear, or the same projection of every expert."""


class SplitExperts(nn.Module):
    """A mixture-of-experts layer's experts with ``gate_up_proj`` split into ``gate_proj`` and ``up_proj``
    (:class:`ExpertLinears`, views of the fused weight: no copy). Its forward is the stock experts' eager one:
    each token's output is the sum over its picked experts of routing weight * down(act(gate x) * up x)."""

    def __init__(self, experts: Any):
        super().__init__()
        fused: torch.Tensor = experts.gate_up_proj
        channels = fused.shape[1] // 2
        trainable = fused.requires_grad
        self.gate_proj = ExpertLinears(fused.detach()[:, :channels], trainable)
        self.up_proj = ExpertLinears(fused.detach()[:, channels:], trainable)
        self.down_proj = ExpertLinears(experts.down_proj.detach(), experts.down_proj.requires_grad)
        self.act_fn = experts.act_fn

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Tokens [S, H], their picked experts [S, k] and routing weights [S, k] -> output [S, H]."""
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token, position = torch.where(top_k_index == expert)
            x = hidden_states[token]
            gate = nn.functional.linear(x, self.gate_proj.weight[expert])
            hidden = self.act_fn(gate) * nn.functional.linear(x, self.up_proj.weight[expert])
            out = nn.functional.linear(hidden, self.down_proj.weight[expert]) * top_k_weights[token, position, None]
            output.index_add_(0, token, out.to(output.dtype))
        return output


def layer_linears(layer: nn.Module) -> dict[str, Projection]:
    """The 7 projections of one decoder block, by name (q_proj ... down_proj), wherever they sit in it (a fused
    projection split by :func:`split_fused_projections` holds its parts as children; a mixture-of-experts layer's
    gate/up/down are :class:`ExpertLinears` once split)."""
    found: dict[str, Projection] = {
        path.rpartition(".")[2]: m for path, m in layer.named_modules() if isinstance(m, (nn.Linear, ExpertLinears))
    }
    missing = [name for name in LINEAR_NAMES if name not in found]
    if missing:
        raise ValueError(
            f"the decoder layer has no {', '.join(missing)}: split its fused projections first "
            "(prune.blocks.split_fused_projections)"
        )
    return {name: found[name] for name in LINEAR_NAMES}


def dense_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """:func:`layer_linears` of a layer without experts (for the stages that refit or export linears); ValueError
    for a mixture-of-experts layer."""
    linears = layer_linears(layer)
    if any(isinstance(linear, ExpertLinears) for linear in linears.values()):
        raise ValueError("the experts of a mixture-of-experts layer are not linear layers")
    return cast(dict[str, nn.Linear], linears)


class StackedLinears(nn.Module):
    """A fused projection split into its linears (children, by name, in stacking order); its output is theirs
    stacked along the last dimension, as the fused linear's was."""

    def __init__(self, parts: dict[str, nn.Linear]):
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.children()], dim=-1)


def _rows(name: str, widths: LayerWidths, head_dim: int) -> int:
    """Output rows of one of the 7 linears at the given widths."""
    if name == "q_proj":
        return widths.query_heads * head_dim
    if name in ("k_proj", "v_proj"):
        return widths.kv_heads * head_dim
    return widths.ffn_channels


def split_fused_projections(model: nn.Module) -> None:
    """In place: each fused projection of ``model``'s family (:attr:`Family.fused`) replaced by a
    :class:`StackedLinears` of its linears, whose weights are views of the fused weight's rows (no copy; the
    same outputs), and a mixture-of-experts layer's experts by :class:`SplitExperts` (the same outputs up to
    rounding). Nothing to do for other families, or when already split."""
    config = cast(PretrainedConfig, model.config)
    family = family_of(config)
    if family.experts is not None:
        for layer in decoder_layers(model):
            mlp: Any = layer.mlp
            if not isinstance(mlp.experts, SplitExperts):
                mlp.experts = SplitExperts(mlp.experts)
    if not family.fused:
        return
    shape = block_shape(config)
    for layer, widths in zip(decoder_layers(model), shape.layers, strict=True):
        for path, names in family.fused:
            fused = layer.get_submodule(path)
            if not isinstance(fused, nn.Linear):  # already split
                continue
            sizes = [_rows(name, widths, shape.head_dim) for name in names]
            weights = fused.weight.detach().split(sizes)
            biases = fused.bias.detach().split(sizes) if fused.bias is not None else [None] * len(names)
            parts = {}
            for name, weight, bias in zip(names, weights, biases, strict=True):
                part = nn.Linear(fused.in_features, weight.shape[0], bias=bias is not None, device="meta")
                part.weight = nn.Parameter(weight, requires_grad=fused.weight.requires_grad)
                if bias is not None:
                    part.bias = nn.Parameter(bias, requires_grad=fused.weight.requires_grad)
                parts[name] = part
            parent, _, attribute = path.rpartition(".")
            setattr(layer.get_submodule(parent), attribute, StackedLinears(parts))


def fuse_projections(family: Family, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A decoder layer's state-dict entries with the split linears' weights and biases (``self_attn.q_proj.weight``
    ...) stacked into the family's fused projections (``self_attn.qkv_proj.weight``), and split experts' weights
    into ``mlp.experts.gate_up_proj`` / ``down_proj``, as checkpoints store them."""
    tensors = dict(tensors)
    if family.experts is not None and "mlp.experts.gate_proj.weight" in tensors:
        gate, up = tensors.pop("mlp.experts.gate_proj.weight"), tensors.pop("mlp.experts.up_proj.weight")
        tensors["mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        tensors["mlp.experts.down_proj"] = tensors.pop("mlp.experts.down_proj.weight")
    for path, names in family.fused:
        parent = path.rpartition(".")[0]
        for kind in ("weight", "bias"):
            keys = [f"{parent}.{name}.{kind}" for name in names]
            if all(key in tensors for key in keys):
                tensors[f"{path}.{kind}"] = torch.cat([tensors.pop(key) for key in keys])
    return tensors


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters (tied weights counted once) and parameters inside the decoder blocks."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied Parameter once
    decoder = sum(p.numel() for p in decoder_layers(model).parameters())
    return {"total": total, "decoder_blocks": decoder}
