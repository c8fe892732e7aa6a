"""Configurations of structurally pruned LLaMA-family models with per-layer widths.

Each configuration is the stock one plus three lists of length ``num_hidden_layers``:
``layer_num_attention_heads``, ``layer_num_key_value_heads`` and ``layer_intermediate_size``.
The stock fields keep the dense model's values; ``head_dim`` is always written explicitly.
"""

from transformers import LlamaConfig, MistralConfig, Qwen2Config


class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"


class PrunedMistralConfig(MistralConfig):
    model_type = "pruned_mistral"


class PrunedQwen2Config(Qwen2Config):
    model_type = "pruned_qwen2"
