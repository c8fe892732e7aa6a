"""Mixture-of-experts families (Mixtral, Qwen3-MoE): experts and their FFN channels as units.

Tiny configs of 3 layers, 6 query heads over 2 KV heads, 4 experts of 64 channels, 2 experts per token.
"""

import json

import pytest
import torch
import yaml
from conftest import (
    EXPERT_FAMILY_TYPES,
    byte_level_tokenizer,
    random_tokens,
    reload_in_fresh_process,
    tiny_model,
    tiny_recipe,
    word_text,
)
from transformers import AutoModelForCausalLM

from eval.speed import cache_keyword, linear_macs_per_token
from prune.allocation import allocate, expert_plan, layer_plan
from prune.blocks import BlockShape, LayerWidths, block_shape, count_parameters, decoder_layers, split_fused_projections
from prune.checkpoint import save_checkpoint
from prune.prepare import prepare
from prune.pruner import LayerPlan, check_plan, keep_everything, prune_model
from prune.recipe import AllocationSection, PruningSection, load_recipe
from prune.run import execute, main
from prune.scoring import LayerScores
from prune.statistics import Statistic, collect_statistics, objective_value

CHANNELS = 64


def _slots(expert_channels: dict[int, range], channels: int = CHANNELS) -> tuple[int, ...]:
    """Kept channels of a plan (``e * channels + c``) from {expert e: its kept channels c}."""
    return tuple(e * channels + c for e in sorted(expert_channels) for c in expert_channels[e])


