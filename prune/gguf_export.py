"""GGUF export: a pruned (or dense) model as one file that llama.cpp runs, every layer with its own widths.

The file uses llama.cpp's ``deci`` architecture, whose attention head counts and FFN widths are
per-layer arrays (``deci.attention.head_count``, ``deci.attention.head_count_kv``,
``deci.feed_forward_length``, one entry per block). A dense model is written the same way, so that a
dense / pruned comparison in the engine runs one graph builder. What the engine requires of the file:

- the head size comes from ``deci.attention.key_length`` / ``value_length`` and must equal
  ``deci.rope.dimension_count`` (otherwise it is derived from layer 0's head count);
- the rotary layout: llama.cpp rotates adjacent pairs, Hugging Face models rotate halves, so the rows
  of ``q_proj`` / ``k_proj`` (and their biases) are permuted head by head, with each layer's own
  head counts (:func:`to_rotate_pairs`; :func:`to_rotate_halves` undoes it);
- every tensor in the file must be used: layers removed whole are dropped and the rest renumbered;
  ``output.weight`` is omitted when the output head is tied to the embeddings;
- ``attn_output.bias`` and ``ffn_down.bias`` (what a reconstruction adds) and q/k/v biases (Qwen2) are
  optional tensors the graph adds;
- a layer must keep attention heads and FFN channels (the engine drops the attention output of a
  layer without FFN channels); the toolkit's pruner never removes either completely;
- Llama 3's rope scaling (``rope_type: llama3``) is the optional ``rope_freqs.weight``: one divisor per
  rotary frequency (:func:`rope_frequency_factors`).

Families: those whose description in ``prune/families.py`` says ``gguf`` (Llama-style blocks: Llama,
Mistral, Qwen2); the others (Qwen3's per-head norms, Gemma's extra norms, embedding scale and
soft-capping) are refused with one line.

Tensor types: weight matrices in ``f32``, ``f16``, ``bf16`` or ``q8_0`` (quantized here by the ``gguf``
package), or ``q4_k_m`` / ``q6_k`` (written as f16, then quantized by llama.cpp's own quantizer, which
needs the optional ``llama-cpp-python`` binding); norms and biases always float32. For q8_0 every FFN is
widened with zero channels to a multiple of 32 (exact: they add nothing), so that every ``ffn_down``
row splits into whole blocks; another matrix whose rows do not (``attn_output`` when heads x head_dim is
no multiple of 32) is written in float16, and the result lists it. llama.cpp's quantizer makes the same
kind of per-tensor fallback for k-quants (blocks of 256), and the result lists the types it chose.
Tokenizer metadata is copied from the source GGUF file when the model came from one, otherwise built
from the Hugging Face tokenizer as llama.cpp's converter does (:func:`add_hf_tokenizer`: byte-level BPE,
or SentencePiece-style BPE with byte fallback).
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prune.blocks import block_shape, decoder_layers, dense_linears
from prune.families import FAMILIES, Family, family_of
from prune.paths import atomic_path
from prune.placement import resident

ARCHITECTURE = "deci"
GGUF_EXPORT_VERSION = 2
"""Bumped when the export writes different bytes for the same model (it keys cached dense exports)."""


class GgufExportError(ValueError):
    """A model, tokenizer or tensor type the GGUF export cannot write; the message says which and why."""


@dataclass(frozen=True)
class TensorType:
    """A GGUF tensor type of the weight matrices."""

    matrix_type: GGMLQuantizationType
    """The type written by this module (k-quants: f16, then llama.cpp's quantizer)."""
    file_type: LlamaFileType
    bytes_per_weight: float
    """Bytes per weight of the final file, about (its block's bytes / weights; q4_k_m: measured, its Q4_K blocks
    mixed with llama.cpp's Q6_K for some tensors)."""
    engine_quantized: bool = False
    """True when llama.cpp's quantizer (``llama-cpp-python``) produces the final type."""


TENSOR_TYPES = {
    "f32": TensorType(GGMLQuantizationType.F32, LlamaFileType.ALL_F32, 4),
    "f16": TensorType(GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, 2),
    "bf16": TensorType(GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16, 2),
    "q8_0": TensorType(GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0, 34 / 32),
    "q6_k": TensorType(GGMLQuantizationType.F16, LlamaFileType.MOSTLY_Q6_K, 210 / 256, engine_quantized=True),
    "q4_k_m": TensorType(GGMLQuantizationType.F16, LlamaFileType.MOSTLY_Q4_K_M, 0.625, engine_quantized=True),
}
"""Tensor types by name (``export.gguf_type``, ``--type``)."""


@dataclass
class GgufWritten:
    """What :func:`write_gguf` wrote."""

    path: Path
    tensor_type: str
    layers: int
    """Blocks in the file (layers removed whole are not)."""
    tensor_types: dict[str, int]
    """Tensors per GGUF type in the file, e.g. ``{"Q8_0": 211, "F32": 61}``."""
    notes: list[str] = field(default_factory=list)
    """Fallback types and where the tokenizer metadata came from."""


def to_rotate_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of ``q_proj`` / ``k_proj`` ([heads * head_dim, ...], or a bias [heads * head_dim]) reordered from
    the rotate-halves layout of Hugging Face models to llama.cpp's adjacent-pairs layout, head by head."""
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def to_rotate_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`to_rotate_pairs`."""
    rest = weight.shape[1:]
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def padded_ffn_widths(model: PreTrainedModel, multiple: int) -> list[int]:
    """Every layer's FFN width rounded up to a multiple of ``multiple``."""
    return [math.ceil(w.ffn_channels / multiple) * multiple for w in block_shape(model.config).layers]


def _pad(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros appended along ``dim`` up to ``size``."""
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    zeros = tensor.new_zeros(*tensor.shape[:dim], missing, *tensor.shape[dim + 1 :])
    return torch.cat([tensor.detach(), zeros], dim=dim)


def block_tensors(model: PreTrainedModel, ffn_multiple: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the file with its GGUF name, in Hugging Face orientation ([out, in]; GGUF reverses it), in
    file order. Lazily: a reordered or padded copy exists only while the caller holds it.

    ``ffn_multiple``: every layer's FFN is widened to a multiple of it with zero channels (zero rows of
    ``gate_proj`` / ``up_proj`` and their biases, zero columns of ``down_proj``), which change no output:
    silu(0) * 0 = 0 meets a zero column. It lets block-quantized types take every ``down_proj`` row.
    """
    shape = block_shape(model.config)
    ffn_widths = padded_ffn_widths(model, ffn_multiple)
    embeddings = model.get_input_embeddings().weight
    yield "token_embd.weight", embeddings
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != embeddings.data_ptr():
        yield "output.weight", output.weight
    yield "output_norm.weight", model.get_submodule("model.norm").weight
    factors = rope_frequency_factors(model.config, shape.head_dim)
    if factors is not None:
        yield "rope_freqs.weight", factors
    names = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    for i, layer in enumerate(decoder_layers(model)):
        widths = shape.layers[i]
        heads = {"q_proj": widths.query_heads, "k_proj": widths.kv_heads}
        for norm, gguf_name in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            weight = layer.get_submodule(norm).weight
            assert isinstance(weight, torch.Tensor)
            yield f"blk.{i}.{gguf_name}.weight", weight
        for hf_name, linear in dense_linears(layer).items():
            for kind in ("weight", "bias"):
                value = getattr(linear, kind)
                if value is None:
                    continue
                if hf_name in heads:
                    value = to_rotate_pairs(value, heads[hf_name])
                if hf_name in ("gate_proj", "up_proj"):
                    value = _pad(value, ffn_widths[i], 0)
                elif hf_name == "down_proj" and kind == "weight":
                    value = _pad(value, ffn_widths[i], 1)
                yield f"blk.{i}.{names[hf_name]}.{kind}", value


def gguf_coverage(family: Family) -> str:
    """Why a family is not exported, and which are."""
    covered = ", ".join(f.model_type for f in FAMILIES.values() if f.gguf)
    return f"the GGUF export does not write {family.name} models ({family.model_type}); it covers {covered}"


def _check_layers(model: PreTrainedModel) -> None:
    family = family_of(model.config)
    if not family.gguf:
        raise GgufExportError(gguf_coverage(family))
    shape = block_shape(model.config)
    if shape.head_dim % 2:
        raise GgufExportError(f"head_dim {shape.head_dim} is odd; rotary embeddings need an even head size")
    for i, widths in enumerate(shape.layers):
        if widths.query_heads == 0 or widths.kv_heads == 0 or widths.ffn_channels == 0:
            raise GgufExportError(f"layer {i} has no attention heads or no FFN channels; the engine cannot run it")


def _rope_parameters(config: Any) -> dict[str, Any]:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise GgufExportError(f"rope scaling {rope_type!r} is not supported by the GGUF export (plain RoPE and llama3)")
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GgufExportError("the configuration names no rope_theta")
    return parameters | {"rope_type": rope_type, "rope_theta": float(theta)}


def _rope_theta(config: Any) -> float:
    return float(_rope_parameters(config)["rope_theta"])


def rope_frequency_factors(config: Any, head_dim: int) -> torch.Tensor | None:
    """Llama 3's rope scaling as llama.cpp's ``rope_freqs.weight`` [head_dim / 2] (float32): the divisor of each
    rotary frequency; None for plain RoPE. 1 for high frequencies, ``factor`` for low ones, and between them
    the smooth interpolation of transformers' ``llama3`` rope type."""
    parameters = _rope_parameters(config)
    if parameters["rope_type"] == "default":
        return None
    theta, factor = parameters["rope_theta"], float(parameters["factor"])
    low, high = float(parameters.get("low_freq_factor", 1.0)), float(parameters.get("high_freq_factor", 4.0))
    context = float(parameters["original_max_position_embeddings"])
    frequencies = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelengths = 2 * math.pi / frequencies
    smooth = (context / wavelengths - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelengths > context / low, torch.full_like(wavelengths, factor), medium)
    return torch.where(wavelengths < context / high, torch.ones_like(wavelengths), factors).float()


def add_hyperparameters(
    writer: gguf.GGUFWriter, model: PreTrainedModel, tensor_type: TensorType, ffn_multiple: int
) -> None:
    """The ``deci.*`` keys: sizes, per-layer head counts and FFN widths, head size, RoPE, norm epsilon."""
    config, shape = model.config, block_shape(model.config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(shape.hidden_size)
    writer.add_block_count(shape.num_layers)
    writer.add_feed_forward_length([int(w) for w in padded_ffn_widths(model, ffn_multiple)])
    writer.add_head_count([int(w.query_heads) for w in shape.layers])
    writer.add_head_count_kv([int(w.kv_heads) for w in shape.layers])
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(tensor_type.file_type)


def copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every ``tokenizer.*`` key of the GGUF file ``source``, with its type."""
    reader = gguf.GGUFReader(source)
    for name, value in reader.fields.items():
        if name.startswith("tokenizer."):
            sub_type = value.types[-1] if value.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, value.contents(), value.types[0], sub_type)


LLAMA3_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# llama.cpp's pre-tokenizer names by the regular expression of a tokenizer.json ``Split`` step (followed by
# ByteLevel without its own regex) and the BPE model's ``ignore_merges`` (a whole word in the vocabulary is one
# token, before any merge): each regex is the "original regex from tokenizer.json" that llama.cpp's
# src/llama-vocab.cpp gives for the pre-tokenizer type it loads under that name, and only ``llama-bpe`` is loaded
# with ignore_merges (llama-cpp-python 0.3.36)
SPLIT_REGEX_PRE_TOKENIZERS = {
    (LLAMA3_SPLIT_REGEX, True): "llama-bpe",  # Llama 3
    (LLAMA3_SPLIT_REGEX, False): "smaug-bpe",  # the same split, every word through the merges
    (QWEN2_SPLIT_REGEX, False): "qwen2",  # Qwen2, Qwen2.5, Qwen3
}


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name of a byte-level BPE tokenizer's pre-tokenizer, or None when not recognised.

    Plain byte-level splitting is ``gpt-2``; single digits split first, then byte-level, is ``smollm``; a
    ``Split`` by one of the regular expressions of ``SPLIT_REGEX_PRE_TOKENIZERS``, then byte-level without its
    own regex, is the name that table gives for the BPE model's ``ignore_merges`` (``llama-bpe``, ``smaug-bpe``,
    ``qwen2``). llama.cpp loads ``gpt-2`` and ``smollm`` without ignore_merges, so a tokenizer with it is not
    recognised as either.
    """
    ignore_merges = bool(tokenizer_json.get("model", {}).get("ignore_merges", False))
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not ignore_merges:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and not ignore_merges:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex", "")
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            return SPLIT_REGEX_PRE_TOKENIZERS.get((regex, ignore_merges))
    return None


def add_hf_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> str:
    """The ``tokenizer.*`` keys of a Hugging Face BPE tokenizer, as llama.cpp's converter writes them: byte-level
    BPE (GPT-2 style: llama.cpp's ``gpt2`` model, :func:`add_byte_level_bpe`) or SentencePiece-style BPE with byte
    fallback (Llama 2, Mistral: its ``llama`` model, :func:`add_sentencepiece_bpe`).

    Special token ids and the chat template come from ``gguf.SpecialVocab``. Returns a note on the tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GgufExportError("the tokenizer is not a fast (tokenizers) tokenizer; the GGUF export needs one")
    description = json.loads(backend.to_str())
    model = description["model"]
    byte_level = (description.get("decoder") or {}).get("type") == "ByteLevel"
    if model["type"] == "BPE" and byte_level:
        note = add_byte_level_bpe(writer, tokenizer, description, vocab_size)
    elif model["type"] == "BPE" and model.get("byte_fallback"):
        note = add_sentencepiece_bpe(writer, tokenizer, description, vocab_size)
    else:
        raise GgufExportError(
            f"the tokenizer is {model['type']} without byte-level decoding or byte fallback; the GGUF export writes "
            "byte-level BPE (GPT-2 style) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral) tokenizers"
        )
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        special = gguf.SpecialVocab(directory, load_merges=byte_level, n_vocab=vocab_size)
    bos = tokenizer.bos_token_id
    special.add_special_token["bos"] = bos is not None and tokenizer("a").input_ids[:1] == [bos]  # as it tokenizes
    special.add_to_gguf(writer, quiet=True)
    return note


def tokens_and_types(
    tokenizer: PreTrainedTokenizerBase, description: dict, vocab_size: int, sentencepiece: bool
) -> tuple[list[str], list[gguf.TokenType]]:
    """Each id's token text and llama.cpp token type, as its converter sets them: ids the tokenizer lacks (the
    model's vocabulary may be larger) ``[PADi]`` UNUSED, special added tokens CONTROL, other added tokens
    USER_DEFINED, the rest NORMAL; with ``sentencepiece``, also the unknown token UNKNOWN and ``<0xXX>`` BYTE."""
    by_id = {i: token for token, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    unknown = description["model"].get("unk_token") or tokenizer.unk_token
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if sentencepiece and token == unknown:
            types.append(gguf.TokenType.UNKNOWN)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_byte_level_bpe(
    writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, description: dict, vocab_size: int
) -> str:
    """llama.cpp's ``gpt2`` tokenizer model: tokens and types (:func:`tokens_and_types`), the merges (through
    ``gguf.SpecialVocab``) and the pre-tokenizer's name (:func:`pre_tokenizer_name`)."""
    tokens, types = tokens_and_types(tokenizer, description, vocab_size, sentencepiece=False)
    pre = pre_tokenizer_name(description)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if pre is None:
        return "tokenizer: its pre-tokenizer is not one the export recognises; llama.cpp's default is written"
    return f"tokenizer: from the Hugging Face tokenizer (byte-level BPE, pre-tokenizer {pre})"


def prepends_space(description: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts ``▁`` before the text (a ``Prepend`` normalizer, or a
    ``Metaspace`` pre-tokenizer whose prepend scheme is not ``never``): llama.cpp's ``add_space_prefix``."""
    normalizer = description.get("normalizer") or {}
    normalizers = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    pre = description.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "Prepend" for step in normalizers) or any(
        step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never" for step in steps
    )


def add_sentencepiece_bpe(
    writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, description: dict, vocab_size: int
) -> str:
    """llama.cpp's ``llama`` (SentencePiece) tokenizer model from a BPE ``tokenizer.json`` with byte fallback.

    llama.cpp joins the adjacent pair whose join is the token of highest score, where the Hugging Face tokenizer
    applies the merge of lowest rank; a token's score is therefore minus the rank of the first merge that makes it
    (0 for tokens no merge makes). Tokens and types from :func:`tokens_and_types`, ``add_space_prefix`` from
    :func:`prepends_space`."""
    model = description["model"]
    first_merge: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_merge.setdefault(left + right, rank)
    tokens, types = tokens_and_types(tokenizer, description, vocab_size, sentencepiece=True)
    scores = [-float(first_merge.get(token, 0)) for token in tokens]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prepends_space(description))
    return "tokenizer: from the Hugging Face tokenizer (SentencePiece-style BPE with byte fallback)"


def _matrix_data(tensor: torch.Tensor, tensor_type: TensorType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The bytes of one weight matrix in the export's type, or in float16 when its rows do not split into blocks."""
    values = tensor.detach().to(torch.float32).cpu().numpy()
    wanted = tensor_type.matrix_type
    if wanted == GGMLQuantizationType.F32:
        return values, wanted
    if wanted == GGMLQuantizationType.F16:
        return values.astype(np.float16), wanted
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if values.shape[-1] % block:
        return values.astype(np.float16), GGMLQuantizationType.F16
    return gguf.quants.quantize(values, wanted), wanted


def _engine_quantize(source: Path, target: Path, file_type: LlamaFileType, threads: int = 0) -> None:
    """llama.cpp's quantizer (``llama-cpp-python``): ``source`` (f16) to ``file_type`` in ``target``."""
    try:
        import llama_cpp
    except ImportError:
        raise GgufExportError(
            "k-quant types need llama.cpp's quantizer: pip install 'prune[engine]' (see docs/deploy.md)"
        ) from None
    parameters = llama_cpp.llama_model_quantize_default_params()
    parameters.ftype = int(file_type)
    parameters.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(parameters))
    if status != 0:
        raise GgufExportError(f"llama.cpp's quantizer failed on {source.name} (status {status})")


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    tensor_type: str,
    tokenizer_source: Path | None = None,
    name: str | None = None,
    ffn_multiple: int | None = None,
) -> GgufWritten:
    """Write ``model`` (a causal LM of a supported family, any per-layer widths) as a GGUF file at ``path``.

    ``tokenizer_source``: a GGUF file whose tokenizer keys are copied (the model's own source file);
    otherwise the keys are built from ``tokenizer``. ``name`` goes into ``general.name``.
    ``ffn_multiple``: FFN widths padded with zero channels to a multiple of it (:func:`block_tensors`);
    default: the block size of the final type (32 for q8_0, 256 for the k-quants, whose rows llama.cpp's quantizer
    otherwise writes in another type, f16 among them), else none. The file is written
    atomically: a failed export leaves nothing at ``path``.
    """
    if tensor_type not in TENSOR_TYPES:
        raise GgufExportError(f"tensor type {tensor_type!r} is not one of {', '.join(TENSOR_TYPES)}")
    kind = TENSOR_TYPES[tensor_type]
    _check_layers(model)
    if ffn_multiple is None:
        blocked = kind.matrix_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        if kind.engine_quantized:
            ffn_multiple = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][0]  # every k-quant's super-block: 256
        else:
            ffn_multiple = gguf.GGML_QUANT_SIZES[kind.matrix_type][0] if blocked else 1
    notes: list[str] = []
    added = sum(padded_ffn_widths(model, ffn_multiple)) - sum(w.ffn_channels for w in block_shape(model.config).layers)
    if added:
        hidden = block_shape(model.config).hidden_size
        notes.append(
            f"FFN widths padded with {added:,} zero channels ({3 * added * hidden:,} zero weights) to multiples "
            f"of {ffn_multiple}, so that {tensor_type} takes every ffn_down row; the outputs are unchanged"
        )
    with atomic_path(path) as temporary:
        written = temporary.with_name(temporary.name + ".f16") if kind.engine_quantized else temporary
        try:
            # each tensor's bytes go to an unnamed file beside the output as soon as they are made, not into a list
            # of every tensor in memory: the export adds one tensor's copies to the model's memory, not the file's
            writer = gguf.GGUFWriter(written, arch=ARCHITECTURE, use_temp_file=True)
            writer.temp_file = tempfile.TemporaryFile(dir=written.parent)  # noqa: SIM115 (the writer closes it)
            writer.add_name(name or type(model).__name__)
            add_hyperparameters(writer, model, kind, ffn_multiple)
            if tokenizer_source is not None:
                copy_tokenizer(writer, tokenizer_source)
                notes.append(f"tokenizer: copied from {tokenizer_source.name}")
            else:
                notes.append(add_hf_tokenizer(writer, tokenizer, int(model.config.vocab_size)))
            fallback = []
            with resident(model.modules(), torch.device("cpu")):  # offloaded weights (device_map) read into memory
                for tensor_name, tensor in block_tensors(model, ffn_multiple):
                    if tensor.dim() == 1:
                        writer.add_tensor(tensor_name, tensor.detach().to(torch.float32).cpu().numpy())
                        continue
                    data, data_type = _matrix_data(tensor, kind)
                    if data_type != kind.matrix_type:
                        fallback.append(tensor_name)
                    writer.add_tensor(tensor_name, data, raw_dtype=data_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            if fallback:
                notes.append(
                    f"{len(fallback)} matrices in F16 (rows not a multiple of the {tensor_type} block): "
                    + ", ".join(fallback[:4])
                    + (", ..." if len(fallback) > 4 else "")
                )
            if kind.engine_quantized:
                _engine_quantize(written, temporary, kind.file_type)
        finally:
            if written != temporary:
                written.unlink(missing_ok=True)
        types = tensor_type_counts(temporary)
    if kind.engine_quantized:
        notes.append("types after llama.cpp's quantizer: " + ", ".join(f"{t} {n}" for t, n in types.items()))
    return GgufWritten(path, tensor_type, block_shape(model.config).num_layers, types, notes)


def tensor_type_counts(path: Path) -> dict[str, int]:
    """Tensors per GGUF type in a file, most frequent first."""
    counts = Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors)
    return dict(counts.most_common())
