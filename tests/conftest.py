"""Tiny random-weight models of the supported families, built in code, and shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]


def tiny_config(
    family: str = "llama",
    layers: int = 3,
    hidden: int = 96,
    heads: int = 6,
    kv_heads: int = 2,
    ffn: int = 64,
    vocab: int = 128,
    tie: bool = True,
):
    """A small config of ``family`` (llama, mistral, qwen2) with grouped-query attention and head_dim 16."""
    return AutoConfig.for_model(
        family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
    )


def tiny_model(family: str = "llama", seed: int = 0, **config_kwargs):
    """A float32 model in eval mode; weights drawn with std 0.2 so that pruning visibly changes logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


def random_tokens(batch: int, length: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


class CharTokenizer:
    """Minimal tokenizer for data tests: one id per character (mod ``vocab``)."""

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text: str):
        class Encoding:
            input_ids = [ord(c) % self.vocab for c in text]

        return Encoding()


def shared_dir(name: str) -> Path | None:
    """$PRUNE_DATA_DIR / $PRUNE_MODELS_DIR style directories, if set and present."""
    value = os.environ.get(name)
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture
def fresh_output(tmp_path) -> Path:
    return tmp_path / "out"