class _Picks:
    """The experts the routers of a model pick, per layer, while it is installed (a forward hook on each router)."""

    def __init__(self, model):
        self.picked: dict[int, set[int]] = {}
        self.handles = [
            layer.mlp.gate.register_forward_hook(self._hook(i)) for i, layer in enumerate(decoder_layers(model))
        ]

    def _hook(self, layer: int):
        def hook(module, args, output):
            self.picked.setdefault(layer, set()).update(output[2].flatten().tolist())

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _never_routed(model, layer: int, expert: int) -> None:
    """Make ``expert`` of ``layer`` one the router never picks: hidden dimension 0 is 1 for every token on entry
    (embedding column 0) and no layer writes to it (row 0 of every o_proj and expert down_proj is zero), so the
    router input's dimension 0 is > 0 for every token; the expert's router row weighs it by -1e4, every other
    row by 0."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for block in decoder_layers(model):
            block.self_attn.o_proj.weight[0] = 0
            block.mlp.experts.down_proj[:, 0] = 0
        router = decoder_layers(model)[layer].mlp.gate.weight
        router[:, 0] = 0
        router[expert, 0] = -1e4


@pytest.mark.parametrize("family", EXPERT_FAMILY_TYPES)
def test_target_zero_changes_no_logit(family):
    model = tiny_model(family)
    x = random_tokens(2, 12)
    dense = model(x).logits
    pruned = prune_model(model, keep_everything(block_shape(model.config)))
    assert type(pruned).__name__ == type(model).__name__  # uniform widths: the stock class
    assert torch.equal(pruned(x).logits, dense)
    assert count_parameters(pruned) == count_parameters(model)


@pytest.mark.parametrize("family", EXPERT_FAMILY_TYPES)
def test_removing_zeroed_channels_and_a_never_routed_expert_changes_no_logit(family):
    model = tiny_model(family)
    _never_routed(model, layer=1, expert=2)
    with torch.no_grad():
        for e in range(4):  # channels 0..15 of every expert of layer 0 write nothing
            model.model.layers[0].mlp.experts.down_proj[e, :, :16] = 0
        model.model.layers[2].self_attn.o_proj.weight[:, 48:96] = 0  # KV group 1's query heads (3, 4, 5)
    x = random_tokens(2, 12)
    picks = _Picks(model)
    dense = model(x).logits
    picks.remove()
    assert picks.picked[1] == {0, 1, 3}  # the construction holds: expert 2 of layer 1 is never picked
    every = range(CHANNELS)
    plans = [
        LayerPlan(tuple(range(6)), (0, 1), _slots({e: range(16, 64) for e in range(4)}), (0, 1, 2, 3)),
        LayerPlan(tuple(range(6)), (0, 1), _slots({0: every, 1: every, 3: every}), (0, 1, 3)),
        LayerPlan((0, 1, 2), (0,), _slots(dict.fromkeys(range(4), every)), (0, 1, 2, 3)),
    ]
    pruned = prune_model(model, plans)
    assert [w.experts for w in block_shape(pruned.config).layers] == [4, 3, 4]
    assert [w.ffn_channels for w in block_shape(pruned.config).layers] == [48, 64, 64]
    torch.testing.assert_close(pruned(x).logits, dense, atol=1e-5, rtol=0)
    # removing an expert the router does pick changes the logits (the check above can fail)
    picked_gone = LayerPlan(tuple(range(6)), (0, 1), _slots({1: every, 2: every}), (1, 2))
    other = prune_model(model, [plans[0], picked_gone, plans[2]])
    assert (other(x).logits - dense).abs().max() > 1e-3


@pytest.mark.parametrize("family", EXPERT_FAMILY_TYPES)
def test_per_layer_experts_reload_in_a_fresh_process_and_generate_alike_with_and_without_cache(tmp_path, family):
    model = tiny_model(family)
    plans = [
        LayerPlan((0, 1, 2), (0,), _slots({1: range(0, 64, 2), 2: range(1, 64, 2), 3: range(32)}), (1, 2, 3)),
        LayerPlan(tuple(range(6)), (0, 1), _slots({e: range(16) for e in range(4)}), (0, 1, 2, 3)),
        LayerPlan((0, 2, 3, 5), (0, 1), _slots({0: range(64), 3: range(64)}), (0, 3)),
    ]
    pruned = prune_model(model, plans)
    assert type(pruned).__name__.startswith("Pruned")
    save_checkpoint(pruned, byte_level_tokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["layer_num_experts"] == [3, 4, 2]
    assert config["layer_intermediate_size"] == [32, 16, 64]
    x = random_tokens(1, 7)
    torch.save(x, tmp_path / "x.pt")
    reloaded = reload_in_fresh_process(tmp_path, remote=True)
    assert reloaded["class"] == type(pruned).__name__
    torch.testing.assert_close(reloaded["logits"], pruned(x).logits, atol=1e-5, rtol=0)
    cached = pruned.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(reloaded["generated"], cached)
    assert torch.equal(cached, pruned.generate(x, max_new_tokens=8, do_sample=False, use_cache=False))
    full, out = pruned(cached).logits, pruned(cached[:, :7], use_cache=True)
    steps = [out.logits[:, -1]]
    for t in range(7, cached.shape[1] - 1):
        out = pruned(
            cached[:, t : t + 1], use_cache=True, **{cache_keyword(pruned): getattr(out, cache_keyword(pruned))}
        )
        steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:-1], atol=1e-4, rtol=1e-4)


def test_plans_that_break_the_expert_layout_are_refused():
    shape = block_shape(tiny_model("mixtral").config)
    every = range(CHANNELS)
    good = keep_everything(shape)
    check_plan(shape, good)
    broken = {
        "fewer experts than picked per token": LayerPlan(tuple(range(6)), (0, 1), _slots({0: every}), (0,)),
        "channels in a removed expert": LayerPlan(tuple(range(6)), (0, 1), _slots({0: every, 1: every}), (0, 2)),
        "unequal widths": LayerPlan(tuple(range(6)), (0, 1), _slots({0: every, 1: range(8)}), (0, 1)),
    }
    for plan in broken.values():
        with pytest.raises(ValueError):
            check_plan(shape, [plan, *good[1:]])


def test_the_expert_plan_keeps_the_most_score_within_the_budget():
    widths = LayerWidths(6, 2, ffn_channels=8, experts=4)
    scores = torch.ones(4, 8, dtype=torch.float64)
    scores[2] = 0.01  # expert 2 is barely active
    scores[:, 6:] = 0.1  # and the last two channels of every expert
    experts, slots = expert_plan(scores.flatten(), widths, kept=18, experts_per_token=2, round_to=2, min_channels=2)
    assert experts == (0, 1, 3) and len(slots) == 18  # 3 experts x 6 channels, the weak ones gone
    assert slots == _slots({0: range(6), 1: range(6), 3: range(6)}, channels=8)
    # a brute force over every (experts, width) agrees on the score kept
    best = max(
        float(scores.sort(dim=1, descending=True).values[:, :f].sum(1).sort(descending=True).values[:n].sum())
        for n in range(2, 5)
        for f in range(2, 9, 2)
        if n * f <= 18
    )
    assert float(scores.flatten()[list(slots)].sum()) == pytest.approx(best)
    # keeping everything is the identity; too little for two experts of the minimum width is refused
    assert expert_plan(scores.flatten(), widths, 32, 2, 2, 2) == ((0, 1, 2, 3), tuple(range(32)))
    with pytest.raises(ValueError):
        expert_plan(scores.flatten(), widths, 3, 2, 2, 2)


def test_expert_statistics_equal_brute_force_gradients():
    model = tiny_model("qwen3_moe")
    samples = random_tokens(3, 10)
    statistics = collect_statistics(model, samples, "nll", frozenset({Statistic.GRADIENT_PRODUCTS}), progress=False)
    reference = tiny_model("qwen3_moe")  # the same weights, never split
    experts = reference.model.layers[1].mlp.experts
    total = torch.zeros_like(experts.gate_up_proj)
    for ids in samples:
        reference.zero_grad()
        objective_value(reference, ids.unsqueeze(0), "nll").backward()
        total += (experts.gate_up_proj.grad * experts.gate_up_proj).abs().detach()
    mean = total / len(samples)  # [experts, 2 * channels, hidden]
    torch.testing.assert_close(statistics.get(1, "gate_proj.row_sum"), mean[:, :CHANNELS].sum(-1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(statistics.get(1, "up_proj.col_max"), mean[:, CHANNELS:].amax(-2), rtol=1e-4, atol=1e-7)
    assert statistics.find(1, "mlp_in.x_sum") is None  # experts' inputs are not collected


def test_macs_per_token_count_the_experts_each_token_runs():
    model = tiny_model("mixtral")
    h, v = 96, 128
    attention = 2 * (6 + 2) * 16 * h
    per_layer = attention + 4 * h + 2 * 3 * CHANNELS * h  # router, and 2 experts of 3 projections
    assert linear_macs_per_token(model) == 3 * per_layer + v * h
    split_fused_projections(model)  # the pipeline's split experts count alike
    assert linear_macs_per_token(model) == 3 * per_layer + v * h


@pytest.fixture(scope="module")
def expert_files(tmp_path_factory):
    """Per mixture-of-experts family: a tiny checkpoint with a byte-level tokenizer, calibration and evaluation text."""
    root = tmp_path_factory.mktemp("experts")
    tokenizer = byte_level_tokenizer()
    (root / "calibration.txt").write_text(word_text(4000, seed=1))
    (root / "evaluation.txt").write_text(word_text(2000, seed=2))
    files = {}
    for family in EXPERT_FAMILY_TYPES:
        tiny_model(family, vocab=len(tokenizer), layers=3).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        files[family] = {"model": root / family} | {
            name: root / f"{name}.txt" for name in ("calibration", "evaluation")
        }
    return files


def _recipe(tmp_path, files, name: str, **sections):
    data = tiny_recipe(files, tmp_path / name, tmp_path / "cache")
    data["evaluation"]["speed"] = {"enabled": False}
    data["pruning"] |= {"target": 0.3, "reconstruct": "none"}
    data["scoring"] = {"method": "activation"}
    for key, value in sections.items():
        data[key] = data.get(key, {}) | value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("family", EXPERT_FAMILY_TYPES)
def test_the_dry_run_names_experts_and_the_budget(tmp_path, expert_files, capsys, family):
    assert main([str(_recipe(tmp_path, expert_files[family], "dry")), "--dry-run"]) == 0
    budget = yaml.safe_load(capsys.readouterr().out)["budget"]
    assert budget["family"].startswith(f"{family} (") and "mixture of experts" in budget["family"]
    assert budget["units"] == (
        "query heads (of 6; 2 KV heads stay) and experts (of 4; 2 per token) and the FFN channels of each (of 64) "
        "per layer, 3 layers"
    )
    assert budget["parameters_to_remove"] == round(0.3 * budget["dense_total_parameters"])


def test_a_mixtral_run_removes_experts_and_channels_and_reports_them(tmp_path, expert_files):
    report = execute(prepare(load_recipe(_recipe(tmp_path, expert_files["mixtral"], "run"))))
    assert report.parameters.removed_fraction >= 0.3
    assert all(layer.dense.experts == 4 and layer.pruned and layer.pruned.experts >= 2 for layer in report.layers)
    assert any(layer.pruned and layer.pruned.experts * layer.pruned.ffn_channels < 4 * 64 for layer in report.layers)
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "| layer | query heads | KV groups | experts | FFN channels per expert |" in markdown
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", trust_remote_code=True)
    assert sum(p.numel() for p in reloaded.parameters()) == report.parameters.pruned.total


@pytest.mark.parametrize(
    ("sections", "line"),
    [
        (
            {"pruning": {"reconstruct": "lstsq-sequential"}},
            "error: pruning.reconstruct: 'lstsq-sequential' refits down_proj from its inputs, which the experts of "
            "mixtral (mixture of experts) do not share; use none",
        ),
        (
            {"scoring": {"method": "wanda-sp"}},
            "error: scoring.method: 'wanda-sp' does not score the experts of mixtral (mixture of experts); "
            "use activation, magnitude, taylor",
        ),
        (
            {"allocation": {"strategy": "global"}},
            "error: allocation.strategy: 'global' does not prune mixtral (mixture of experts); "
            "use uniform, activation-density, shortgpt",
        ),
    ],
)
def test_methods_that_do_not_prune_experts_are_one_line(tmp_path, expert_files, capsys, sections, line):
    assert main([str(_recipe(tmp_path, expert_files["mixtral"], "refused", **sections))]) == 2
    assert capsys.readouterr().err.strip() == line
    assert not (tmp_path / "refused").exists()


def test_the_allocation_spends_what_whole_experts_leave_over():
    """Experts x channels per expert rarely equal a layer's share: the surplus goes to the layers it fits."""
    shape = BlockShape("qwen3_moe", 256, 32, 6, False, False, (LayerWidths(8, 4, 96, 16),) * 6, experts_per_token=2)
    generator = torch.Generator().manual_seed(0)
    scores = [
        LayerScores(
            torch.rand(8, generator=generator, dtype=torch.float64),
            torch.rand(4, generator=generator, dtype=torch.float64),
            (torch.rand(16, 96, generator=generator) * torch.rand(16, 1, generator=generator) ** 3).flatten().double(),
        )
        for _ in range(6)
    ]
    total = sum(shape.layer_params(w) for w in shape.layers)
    pruning = PruningSection(round_to=8, min_ffn_channels=16)
    for target in (0.2, 0.3, 0.5):
        budget = round(target * total)
        allocation = allocate(shape, scores, budget, AllocationSection("uniform"), pruning)
        check_plan(shape, allocation.plans)
        surplus = allocation.removed_parameters - budget
        assert surplus >= 0
        for i, plan in enumerate(allocation.plans):  # brute force: no layer's next larger plan fits in the surplus
            kept = len(plan.kept_ffn_channels)
            for share in range(kept + 8, 16 * 96 + 1, 8):
                larger = layer_plan(shape, i, scores[i], allocation.attention_steps[i], "query_head", share, 8, 16)
                if len(larger.kept_ffn_channels) > kept:
                    assert shape.layer_params(larger.widths) - shape.layer_params(plan.widths) > surplus
                    break
