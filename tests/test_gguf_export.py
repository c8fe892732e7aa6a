"""GGUF export without the engine: the file read back with gguf.GGUFReader equals the checkpoint's tensors."""

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import MIXED_PLANS, byte_level_tokenizer, sentencepiece_style_tokenizer, tiny_model

from prune.gguf_export import (
    QWEN2_SPLIT_REGEX,
    SPLIT_REGEX_PRE_TOKENIZERS,
    GgufExportError,
    to_rotate_halves,
    to_rotate_pairs,
    write_gguf,
)
from prune.pruner import prune_model


def _rope_halves(x: torch.Tensor, position: int, base: float = 10000.0) -> torch.Tensor:
    """Hugging Face RoPE of one head [head_dim]: dimension i rotates with i + head_dim/2 (rotate_half)."""
    half = x.shape[0] // 2
    angle = position * base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[0])
    first, second = x[:half], x[half:]
    return torch.cat([first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()])


def _rope_pairs(x: torch.Tensor, position: int, base: float = 10000.0) -> torch.Tensor:
    """llama.cpp's normal RoPE of one head [head_dim]: dimensions 2i and 2i+1 rotate together."""
    half = x.shape[0] // 2
    angle = position * base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[0])
    even, odd = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2], out[1::2] = even * angle.cos() - odd * angle.sin(), odd * angle.cos() + even * angle.sin()
    return out


def test_permuted_rows_under_the_engines_rope_give_the_models_rope():
    heads, head_dim, hidden = 3, 8, 5
    weight = torch.randn(heads * head_dim, hidden, dtype=torch.float64)
    x = torch.randn(hidden, dtype=torch.float64)
    for position in (0, 3, 17):
        hf = torch.cat([_rope_halves(h, position) for h in (weight @ x).view(heads, head_dim)])
        engine = torch.cat(
            [_rope_pairs(h, position) for h in (to_rotate_pairs(weight, heads) @ x).view(heads, head_dim)]
        )
        torch.testing.assert_close(engine, to_rotate_pairs(hf, heads))  # same vector, the engine's row order
    assert torch.equal(to_rotate_halves(to_rotate_pairs(weight, heads), heads), weight)
    assert not torch.equal(to_rotate_pairs(weight, heads), weight)


def _pruned(family="llama", output_bias=True):
    """A tiny pruned model: per-layer widths, the middle of 4 layers removed, output biases filled."""
    tokenizer = byte_level_tokenizer()
    model = tiny_model(family, layers=4, vocab=len(tokenizer), ffn=64)
    plans = MIXED_PLANS
    pruned = prune_model(model, plans, output_bias=output_bias)
    if output_bias:
        with torch.no_grad():
            for layer in pruned.model.layers:
                layer.self_attn.o_proj.bias.normal_(0, 0.1)
                layer.mlp.down_proj.bias.normal_(0, 0.1)
    return pruned, tokenizer


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_f32_file_holds_the_checkpoint_exactly(tmp_path, family):
    pruned, tokenizer = _pruned(family)
    written = write_gguf(pruned, tokenizer, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = _fields(reader)
    assert fields["general.architecture"] == "deci" and written.layers == 3
    assert fields["deci.block_count"] == 3
    assert fields["deci.attention.head_count"] == [3, 4, 6]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 2]
    assert fields["deci.feed_forward_length"] == [32, 40, 64]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 16
    assert fields["deci.embedding_length"] == 96 and fields["deci.vocab_size"] == 300
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied to the embeddings
    assert not any(name.startswith("blk.3.") for name in tensors)  # renumbered after the removed layer

    def read(name):
        t = tensors[name]
        return torch.from_numpy(np.array(t.data)).reshape([int(n) for n in reversed(t.shape)])

    layers = pruned.model.layers
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv_heads = attn.q_proj.weight.shape[0] // 16, attn.k_proj.weight.shape[0] // 16
        assert torch.equal(to_rotate_halves(read(f"blk.{i}.attn_q.weight"), heads), attn.q_proj.weight)
        assert torch.equal(to_rotate_halves(read(f"blk.{i}.attn_k.weight"), kv_heads), attn.k_proj.weight)
        assert torch.equal(read(f"blk.{i}.attn_v.weight"), attn.v_proj.weight)
        assert torch.equal(read(f"blk.{i}.attn_output.weight"), attn.o_proj.weight)
        assert torch.equal(read(f"blk.{i}.attn_output.bias"), attn.o_proj.bias)
        assert torch.equal(read(f"blk.{i}.ffn_down.weight"), mlp.down_proj.weight)
        assert torch.equal(read(f"blk.{i}.ffn_down.bias"), mlp.down_proj.bias)
        assert torch.equal(read(f"blk.{i}.ffn_gate.weight"), mlp.gate_proj.weight)
        assert torch.equal(read(f"blk.{i}.attn_norm.weight"), layer.input_layernorm.weight)
        if family == "qwen2":
            assert torch.equal(to_rotate_halves(read(f"blk.{i}.attn_q.bias"), heads), attn.q_proj.bias)
            assert torch.equal(to_rotate_halves(read(f"blk.{i}.attn_k.bias"), kv_heads), attn.k_proj.bias)
    assert torch.equal(read("token_embd.weight"), pruned.model.embed_tokens.weight)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert (
        fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "!", '"']
        and len(fields["tokenizer.ggml.tokens"]) == 300
    )
    assert fields["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.merges"]) == 300 - 257  # 256 bytes + one special token, the rest merges
    assert fields["tokenizer.ggml.eos_token_id"] == 0 and fields["tokenizer.ggml.add_bos_token"] is False


