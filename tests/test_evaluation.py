"""Perplexity and the speed machinery on tiny models."""

import math

import torch

from conftest import random_tokens, tiny_model
from eval.perplexity import perplexity, window_count
from eval.speed import measure_speed, prefill_and_decode


def test_perplexity_equals_token_by_token_computation():
    model = tiny_model()
    tokens = random_tokens(1, 100)[0]
    result = perplexity(model, tokens, seqlen=30, windows=None, progress=False)
    assert result["windows"] == 3 and result["predicted_tokens"] == 87
    nll = 0.0
    with torch.no_grad():
        for k in range(3):
            window = tokens[30 * k:30 * (k + 1)]
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), -1)
            nll -= sum(float(log_probs[t, window[t + 1]]) for t in range(29))
    assert math.isclose(result["perplexity"], math.exp(nll / 87), rel_tol=1e-5)
    assert perplexity(model, tokens, seqlen=30, windows=2, progress=False)["windows"] == 2
    assert window_count(100, 30, 10) == 3 and window_count(100, 30, 1) == 1


def test_decode_loop_is_greedy_generation_with_cache():
    model = tiny_model()
    prompt = random_tokens(2, 9)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    # re-run the timed loop, recording tokens, by wrapping the model's forward
    seen = []
    original = model.forward

    def recording_forward(*args, **kwargs):
        seen.append(kwargs["input_ids"])
        return original(*args, **kwargs)

    model.forward = recording_forward
    prefill_s, decode_s = prefill_and_decode(model, prompt, new_tokens=6)
    assert prefill_s > 0 and decode_s > 0
    assert torch.equal(seen[0], prompt) and all(t.shape == (2, 1) for t in seen[1:])
    assert torch.equal(torch.cat(seen[1:], dim=1), expected[:, 9:])


def test_measure_speed_reports_every_model():
    small = tiny_model(ffn=16)
    results = measure_speed({"a": tiny_model(), "b": small}, prompt_tokens=8, batch_size=2, new_tokens=4,
                            warmup=1, repeats=3, progress=False)
    for result in results.values():
        assert result.prefill_ms_min <= result.prefill_ms_median <= result.prefill_ms_max
        assert result.decode_tokens_per_s_min <= result.decode_tokens_per_s_median <= result.decode_tokens_per_s_max
        assert result.peak_memory_bytes >= result.weight_bytes > 0
    assert results["b"].weight_bytes < results["a"].weight_bytes


def test_report_of_a_layer_removal_run_names_the_removed_layers():
    from eval.report import render_markdown
    from prune.allocation import remove_layers
    from prune.blocks import block_shape
    from prune.recipe import Recipe, recipe_to_dict
    from prune.run import layer_table
    from prune.statistics import collect_statistics

    model = tiny_model()
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(2, 8), "max_logit", progress=False)
    allocation = remove_layers(shape, stats, 1)
    influence = allocation.block_influence
    assert allocation.plans[influence.index(min(influence))] is None and sum(p is None for p in allocation.plans) == 1
    rows = layer_table(shape, allocation)
    recipe = Recipe()
    recipe.scoring.method, recipe.pruning.reconstruct = "shortgpt", "none"
    report = {"model": {"source": "tiny", "model_type": "llama"}, "recipe": recipe_to_dict(recipe),
              "parameters": {"dense": {"total": 10, "decoder_blocks": 8}, "pruned": {"total": 9, "decoder_blocks": 7},
                             "removed_fraction": 0.1},
              "layers": rows, "perplexity": None, "speed": None, "statistics": None, "notes": [],
              "checkpoint": {"path": "x", "remote_code": False}, "stage_seconds": {}}
    text = render_markdown(report)
    removed = influence.index(min(influence))
    assert f"| {removed} | removed | removed | removed |" in text and "whole layers, lowest Block Influence first" in text


def test_linear_macs_per_token_counts_every_linear_and_the_lm_head():
    from eval.speed import linear_macs_per_token
    from prune.pruner import LayerPlan, prune_model

    model = tiny_model()  # 3 layers, hidden 96, 6 heads of 16, 2 KV heads, FFN 64, vocab 128, tied lm_head
    per_layer = 96 * 96 + 2 * 32 * 96 + 96 * 96 + 3 * 64 * 96
    assert linear_macs_per_token(model) == 3 * per_layer + 128 * 96
    pruned = prune_model(model, [LayerPlan((0, 1, 3, 4), (0, 1), tuple(range(32)))] * 3)
    assert linear_macs_per_token(pruned) == 3 * (64 * 96 + 2 * 32 * 96 + 96 * 64 + 3 * 32 * 96) + 128 * 96
