"""Writing a pruned model as a Hugging Face checkpoint that loads without this toolkit.

Per-layer widths go into ``config.json``; the configuration and modeling code of ``prune/hf_code``
is copied beside it and registered through ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` rebuilds the exact shapes.
A model whose layers all have the same widths is saved with its stock configuration instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

HF_CODE_DIR = Path(__file__).parent / "hf_code"
CODE_FILES = ("configuration_pruned.py", "modeling_pruned.py")


def needs_remote_code(config) -> bool:
    """True when the configuration has per-layer widths (a ``pruned_*`` model type)."""
    return config.model_type.startswith("pruned_")


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Save weights (safetensors), configuration, generation config, tokenizer and, if needed, the code."""
    directory.mkdir(parents=True, exist_ok=True)
    if needs_remote_code(model.config):
        config_name = type(model.config).__name__
        model_name = type(model).__name__
        model.config.auto_map = {
            "AutoConfig": f"configuration_pruned.{config_name}",
            "AutoModelForCausalLM": f"modeling_pruned.{model_name}",
        }
        for name in CODE_FILES:
            shutil.copyfile(HF_CODE_DIR / name, directory / name)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
