"""Exported GGUF files in llama.cpp (needs the optional llama-cpp-python binding; skipped without it)."""

import numpy as np
import pytest
import torch
from conftest import (
    MIXED_PLANS,
    byte_level_tokenizer,
    sentencepiece_style_tokenizer,
    tiny_model,
    word_beyond_its_merges_tokenizer,
    word_text,
)

from eval.engine import (
    ENGINE_UBATCH,
    engine_available,
    engine_logits,
    engine_perplexity,
    engine_speed,
    greedy_tokens,
    open_gguf,
    window_nll,
)
from eval.perplexity import perplexity
from prune.gguf_export import LLAMA3_SPLIT_REGEX, SPLIT_REGEX_PRE_TOKENIZERS, write_gguf
from prune.pruner import prune_model

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not engine_available(), reason="llama-cpp-python is not installed (pip install 'prune[engine]')"
    ),
]


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # head_dim 16: frequencies in each of llama3's three bands
}


def _pruned(family: str):
    """A pruned tiny model of ``family``; ``llama3``: Llama with Llama 3's rope scaling."""
    tokenizer = byte_level_tokenizer()
    rope = LLAMA3_ROPE if family == "llama3" else None
    model = tiny_model(family.replace("llama3", "llama"), layers=4, vocab=len(tokenizer), ffn=64, rope=rope)
    plans = MIXED_PLANS
    pruned = prune_model(model, plans, output_bias=True)
    with torch.no_grad():
        for layer in pruned.model.layers:
            layer.self_attn.o_proj.bias.normal_(0, 0.1)
            layer.mlp.down_proj.bias.normal_(0, 0.1)
    return pruned, tokenizer


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2"])
def test_f32_file_gives_the_models_logits_and_greedy_tokens(tmp_path, family):
    pruned, tokenizer = _pruned(family)
    write_gguf(pruned, tokenizer, tmp_path / "m.gguf", "f32")
    prompts = [tokenizer(word_text(12, seed=s)).input_ids for s in range(8)]
    with open_gguf(tmp_path / "m.gguf", 128, 1, all_logits=True, exact_cache=True) as llm:
        logits = engine_logits(llm, prompts[0])
        engine_tokens = [greedy_tokens(llm, ids, 16) for ids in prompts]
    pruned.generation_config.eos_token_id = None  # the engine's loop does not stop at an end token either
    with torch.no_grad():
        expected = pruned(torch.tensor([prompts[0]])).logits[0].numpy()
        model_tokens = [
            pruned.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
            for ids in prompts
        ]
    assert np.abs(logits - expected).max() < 1e-4 * np.abs(expected).max()
    assert engine_tokens == model_tokens


# the text llama.cpp's converter tokenizes to tell pre-tokenizers apart (convert_hf_to_gguf.py), and some words
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL "
)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smaug-bpe", "qwen2"])
def test_the_files_tokenizer_splits_text_as_the_hugging_face_tokenizer_does(tmp_path, pre):
    from llama_cpp import Llama

    regex, ignore_merges = {name: key for key, name in SPLIT_REGEX_PRE_TOKENIZERS.items()}.get(pre, (None, False))
    # trained on the check text too, so that its merges join what one pre-tokenizer keeps together and another splits
    tokenizer = byte_level_tokenizer(
        600, split_regex=regex, ignore_merges=ignore_merges, extra_text=PRE_TOKENIZER_CHECK_TEXT * 20
    )
    model = tiny_model("llama", layers=1, vocab=len(tokenizer), ffn=32)
    written = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert f"pre-tokenizer {pre})" in written.notes[0]
    text = PRE_TOKENIZER_CHECK_TEXT + word_text(200, seed=4)
    llm = Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        engine_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    assert engine_ids == tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_a_word_in_the_vocabulary_that_its_merges_do_not_make_is_split_as_the_tokenizer_splits_it(
    tmp_path, ignore_merges
):
    from llama_cpp import Llama

    tokenizer = word_beyond_its_merges_tokenizer(LLAMA3_SPLIT_REGEX, ignore_merges)
    model = tiny_model("llama", layers=1, vocab=len(tokenizer), ffn=32)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    text = "abc cab abc"
    llm = Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        engine_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    expected = tokenizer(text, add_special_tokens=False).input_ids
    assert len(expected) == (7 if ignore_merges else 8)  # the first "abc" one token or "a", "bc"
    assert engine_ids == expected


def test_a_sentencepiece_style_tokenizers_file_gives_its_ids(tmp_path):
    from llama_cpp import Llama

    tokenizer = sentencepiece_style_tokenizer()
    model = tiny_model("llama", layers=1, vocab=len(tokenizer), ffn=32)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    # not a text that starts with a space: transformers' Metaspace then adds no ▁ where SentencePiece and llama.cpp do
    texts = [PRE_TOKENIZER_CHECK_TEXT + word_text(200, seed=4), word_text(30, seed=5), "two  spaces\nand a line"]
    llm = Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        engine_ids = [
            llm.tokenize(text.encode(), add_bos=llm.metadata["tokenizer.ggml.add_bos_token"] == "true", special=False)
            for text in texts
        ]
    finally:
        llm.close()
    assert engine_ids == [tokenizer(text).input_ids for text in texts]  # <s> first, as the file says


