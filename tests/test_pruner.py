"""Physical removal: equivalences that must hold exactly, GQA invariants, cached generation."""

import copy

import pytest
import torch
from conftest import FAMILY_TYPES, random_tokens, tiny_model

from eval.speed import cache_keyword
from prune.allocation import allocate
from prune.blocks import block_shape, count_parameters, decoder_layers, layer_linears, split_fused_projections
from prune.pruner import LayerPlan, check_plan, has_layer_widths, keep_everything, prune_model
from prune.recipe import AllocationSection, PruningSection
from prune.scoring import score_units

FAMILIES = FAMILY_TYPES


@pytest.mark.parametrize("family", FAMILIES)
def test_target_zero_changes_no_logit(family):
    model = tiny_model(family)
    shape = block_shape(model.config)
    scores = score_units(model, shape, "magnitude", "sum", None)
    allocation = allocate(
        shape, scores, 0, AllocationSection("uniform"), PruningSection(round_to=8, min_ffn_channels=8)
    )
    assert allocation.removed_parameters == 0
    pruned = prune_model(model, allocation.plans)
    x = random_tokens(2, 12)
    assert torch.equal(model(x).logits, pruned(x).logits)
    assert count_parameters(pruned) == count_parameters(model)


def _zero_units(model, layer, query_heads=(), kv_group=None, ffn_channels=()):
    """Zero the output-side weights of units so that they contribute nothing to the residual stream."""
    shape = block_shape(model.config)
    d, g = shape.head_dim, shape.layers[layer].heads_per_group
    block = decoder_layers(model)[layer]
    heads = list(query_heads) + ([] if kv_group is None else list(range(kv_group * g, (kv_group + 1) * g)))
    with torch.no_grad():
        for h in heads:
            block.self_attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
        for c in ffn_channels:
            block.mlp.down_proj.weight[:, c] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zeroed_units_changes_no_logit(family):
    model = tiny_model(family)  # 6 query heads, 2 KV heads (3 per group), 64 FFN channels, 3 layers
    _zero_units(model, 0, kv_group=1, ffn_channels=range(0, 64, 2))
    _zero_units(model, 1, query_heads=(0, 4), ffn_channels=(5, 6, 7))
    _zero_units(model, 2, kv_group=0)
    plans = [
        LayerPlan((0, 1, 2), (0,), tuple(range(1, 64, 2))),
        LayerPlan((1, 2, 3, 5), (0, 1), tuple(c for c in range(64) if c not in (5, 6, 7))),
        LayerPlan((3, 4, 5), (1,), tuple(range(64))),
    ]
    pruned = prune_model(model, plans)
    x = random_tokens(2, 12)
    torch.testing.assert_close(pruned(x).logits, model(x).logits, atol=1e-5, rtol=0)
    # and removing units that are NOT zero does change the logits (the check above can fail)
    other = prune_model(model, [LayerPlan((3, 4, 5), (1,), tuple(range(1, 64, 2)))] + plans[1:])
    assert (other(x).logits - model(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_gqa_invariants_after_pruning(family, unit):
    model = tiny_model(family, layers=4, heads=8, kv_heads=2, hidden=128, ffn=96)
    shape = block_shape(model.config)
    scores = score_units(model, shape, "magnitude", "sum", None)
    total = count_parameters(model)["total"]
    pruning = PruningSection(attention_unit=unit, round_to=8, min_ffn_channels=8)
    pruned = prune_model(model, allocate(shape, scores, int(0.4 * total), AllocationSection("uniform"), pruning).plans)
    pruned_shape = block_shape(pruned.config)
    assert pruned_shape.head_dim == shape.head_dim
    x = random_tokens(2, 12)
    logits = pruned(x).logits
    split_fused_projections(pruned)  # Phi-3: its fused qkv_proj / gate_up_proj as the 7 linears, same outputs
    torch.testing.assert_close(pruned(x).logits, logits, atol=1e-5, rtol=1e-5)
    for layer, widths in zip(decoder_layers(pruned), pruned_shape.layers, strict=True):
        attn, linears, d = layer.self_attn, layer_linears(layer), shape.head_dim
        assert widths.query_heads % widths.kv_heads == 0
        assert attn.num_key_value_groups == widths.query_heads // widths.kv_heads
        assert linears["q_proj"].weight.shape == (widths.query_heads * d, shape.hidden_size)
        assert (
            linears["k_proj"].weight.shape == linears["v_proj"].weight.shape == (widths.kv_heads * d, shape.hidden_size)
        )
        assert linears["o_proj"].weight.shape == (shape.hidden_size, widths.query_heads * d)
        assert linears["down_proj"].weight.shape == (shape.hidden_size, widths.ffn_channels)
        assert linears["gate_proj"].weight.shape == (widths.ffn_channels, shape.hidden_size)
        assert widths.ffn_channels % 8 == 0
        if unit == "kv_group":
            assert widths.heads_per_group == 4
        else:
            assert widths.kv_heads == 2
    assert count_parameters(pruned)["total"] < total


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_and_uncached_generation_agree_after_pruning(family):
    model = tiny_model(family)
    plans = [
        LayerPlan((0, 2, 4, 5), (0, 1), tuple(range(0, 64, 3))),
        LayerPlan((0, 1, 2), (0,), tuple(range(40))),
        LayerPlan((0, 1, 2, 3, 4, 5), (0, 1), tuple(range(8))),
    ]
    pruned = prune_model(model, plans)
    assert type(pruned).__name__.startswith("Pruned")
    x = random_tokens(1, 7)
    cached = pruned.generate(x, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = pruned.generate(x, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # incremental logits equal full-sequence logits
    full = pruned(cached).logits
    out = pruned(cached[:, :7], use_cache=True)
    keyword = cache_keyword(pruned)
    steps = [out.logits[:, -1]]
    for t in range(7, cached.shape[1] - 1):
        out = pruned(cached[:, t : t + 1], use_cache=True, **{keyword: getattr(out, keyword)})
        steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:-1], atol=1e-4, rtol=1e-4)


def test_check_plan_rejects_broken_layouts():
    shape = block_shape(tiny_model().config)
    good = keep_everything(shape)
    check_plan(shape, good)
    unequal_groups = [LayerPlan((0, 1, 3), (0, 1), tuple(range(64)))] + good[1:]
    orphan_head = [LayerPlan((0, 3), (0,), tuple(range(64)))] + good[1:]
    empty_ffn = [LayerPlan((0, 1, 2, 3, 4, 5), (0, 1), ())] + good[1:]
    for plans in (unequal_groups, orphan_head, empty_ffn, good[:2]):
        with pytest.raises(ValueError):
            check_plan(shape, plans)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_a_layer_equals_skipping_it(family):
    model = tiny_model(family)
    plans = keep_everything(block_shape(model.config))
    plans[1] = None
    pruned = prune_model(model, plans)
    skipping = copy.deepcopy(model)
    del skipping.model.layers[1]
    skipping.config.num_hidden_layers = 2
    if getattr(skipping.config, "layer_types", None):  # sliding-window and full-attention layers
        del skipping.config.layer_types[1]
    x = random_tokens(2, 12)
    torch.testing.assert_close(
        pruned(x, use_cache=False).logits, skipping(x, use_cache=False).logits, atol=1e-6, rtol=0
    )
    assert (pruned(x).logits - model(x).logits).abs().max() > 1e-3
    assert pruned.config.num_hidden_layers == 2 and not has_layer_widths(pruned.config)
    generated = pruned.generate(x[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)  # KV cache: kept layers
    assert generated.shape == (1, 17)
