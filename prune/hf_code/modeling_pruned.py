"""Causal LMs whose decoder layers have individual widths (query heads, KV heads, FFN channels).

The configuration is the family's stock one plus three lists of length ``num_hidden_layers``:
``layer_num_attention_heads``, ``layer_num_key_value_heads`` and ``layer_intermediate_size`` (the
stock fields keep the dense model's values; ``head_dim`` is explicit). The model is the stock
transformers model of its family; after construction, the linear layers of every decoder layer are
replaced by ones of that layer's width and the attention module is told its number of query heads
per KV head (a fused ``qkv_proj``, Phi-3's, is split by head counts that the module reads from its
configuration, so that module gets a :class:`LayerConfig` with its layer's counts). With
``output_projection_bias: true`` (set when the pruner reconstructed the layer outputs), ``o_proj`` and
``down_proj`` carry a bias. Mixture-of-experts configurations add ``layer_num_experts``: the experts of each
layer (router rows and experts, each with ``layer_intermediate_size`` channels). Everything else (RoPE, KV
cache, generation, routing) is stock.
"""

from typing import Any

from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    MixtralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    Qwen3MoeForCausalLM,
)


def _resized_linear(linear: nn.Linear, in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A new, uninitialised linear layer like ``linear`` (device, dtype, bias if it has one) with other sizes."""
    return nn.Linear(
        in_features,
        out_features,
        bias=bias or linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def set_layer_widths(
    layer: nn.Module, query_heads: int, kv_heads: int, ffn_channels: int, output_bias: bool = False, experts: int = 0
) -> None:
    """Give one decoder layer new widths: replaces its 7 linears by uninitialised ones of the new shapes.

    ``query_heads`` must be a multiple of ``kv_heads``; head_dim and hidden size stay as they are.
    ``output_bias``: o_proj and down_proj get a bias. ``experts``: in a mixture-of-experts layer, the experts
    it keeps (``ffn_channels`` each).
    """
    if query_heads % kv_heads:
        raise ValueError(f"{query_heads} query heads cannot be split over {kv_heads} KV heads")
    attn: Any = layer.self_attn  # the family's attention and MLP modules, reached by name
    mlp: Any = layer.mlp
    head_dim, hidden = attn.head_dim, attn.o_proj.out_features
    if hasattr(attn, "qkv_proj"):  # fused (Phi-3): q, k and v rows stacked; the split reads the head counts
        attn.qkv_proj = _resized_linear(attn.qkv_proj, hidden, (query_heads + 2 * kv_heads) * head_dim)
        attn.config = LayerConfig(attn.config, query_heads, kv_heads)
        attn.num_key_value_heads = kv_heads
    else:
        attn.q_proj = _resized_linear(attn.q_proj, hidden, query_heads * head_dim)
        attn.k_proj = _resized_linear(attn.k_proj, hidden, kv_heads * head_dim)
        attn.v_proj = _resized_linear(attn.v_proj, hidden, kv_heads * head_dim)
    attn.o_proj = _resized_linear(attn.o_proj, query_heads * head_dim, hidden, output_bias)
    attn.num_key_value_groups = query_heads // kv_heads
    if hasattr(mlp, "experts"):  # mixture of experts: 3-D weights [experts, out, in] and a router row per expert
        set_expert_widths(mlp, experts, ffn_channels)
        return
    if hasattr(mlp, "gate_up_proj"):  # fused (Phi-3): gate and up rows stacked, split in half
        mlp.gate_up_proj = _resized_linear(mlp.gate_up_proj, hidden, 2 * ffn_channels)
    else:
        mlp.gate_proj = _resized_linear(mlp.gate_proj, hidden, ffn_channels)
        mlp.up_proj = _resized_linear(mlp.up_proj, hidden, ffn_channels)
    mlp.down_proj = _resized_linear(mlp.down_proj, ffn_channels, hidden, output_bias)
    mlp.intermediate_size = ffn_channels


def set_expert_widths(mlp: Any, experts: int, channels: int) -> None:
    """Give a mixture-of-experts block ``experts`` experts of ``channels`` FFN channels each: its router
    (``gate``, [experts, hidden]) and its experts' ``gate_up_proj`` [experts, 2 * channels, hidden] and
    ``down_proj`` [experts, hidden, channels], uninitialised."""
    if experts < mlp.gate.top_k:
        raise ValueError(f"{experts} experts cannot serve {mlp.gate.top_k} experts per token")
    router, weights = mlp.gate.weight, mlp.experts.down_proj
    hidden = router.shape[1]
    mlp.gate.weight = nn.Parameter(router.new_empty(experts, hidden))
    mlp.gate.num_experts = mlp.experts.num_experts = experts
    mlp.experts.intermediate_dim = channels
    mlp.experts.gate_up_proj = nn.Parameter(weights.new_empty(experts, 2 * channels, hidden))
    mlp.experts.down_proj = nn.Parameter(weights.new_empty(experts, hidden, channels))


class LayerConfig:
    """The model's configuration as one attention module sees it: that layer's head counts, everything else
    read from (and written to) the shared configuration."""

    def __init__(self, shared: Any, num_attention_heads: int, num_key_value_heads: int):
        self.__dict__.update(
            shared=shared, num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["shared"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["shared"], name, value)


def _apply_layer_widths(model: nn.Module, config) -> None:
    experts = getattr(config, "layer_num_experts", None) or [0] * config.num_hidden_layers
    widths = zip(
        config.layer_num_attention_heads,
        config.layer_num_key_value_heads,
        config.layer_intermediate_size,
        experts,
        strict=True,
    )
    output_bias = getattr(config, "output_projection_bias", False)
    layers: Any = model.get_submodule("model.layers")
    for layer, (query_heads, kv_heads, ffn_channels, layer_experts) in zip(layers, widths, strict=True):
        set_layer_widths(layer, query_heads, kv_heads, ffn_channels, output_bias, layer_experts)


def _with_layer_widths(stock: type) -> type:
    """The stock causal-LM class ``stock`` with the per-layer widths of its configuration applied after
    construction, named ``Pruned<stock name>`` (the name a checkpoint's ``auto_map`` gives)."""

    def __init__(self, config):
        stock.__init__(self, config)
        _apply_layer_widths(self, config)

    name = f"Pruned{stock.__name__}"
    return type(name, (stock,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


PrunedLlamaForCausalLM = _with_layer_widths(LlamaForCausalLM)
PrunedMistralForCausalLM = _with_layer_widths(MistralForCausalLM)
PrunedQwen2ForCausalLM = _with_layer_widths(Qwen2ForCausalLM)
PrunedQwen3ForCausalLM = _with_layer_widths(Qwen3ForCausalLM)
PrunedGemma2ForCausalLM = _with_layer_widths(Gemma2ForCausalLM)
PrunedGemma3ForCausalLM = _with_layer_widths(Gemma3ForCausalLM)
PrunedPhi3ForCausalLM = _with_layer_widths(Phi3ForCausalLM)
PrunedMixtralForCausalLM = _with_layer_widths(MixtralForCausalLM)
PrunedQwen3MoeForCausalLM = _with_layer_widths(Qwen3MoeForCausalLM)