def test_q8_0_pads_ffn_widths_quantizes_what_splits_into_blocks_and_names_the_rest(tmp_path):
    pruned, tokenizer = _pruned()
    written = write_gguf(pruned, tokenizer, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    # FFN widths 32, 40, 64 padded with zero channels to multiples of 32; every ffn_down row then takes q8_0
    assert reader.fields["deci.feed_forward_length"].contents() == [32, 64, 64]
    assert tensors["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert [int(n) for n in tensors["blk.1.ffn_up.weight"].shape] == [96, 64]
    assert any("padded with 24 zero channels" in note for note in written.notes)
    down = gguf.quants.dequantize(np.array(tensors["blk.1.ffn_down.weight"].data), gguf.GGMLQuantizationType.Q8_0)
    up = gguf.quants.dequantize(np.array(tensors["blk.1.ffn_up.weight"].data), gguf.GGMLQuantizationType.Q8_0)
    assert not down.reshape(96, 64)[:, 40:].any() and not up.reshape(64, 96)[40:].any()  # the padding is zero
    expected = pruned.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.abs(down.reshape(96, 64)[:, :40] - expected).max() < 0.01 * np.abs(expected).max()
    # o_proj of layer 0 reads 3 heads of 16 = 48 columns: no multiple of 32, so float16, and the notes say so
    assert tensors["blk.0.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert any("1 matrices in F16" in note and "blk.0.attn_output.weight" in note for note in written.notes)
    assert written.tensor_types["Q8_0"] == 21 and written.tensor_types["F16"] == 1


def test_the_export_holds_one_tensors_bytes_at_a_time_not_the_files(tmp_path, monkeypatch):
    """numpy's allocations are traced: the f16 copies of 16 layers' matrices (the whole file's bytes) were held until
    the file was written; now each goes to a temporary file beside the output as soon as it is made. The peak is
    read once the file is written, before it is read back for its type counts."""
    import tracemalloc

    import prune.gguf_export

    peaks = []

    def counted(path):
        peaks.append(tracemalloc.get_traced_memory()[1])
        return gguf_tensor_type_counts(path)

    gguf_tensor_type_counts = prune.gguf_export.tensor_type_counts
    monkeypatch.setattr(prune.gguf_export, "tensor_type_counts", counted)
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", layers=16, vocab=len(tokenizer), ffn=256)
    tracemalloc.start()
    try:
        write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    finally:
        tracemalloc.stop()
    (peak,) = peaks
    largest = 96 * 256 * 2  # one FFN matrix in float16
    file_bytes = (tmp_path / "m.gguf").stat().st_size
    assert file_bytes > 30 * largest and peak < 6 * largest, (peak, file_bytes)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # the temporary file is gone


@pytest.mark.parametrize(
    ("split_regex", "ignore_merges", "pre"),
    [(regex, ignore_merges, name) for (regex, ignore_merges), name in SPLIT_REGEX_PRE_TOKENIZERS.items()]
    + [(r"\p{L}+|\s+", False, "default"), (QWEN2_SPLIT_REGEX, True, "default"), (None, True, "default")],
)
def test_a_split_pre_tokenizer_is_named_by_its_regex_or_written_as_the_default(
    tmp_path, split_regex, ignore_merges, pre
):
    tokenizer = byte_level_tokenizer(split_regex=split_regex, ignore_merges=ignore_merges)
    model = tiny_model("llama", layers=1, vocab=len(tokenizer), ffn=32)
    written = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert _fields(gguf.GGUFReader(tmp_path / "m.gguf"))["tokenizer.ggml.pre"] == pre
    assert ("not one the export recognises" in written.notes[0]) == (pre == "default")


def test_a_sentencepiece_style_tokenizer_is_written_as_llama_cpps_llama_model(tmp_path):
    tokenizer = sentencepiece_style_tokenizer()
    model = tiny_model("llama", layers=1, vocab=len(tokenizer) + 4, ffn=32)  # 4 ids the tokenizer lacks
    written = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    fields = _fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert fields["tokenizer.ggml.model"] == "llama" and "SentencePiece-style" in written.notes[0]
    assert fields["tokenizer.ggml.add_space_prefix"] is True and fields["tokenizer.ggml.add_bos_token"] is True
    types, tokens = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.tokens"]
    T = gguf.TokenType
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL] and tokens[3] == "<0x00>"
    assert types.count(T.BYTE) == 256 and types[-4:] == [T.UNUSED] * 4
    # a piece's score is minus the rank of the first merge that makes it: later pieces score lower
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    first_rank = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    scores = dict(zip(tokens, fields["tokenizer.ggml.scores"], strict=True))
    assert all(scores[piece] == -rank for piece, rank in first_rank.items())
    assert len(first_rank) > 50 and scores["<0x41>"] == 0


def test_tokenizer_keys_copy_from_a_source_file_and_bad_types_are_refused(tmp_path):
    pruned, tokenizer = _pruned()
    write_gguf(pruned, tokenizer, tmp_path / "source.gguf", "f16")
    written = write_gguf(pruned, tokenizer, tmp_path / "copy.gguf", "f16", tokenizer_source=tmp_path / "source.gguf")
    source, copy = (_fields(gguf.GGUFReader(tmp_path / f)) for f in ("source.gguf", "copy.gguf"))
    assert {k: v for k, v in source.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in copy.items() if k.startswith("tokenizer.")
    }
    assert written.notes[0] == "tokenizer: copied from source.gguf"
    with pytest.raises(GgufExportError, match="tensor type 'q3' is not one of f32, f16"):
        write_gguf(pruned, tokenizer, tmp_path / "bad.gguf", "q3")
    assert not (tmp_path / "bad.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "copy.gguf",
        "source.gguf",
    ]


def test_a_bfloat16_checkpoint_exports_in_its_own_dtype_to_the_same_bytes(tmp_path):
    """``python -m prune.export`` loads a checkpoint in its stored dtype (half a float32 copy's memory): the file is
    the one its float32 copy gives, byte for byte; a GGUF source (no stored dtype) loads in float32."""
    from transformers import AutoConfig

    from prune.export import stored_dtype

    tokenizer = byte_level_tokenizer()
    model = tiny_model("qwen2", layers=2, vocab=len(tokenizer), ffn=64).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "checkpoint")
    assert stored_dtype(AutoConfig.from_pretrained(tmp_path / "checkpoint")) == "bfloat16"
    write_gguf(model, tokenizer, tmp_path / "bf16.gguf", "q8_0")
    write_gguf(model.float(), tokenizer, tmp_path / "f32.gguf", "q8_0")
    assert (tmp_path / "bf16.gguf").read_bytes() == (tmp_path / "f32.gguf").read_bytes()
    assert stored_dtype(AutoConfig.for_model("llama")) == "float32"
