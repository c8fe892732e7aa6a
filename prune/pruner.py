"""Physical removal of query heads, KV groups and FFN channels.

A :class:`LayerPlan` per decoder layer names the units to keep. :func:`prune_model` slices the
weights accordingly and builds a new model whose linear layers have exactly the kept shapes: the
stock transformers class when every layer ends with the same widths, otherwise the per-layer class
in ``prune/hf_code`` (the same code a saved checkpoint carries), so the in-memory model and the
reloaded checkpoint are one implementation.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from accelerate import dispatch_model
from torch import nn
from transformers import (
    AutoConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from prune.blocks import (
    BlockShape,
    ExpertLinears,
    LayerWidths,
    block_shape,
    decoder_layers,
    fuse_projections,
    layer_linears,
    split_fused_projections,
)
from prune.families import family_of
from prune.hf_code import modeling_pruned
from prune.memory import drop_mapped_pages
from prune.placement import is_offloaded, outside_layers, resident

PER_LAYER_KEYS = (
    "layer_num_attention_heads",
    "layer_num_key_value_heads",
    "layer_intermediate_size",
    "layer_num_experts",
)


@dataclass(frozen=True)
class LayerPlan:
    """Units of one decoder layer that survive pruning (indices into that layer's current units, sorted)."""

    kept_query_heads: tuple[int, ...]
    kept_kv_heads: tuple[int, ...]
    kept_ffn_channels: tuple[int, ...]
    """In a mixture-of-experts layer: channel ``c`` of expert ``e`` as ``e * channels + c`` (channels of one
    expert in the dense layer); every kept expert keeps the same number."""
    kept_experts: tuple[int, ...] = ()
    """Experts kept in a mixture-of-experts layer (empty: a dense MLP)."""

    @property
    def widths(self) -> LayerWidths:
        experts = len(self.kept_experts)
        channels = len(self.kept_ffn_channels) // max(1, experts)
        return LayerWidths(len(self.kept_query_heads), len(self.kept_kv_heads), channels, experts)

    def expert_channels(self, channels: int) -> list[list[int]]:
        """Per kept expert, its kept channels (indices within the expert); ``channels``: those of a dense expert."""
        per_expert: dict[int, list[int]] = {e: [] for e in self.kept_experts}
        for slot in self.kept_ffn_channels:
            per_expert[slot // channels].append(slot % channels)
        return list(per_expert.values())


def keep_everything(shape: BlockShape) -> list[LayerPlan]:
    """The plan that removes nothing."""
    return [
        LayerPlan(
            tuple(range(w.query_heads)),
            tuple(range(w.kv_heads)),
            tuple(range(w.all_ffn_channels)),
            tuple(range(w.experts)),
        )
        for w in shape.layers
    ]


def check_plan(shape: BlockShape, plans: list[LayerPlan | None]) -> None:
    """Raise ValueError unless the plans keep a valid grouped-query layout in every kept layer.

    ``None`` removes the whole layer; at least one layer must stay. Valid: indices sorted and in range,
    at least one unit of each kind, every kept query head reads a kept KV head, and every kept KV head
    keeps the same number (>= 1) of query heads; in a mixture-of-experts layer at least as many experts as
    the router picks per token, and every kept expert keeps the same number (>= 1) of channels, no removed
    expert any.
    """
    if len(plans) != shape.num_layers:
        raise ValueError(f"{len(plans)} layer plans for {shape.num_layers} layers")
    if all(plan is None for plan in plans):
        raise ValueError("every layer is removed")
    for i, (plan, widths) in enumerate(zip(plans, shape.layers, strict=True)):
        if plan is None:
            continue
        for name, kept, n in (
            ("query heads", plan.kept_query_heads, widths.query_heads),
            ("KV heads", plan.kept_kv_heads, widths.kv_heads),
            ("FFN channels", plan.kept_ffn_channels, widths.all_ffn_channels),
            ("experts", plan.kept_experts if widths.experts else (0,), max(1, widths.experts)),
        ):
            if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= n:
                raise ValueError(f"layer {i}: kept {name} must be sorted, unique, non-empty indices below {n}")
        if widths.experts:
            _check_experts(i, shape, plan, widths)
        g = widths.heads_per_group
        per_group = dict.fromkeys(plan.kept_kv_heads, 0)
        for h in plan.kept_query_heads:
            if h // g not in per_group:
                raise ValueError(f"layer {i}: query head {h} reads KV head {h // g}, which is removed")
            per_group[h // g] += 1
        if len(set(per_group.values())) != 1 or 0 in per_group.values():
            raise ValueError(f"layer {i}: every kept KV head must keep the same number of query heads, got {per_group}")


def _check_experts(i: int, shape: BlockShape, plan: LayerPlan, widths: LayerWidths) -> None:
    if len(plan.kept_experts) < shape.experts_per_token:
        raise ValueError(
            f"layer {i}: {len(plan.kept_experts)} experts kept, fewer than the {shape.experts_per_token} the router "
            "picks per token"
        )
    kept = set(plan.kept_experts)
    orphans = sorted({c // widths.ffn_channels for c in plan.kept_ffn_channels} - kept)
    if orphans:
        raise ValueError(f"layer {i}: FFN channels kept in removed experts {orphans}")
    counts = {len(channels) for channels in plan.expert_channels(widths.ffn_channels)}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"layer {i}: every kept expert must keep the same number (>= 1) of channels")


def compose_plans(
    shape: BlockShape, earlier: list[LayerPlan | None], later: list[LayerPlan | None]
) -> list[LayerPlan | None]:
    """The plans, over ``shape`` (the model ``earlier`` pruned), that keep what pruning by ``earlier`` and then by
    ``later`` (over the layers and units ``earlier`` kept) keeps."""
    kept_layers = [i for i, plan in enumerate(earlier) if plan is not None]
    if len(later) != len(kept_layers):
        raise ValueError(f"{len(later)} later plans for the {len(kept_layers)} layers the earlier plans keep")
    composed: list[LayerPlan | None] = [None] * len(earlier)
    for index, plan in zip(kept_layers, later, strict=True):
        first = earlier[index]
        assert first is not None
        if plan is None:
            continue
        channels = list(first.kept_ffn_channels)
        experts = list(first.kept_experts)
        if experts:  # the earlier-pruned layer's channel e' * f + c' is the c'-th kept channel of its e'-th expert
            dense_channels = shape.layers[index].ffn_channels
            per_expert = first.expert_channels(dense_channels)
            f = len(per_expert[0])
            channels = [experts[e] * dense_channels + per_expert[e][c] for e in range(len(experts)) for c in range(f)]
        composed[index] = LayerPlan(
            tuple(first.kept_query_heads[h] for h in plan.kept_query_heads),
            tuple(first.kept_kv_heads[j] for j in plan.kept_kv_heads),
            tuple(sorted(channels[c] for c in plan.kept_ffn_channels)),
            tuple(experts[e] for e in plan.kept_experts),
        )
    return composed


def head_rows(heads: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """Row indices in q/k/v_proj (column indices in o_proj) of the given heads, in order."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _sliced_linear_tensors(
    layer: nn.Module, plan: LayerPlan, head_dim: int, output_bias: bool
) -> dict[str, torch.Tensor]:
    """State-dict entries (relative to the layer) of the kept rows / columns of its 7 linears.

    ``output_bias``: o_proj and down_proj get a bias entry (zeros where the dense layer has none).
    """
    linears = layer_linears(layer)
    device = linears["q_proj"].weight.device
    q_rows = head_rows(plan.kept_query_heads, head_dim).to(device)
    kv_rows = head_rows(plan.kept_kv_heads, head_dim).to(device)
    # (module, index along dim 0 = output rows, index along dim 1 = input columns)
    selections = {
        "self_attn.q_proj": (q_rows, None),
        "self_attn.k_proj": (kv_rows, None),
        "self_attn.v_proj": (kv_rows, None),
        "self_attn.o_proj": (None, q_rows),
    }
    tensors = {}
    if isinstance(linears["down_proj"], ExpertLinears):
        tensors = _sliced_expert_tensors(layer, plan)
    else:
        ffn = torch.tensor(plan.kept_ffn_channels, device=device)
        selections |= {"mlp.gate_proj": (ffn, None), "mlp.up_proj": (ffn, None), "mlp.down_proj": (None, ffn)}
    for name, (rows, cols) in selections.items():
        linear = linears[name.rpartition(".")[2]]
        weight = linear.weight.detach()
        if rows is not None:
            weight = weight.index_select(0, rows)
        if cols is not None:
            weight = weight.index_select(1, cols)
        tensors[f"{name}.weight"] = weight.contiguous()
        if linear.bias is not None:
            bias = linear.bias.detach()
            tensors[f"{name}.bias"] = (bias.index_select(0, rows) if rows is not None else bias).contiguous()
        elif output_bias and cols is not None:
            tensors[f"{name}.bias"] = weight.new_zeros(weight.shape[0])
    return tensors


def _sliced_expert_tensors(layer: nn.Module, plan: LayerPlan) -> dict[str, torch.Tensor]:
    """A mixture-of-experts layer's kept experts (router rows; gate/up rows and down columns of their kept
    channels), as split entries (``mlp.experts.gate_proj.weight`` [kept experts, channels, hidden] ...)."""
    experts: Any = cast(Any, layer.mlp).experts
    channels = experts.down_proj.weight.shape[2]
    device = experts.down_proj.weight.device
    kept = torch.tensor(plan.kept_experts, device=device)
    columns = torch.tensor(plan.expert_channels(channels), device=device)  # [kept experts, kept channels]
    tensors = {"mlp.gate.weight": layer.get_parameter("mlp.gate.weight").detach().index_select(0, kept).contiguous()}
    for name in ("gate_proj", "up_proj"):
        weight = getattr(experts, name).weight.detach().index_select(0, kept)  # [kept, channels, hidden]
        rows = columns[:, :, None].expand(-1, -1, weight.shape[2])
        tensors[f"mlp.experts.{name}.weight"] = weight.gather(1, rows).contiguous()
    down = experts.down_proj.weight.detach().index_select(0, kept)  # [kept, hidden, channels]
    tensors["mlp.experts.down_proj.weight"] = down.gather(2, columns[:, None, :].expand(-1, down.shape[1], -1))
    return tensors


def pruned_config(config: PretrainedConfig, widths: list[LayerWidths | None], output_bias: bool = False):
    """Configuration for a model with the given per-layer widths (``None``: the layer is removed).

    Uniform widths give the family's stock configuration (no remote code needed) when the stock
    configuration accepts them (transformers requires hidden_size % num_attention_heads == 0);
    otherwise the stock configuration keeps the dense widths and gains the ``layer_*`` lists that
    ``prune/hf_code/modeling_pruned.py`` reads. ``output_bias`` (o_proj / down_proj biases) always
    takes the per-layer form.
    """
    shape = block_shape(config)
    values = config.to_dict()
    for key in (
        *PER_LAYER_KEYS,
        "output_projection_bias",
        "quantization_config",
        "auto_map",
        "architectures",
        "model_type",
        "transformers_version",
    ):
        values.pop(key, None)
    values["head_dim"] = shape.head_dim
    kept_layers = [i for i, w in enumerate(widths) if w is not None]
    kept = [w for w in widths if w is not None]
    values["num_hidden_layers"] = len(kept_layers)
    if values.get("layer_types"):
        values["layer_types"] = [values["layer_types"][i] for i in kept_layers]
    experts = family_of(config).experts
    if len(set(kept)) == 1 and shape.hidden_size % kept[0].query_heads == 0 and not output_bias:
        w = kept[0]
        values |= {
            "num_attention_heads": w.query_heads,
            "num_key_value_heads": w.kv_heads,
            "intermediate_size" if experts is None else experts.channels: w.ffn_channels,
        }
        if experts is not None:
            values[experts.experts] = w.experts
        return AutoConfig.for_model(shape.model_type, **values)
    values |= {
        "layer_num_attention_heads": [w.query_heads for w in kept],
        "layer_num_key_value_heads": [w.kv_heads for w in kept],
        "layer_intermediate_size": [w.ffn_channels for w in kept],
    }
    if experts is not None:
        values["layer_num_experts"] = [w.experts for w in kept]
    if output_bias:
        values["output_projection_bias"] = True
    return AutoConfig.for_model(shape.model_type, **values)


def has_layer_widths(config: PretrainedConfig) -> bool:
    """True when the configuration carries per-layer widths (the model needs ``modeling_pruned``)."""
    return getattr(config, "layer_num_attention_heads", None) is not None


def model_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The causal-LM class that builds a model from ``config`` (stock or per-layer)."""
    family = family_of(config)
    return getattr(modeling_pruned, family.pruned_class) if has_layer_widths(config) else family.stock_class


def _release(layer: nn.Module) -> None:
    """Free a dense layer's linear weights and biases (the layer is unusable after), the pages of weights that lie in
    a memory-mapped checkpoint included (no pruned tensor views them: :func:`_sliced_linear_tensors` copies)."""
    linears = layer_linears(layer).values()
    drop_mapped_pages([linear.weight.detach() for linear in linears])
    for linear in linears:
        linear.weight = nn.Parameter(linear.weight.new_empty(0), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.new_empty(0), requires_grad=False)


LayerRefit = Callable[[int, nn.Module, "LayerPlan"], dict[str, torch.Tensor]]
"""``refit(dense layer index, dense layer, plan)`` -> replacement state-dict entries (relative to the layer)."""


def prune_model(
    model: PreTrainedModel,
    plans: list[LayerPlan | None],
    output_bias: bool = False,
    refit: LayerRefit | None = None,
    in_place: bool = False,
) -> PreTrainedModel:
    """A new model holding only the kept units of ``model``; ``None`` plans drop layers.

    Weights are sliced on the model's device and keep its dtype. Embeddings, norms, lm_head and the
    rotary embedding are shared with ``model`` (no copy). ``output_bias``: o_proj and down_proj get a
    bias, zero unless ``refit`` gives it. ``refit``: called for every kept layer after slicing, its entries
    replace the sliced ones (a reconstruction of the layer's outputs). ``model`` is left untouched, unless
    ``in_place``: then each dense layer's linear weights are released as soon as the layer is sliced and
    refit, so that memory holds the dense model and one layer more at most, and ``model`` is unusable after.
    Fused projections of ``model`` (Phi-3) are split first (:func:`prune.blocks.split_fused_projections`, the
    same outputs); the pruned model stores them fused, as its family's checkpoints do.
    """
    shape, family = block_shape(model.config), family_of(model.config)
    check_plan(shape, plans)
    split_fused_projections(model)
    config = pruned_config(model.config, [None if plan is None else plan.widths for plan in plans], output_bias)
    config._attn_implementation = model.config._attn_implementation
    outside = outside_layers(model)
    with resident(outside):
        state = {
            name: _kept_where_it_lives(tensor.detach(), is_offloaded(outside))
            for name, tensor in model.state_dict().items()
            if not name.startswith("model.layers.")
        }
    kept_layers = [
        (index, layer, plan)
        for index, (layer, plan) in enumerate(zip(decoder_layers(model), plans, strict=True))
        if plan is not None
    ]
    for i, (index, layer, plan) in enumerate(kept_layers):
        offloaded = is_offloaded(layer.modules())
        with resident(layer.modules()):  # its offloaded weights loaded once (device_map)
            tensors = {k: v.detach() for k, v in layer.state_dict().items() if "_proj." not in k}
            tensors |= _sliced_linear_tensors(layer, plan, shape.head_dim, output_bias)
            if refit is not None:
                tensors |= refit(index, layer, plan)
            tensors = fuse_projections(family, tensors)
            state |= {f"model.layers.{i}.{k}": _kept_where_it_lives(v, offloaded) for k, v in tensors.items()}
        if in_place:
            _release(layer)
    if in_place:
        for layer, kept in zip(decoder_layers(model), plans, strict=True):
            if kept is None:
                _release(layer)
    with torch.device("meta"):
        pruned = model_class_for(config)(config)
    pruned.load_state_dict(state, assign=True, strict=True)
    _share_non_persistent_buffers(model, pruned, [index for index, _, _ in kept_layers])
    if config.tie_word_embeddings:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    pruned.generation_config = copy.deepcopy(model.generation_config)
    device_map = getattr(model, "hf_device_map", None)
    if device_map is not None:
        dispatch_model(pruned, pruned_device_map(device_map, plans))
    return pruned.eval()


def _share_non_persistent_buffers(dense: nn.Module, pruned: nn.Module, kept_layers: list[int]) -> None:
    """Give ``pruned`` the dense model's non-persistent buffers (rotary frequencies, Gemma's embedding scale),
    which the state dict does not carry; ``kept_layers[i]``: the dense index of pruned layer i."""
    dense_buffers = dict(dense.named_buffers())
    for name, buffer in list(pruned.named_buffers()):
        if buffer.device.type != "meta":
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", name)
        source = name if match is None else f"model.layers.{kept_layers[int(match.group(1))]}.{match.group(2)}"
        module_name, _, buffer_name = name.rpartition(".")
        pruned.get_submodule(module_name).register_buffer(buffer_name, dense_buffers[source], persistent=False)


def _kept_where_it_lives(tensor: torch.Tensor, offloaded: bool) -> torch.Tensor:
    """A pruned model's tensor: in CPU memory when the dense module was offloaded (the dispatch offloads it again),
    else where it is."""
    return tensor.cpu() if offloaded else tensor


def pruned_device_map(device_map: dict[str, Any], plans: list[LayerPlan | None]) -> dict[str, Any]:
    """The dense model's device map (accelerate: module name -> device) for the pruned model: kept layers
    renumbered, removed layers dropped, disk offload turned into CPU offload (the pruned tensors are in memory)."""
    new_index: dict[int, int] = {}
    for index, plan in enumerate(plans):
        if plan is not None:
            new_index[index] = len(new_index)
    pruned_map = {}
    for name, device in device_map.items():
        device = "cpu" if device == "disk" else device
        match = re.fullmatch(r"model\.layers\.(\d+)(\..*)?", name)
        if match is None:
            pruned_map[name] = device
        elif int(match.group(1)) in new_index:
            pruned_map[f"model.layers.{new_index[int(match.group(1))]}{match.group(2) or ''}"] = device
    return pruned_map