def test_zero_channels_that_pad_the_ffn_change_no_logit(tmp_path):
    pruned, tokenizer = _pruned("llama")
    write_gguf(pruned, tokenizer, tmp_path / "m.gguf", "f32", ffn_multiple=48)  # widths 32, 40, 64 -> 48, 48, 96
    ids = tokenizer(word_text(20, seed=3)).input_ids
    with open_gguf(tmp_path / "m.gguf", 64, 1, all_logits=True, exact_cache=True) as llm:
        logits = engine_logits(llm, ids)
    with torch.no_grad():
        expected = pruned(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits - expected).max() < 1e-4 * np.abs(expected).max()


def test_perplexity_in_the_engine_equals_the_models(tmp_path):
    pruned, tokenizer = _pruned("llama")
    write_gguf(pruned, tokenizer, tmp_path / "m.gguf", "f32")
    text = torch.tensor(tokenizer(word_text(400, seed=5)).input_ids)
    expected = perplexity(pruned, text, 32, 4, progress=False)
    with open_gguf(tmp_path / "m.gguf", 32, 1, all_logits=False, exact_cache=True) as llm:
        measured = engine_perplexity(llm, text, 32, 4, progress=False)
    assert measured["windows"] == 4 and measured["predicted_tokens"] == expected["predicted_tokens"]
    assert abs(measured["perplexity"] / expected["perplexity"] - 1) < 1e-4


@pytest.mark.parametrize("seqlen", [ENGINE_UBATCH + 100, 2 * ENGINE_UBATCH + 1])
def test_a_window_longer_than_the_engines_batch_gives_the_models_perplexity(tmp_path, seqlen):
    """One window decoded in several calls of ENGINE_UBATCH positions (the last one partial, or the window's last
    token alone left over: it is only a target), each longer than window_nll's row chunks."""
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", layers=2, vocab=len(tokenizer))
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    text = torch.tensor(tokenizer(word_text(800, seed=5)).input_ids)
    expected = perplexity(model, text, seqlen, 1, progress=False)
    with open_gguf(tmp_path / "m.gguf", seqlen, 1, all_logits=False, exact_cache=True) as llm:
        measured = engine_perplexity(llm, text, seqlen, 1, progress=False)
    assert measured["predicted_tokens"] == expected["predicted_tokens"] == seqlen - 1
    assert abs(measured["perplexity"] / expected["perplexity"] - 1) < 1e-4


def test_window_nll_in_chunks_equals_the_whole_log_softmax():
    logits = np.random.default_rng(0).normal(0, 3, (10, 7)).astype(np.float32)
    window = [3, 1, 4, 1, 5, 6, 2, 6, 5, 3]
    whole = -torch.log_softmax(torch.from_numpy(logits[:9]).double(), -1)[torch.arange(9), torch.tensor(window[1:])]
    assert window_nll(logits, window, rows=4) == pytest.approx(float(whole.sum()), rel=1e-12)
    assert window_nll(logits, window, rows=4) == pytest.approx(window_nll(logits, window, rows=256), rel=1e-12)


def test_k_quant_files_pad_the_ffn_so_that_every_ffn_down_is_k_quantized(tmp_path):
    """llama.cpp's quantizer writes a row of a width that is no multiple of 256 in another type (f16 for 300)."""
    import gguf

    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", layers=2, hidden=256, heads=4, kv_heads=2, ffn=300, vocab=len(tokenizer))
    written = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_k_m")
    down = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if "ffn_down" in t.name}
    assert len(down) == 2 and set(down.values()) <= {"Q4_K", "Q6_K"}, down
    assert any("to multiples of 256" in note for note in written.notes)


def test_speed_reports_every_file(tmp_path):
    pruned, tokenizer = _pruned("llama")
    write_gguf(pruned, tokenizer, tmp_path / "a.gguf", "f16")
    write_gguf(pruned, tokenizer, tmp_path / "b.gguf", "q8_0")
    paths = {"a": tmp_path / "a.gguf", "b": tmp_path / "b.gguf"}
    results = engine_speed(paths, prompt_tokens=16, new_tokens=4, warmup=1, repeats=2, threads=1, progress=False)
    for name, result in results.items():
        assert result.prompt_tokens_per_s_min <= result.prompt_tokens_per_s_median <= result.prompt_tokens_per_s_max
        assert 0 < result.decode_tokens_per_s_min <= result.decode_tokens_per_s_max
        assert result.file_bytes == paths[name].stat().st_size
    assert results["b"].file_bytes < results["a"].file_bytes
