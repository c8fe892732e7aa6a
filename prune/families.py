"""The model families the toolkit prunes, one description each, as data.

Every family here has the Llama-style decoder block that ``prune/blocks.py`` describes: the linears
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``, grouped-query attention, and norms over the
hidden size. What differs between families is data: the transformers class, whether q/k/v always carry
biases, norms over ``head_dim`` inside the attention that all heads share (kept whole when heads go),
projections fused into one linear and the rule that splits them (Phi-3's ``qkv_proj`` stacks q, k and v
rows; ``gate_up_proj`` gate and up rows), and whether the GGUF export writes the family. Everything else
a family does differently (Gemma's extra norms and embedding scale, logit soft-capping, sliding-window
layers, rope scaling) is in its stock modeling code and its configuration, which pruning keeps.

Mixture-of-experts families (Mixtral, Qwen3-MoE) have the same attention; their MLP is a router (``mlp.gate``,
one row of [experts, hidden] per expert) and experts stored as two 3-D parameters, ``mlp.experts.gate_up_proj``
[experts, 2 * channels, hidden] (gate rows, then up rows) and ``mlp.experts.down_proj`` [experts, hidden,
channels]. What the description holds for them is where the configuration keeps the expert count and the
channels of one expert (:attr:`Family.experts`).

Adding a family with this block layout is one entry in :data:`FAMILIES` and one class in
``prune/hf_code/modeling_pruned.py`` (the stock class with per-layer widths).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    MixtralForCausalLM,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    Qwen3MoeForCausalLM,
)


@dataclass(frozen=True)
class ExpertKeys:
    """Where a mixture-of-experts configuration keeps its expert layout."""

    experts: str
    """The key of the number of experts per layer."""
    channels: str
    """The key of the FFN channels of one expert."""


@dataclass(frozen=True)
class Family:
    """One model family: how its decoder block differs from the plain Llama block, as data."""

    model_type: str
    """The configuration's ``model_type``."""
    name: str
    """What people call it (README, messages)."""
    stock_class: type[PreTrainedModel]
    """The transformers causal-LM class of the dense model (and of a pruned one with uniform widths)."""
    pruned_class: str
    """The class in ``prune/hf_code/modeling_pruned.py`` that builds per-layer widths."""
    qkv_bias: bool | None = None
    """True: q/k/v always carry biases (Qwen2); None: as the configuration's ``attention_bias`` says."""
    head_norms: tuple[str, ...] = ()
    """Norms over ``head_dim`` inside the attention module, shared by every head (kept whole)."""
    gguf: bool = False
    """Whether the GGUF export (llama.cpp's ``deci`` architecture: Llama blocks with per-layer widths) writes it."""
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Fused projections: (module path in the decoder layer, the linears whose output rows it stacks, in order).
    The stages work on them split (``prune.blocks.split_fused_projections``); checkpoints keep them fused."""
    experts: ExpertKeys | None = None
    """Mixture of experts: the configuration keys of its expert layout (None: one dense MLP per layer)."""


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama", "Llama 2 / 3.x, SmolLM2", LlamaForCausalLM, "PrunedLlamaForCausalLM", gguf=True),
        Family("mistral", "Mistral", MistralForCausalLM, "PrunedMistralForCausalLM", gguf=True),
        Family("qwen2", "Qwen2 / Qwen2.5", Qwen2ForCausalLM, "PrunedQwen2ForCausalLM", qkv_bias=True, gguf=True),
        Family("qwen3", "Qwen3", Qwen3ForCausalLM, "PrunedQwen3ForCausalLM", head_norms=("q_norm", "k_norm")),
        Family("gemma2", "Gemma 2", Gemma2ForCausalLM, "PrunedGemma2ForCausalLM"),
        Family(
            "gemma3_text",
            "Gemma 3 (text)",
            Gemma3ForCausalLM,
            "PrunedGemma3ForCausalLM",
            head_norms=("q_norm", "k_norm"),
        ),
        Family(
            "phi3",
            "Phi-3 / Phi-3.5",
            Phi3ForCausalLM,
            "PrunedPhi3ForCausalLM",
            fused=(
                ("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                ("mlp.gate_up_proj", ("gate_proj", "up_proj")),
            ),
        ),
        Family(
            "mixtral",
            "Mixtral (mixture of experts)",
            MixtralForCausalLM,
            "PrunedMixtralForCausalLM",
            experts=ExpertKeys("num_local_experts", "intermediate_size"),
        ),
        Family(
            "qwen3_moe",
            "Qwen3-MoE (mixture of experts)",
            Qwen3MoeForCausalLM,
            "PrunedQwen3MoeForCausalLM",
            head_norms=("q_norm", "k_norm"),
            experts=ExpertKeys("num_local_experts", "moe_intermediate_size"),
        ),
    )
}
"""Supported families by ``model_type``."""


class UnsupportedFamilyError(ValueError):
    """A model whose family the toolkit does not describe; the message lists the supported ones."""


def family_of(config: PretrainedConfig) -> Family:
    """The description of ``config``'s family; UnsupportedFamilyError (listing the supported ones) otherwise."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UnsupportedFamilyError(
            f"model type {config.model_type!r} is not one the toolkit prunes; supported: {supported_model_types()}"
        )
    return family


def supported_model_types() -> str:
    """The supported ``model_type`` values, comma-separated."""
    return ", ".join(FAMILIES)
