"""Writing a pruned model as a Hugging Face checkpoint that loads without this toolkit.

Per-layer widths go into ``config.json`` (the family's stock configuration plus ``layer_*`` lists);
``prune/hf_code/modeling_pruned.py`` is copied beside it and registered for
``AutoModelForCausalLM`` through ``auto_map``, so ``from_pretrained(dir, trust_remote_code=True)``
rebuilds the exact shapes, while the configuration and the tokenizer load without remote code.
A model whose layers all have the same widths is saved with its stock configuration only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prune.pruner import has_layer_widths

MODELING_FILE = Path(__file__).parent / "hf_code" / "modeling_pruned.py"


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Save weights (safetensors), configuration, generation config, tokenizer and, if needed, the code."""
    directory.mkdir(parents=True, exist_ok=True)
    if has_layer_widths(model.config):
        model.config.auto_map = {"AutoModelForCausalLM": f"modeling_pruned.{type(model).__name__}"}
        shutil.copyfile(MODELING_FILE, directory / MODELING_FILE.name)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
