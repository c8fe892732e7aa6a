"""Perplexity and the speed machinery on tiny models."""

import contextlib
import io
import json
import math

import pytest
import torch
import yaml
from conftest import (  # noqa: F401 (fixture)
    BASIC_STATISTICS,
    MIXED_PLANS,
    layer_row,
    make_report,
    random_tokens,
    tiny_config,
    tiny_files,
    tiny_model,
    tiny_recipe,
)

from eval import perplexity as perplexity_module
from eval import speed as speed_module
from eval.perplexity import perplexity, window_count
from eval.speed import decode_step, greedy_decode, measure_speed, static_cache


@pytest.mark.parametrize("chunk", [256, 7])  # one chunk per window; chunks of 7, 7, 7, 7 and 1 positions
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: its logits are soft-capped
def test_perplexity_equals_token_by_token_computation(chunk, family, monkeypatch):
    monkeypatch.setattr(perplexity_module, "LOSS_CHUNK_TOKENS", chunk)
    model = tiny_model(family)
    tokens = random_tokens(1, 100)[0]
    result = perplexity(model, tokens, seqlen=30, windows=None, progress=False)
    assert result["windows"] == 3 and result["predicted_tokens"] == 87
    nll = 0.0
    with torch.no_grad():
        for k in range(3):
            window = tokens[30 * k : 30 * (k + 1)]
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), -1)
            nll -= sum(float(log_probs[t, window[t + 1]]) for t in range(29))
    assert math.isclose(result["perplexity"], math.exp(nll / 87), rel_tol=1e-5)
    assert perplexity(model, tokens, seqlen=30, windows=2, progress=False)["windows"] == 2
    assert window_count(100, 30, 10) == 3 and window_count(100, 30, 1) == 1


def test_perplexity_of_a_lora_model_counts_its_adapters():
    """Recovery's held-out perplexity runs on the LoRA-wrapped student: the adapters (non-zero here) are counted."""
    from peft import LoraConfig, get_peft_model

    tokens = random_tokens(1, 60)[0]
    lora = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    plain = perplexity(tiny_model(), tokens, seqlen=30, windows=None, progress=False)["perplexity"]
    with torch.no_grad():
        nll = sum(
            float(
                torch.nn.functional.cross_entropy(
                    lora(window[None]).logits[0, :-1].double(), window[1:], reduction="sum"
                )
            )
            for window in tokens.view(2, 30)
        )
    measured = perplexity(lora, tokens, seqlen=30, windows=None, progress=False)["perplexity"]
    assert math.isclose(measured, math.exp(nll / 58), rel_tol=1e-5) and not math.isclose(measured, plain, rel_tol=1e-3)


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
    prefill_s, decode_s, tokens = greedy_decode(model, prompt, new_tokens=5)
    assert prefill_s > 0 and decode_s > 0
    assert torch.equal(seen[0], prompt) and all(t.shape == (2, 1) for t in seen[1:]) and len(seen) == 6
    assert torch.equal(torch.cat(seen[1:], dim=1), expected[:, 9:14]) and torch.equal(tokens, expected[:, 9:])


def test_static_cache_loop_gives_the_dynamic_loops_tokens_with_per_layer_widths():
    from prune.pruner import prune_model

    model = tiny_model(layers=4)
    plans = MIXED_PLANS
    pruned = prune_model(model, plans, output_bias=True)
    prompt = random_tokens(2, 9)
    _, _, dynamic = greedy_decode(pruned, prompt, new_tokens=12, loop="dynamic")
    _, _, static = greedy_decode(pruned, prompt, new_tokens=12, loop="static")
    assert dynamic.shape == (2, 13) and torch.equal(static, dynamic)
    pruned.generation_config.eos_token_id = None
    assert torch.equal(pruned.generate(prompt, max_new_tokens=13, do_sample=False)[:, 9:], dynamic)


def compiling_on_the_cpu(monkeypatch) -> list:
    """Make the static loop compile its decode step on the CPU as on CUDA, with AOTAutograd and eager kernels instead
    of inductor's and no CUDA graphs; returns the list of graphs compiled, which grows with every compilation."""
    compiled = []

    def counting_aot_eager(graph, example_inputs):
        compiled.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    monkeypatch.setitem(speed_module.STATIC_STEP_COMPILE, "cpu", {"backend": counting_aot_eager, "fullgraph": True})
    torch._dynamo.reset()
    return compiled


def test_compiled_static_step_gives_the_dynamic_loops_tokens_and_compiles_once_for_every_batch_above_one(monkeypatch):
    from prune.pruner import prune_model

    compiled = compiling_on_the_cpu(monkeypatch)
    pruned = prune_model(tiny_model(layers=4), MIXED_PLANS, output_bias=True)  # per-layer widths, a removed layer
    step = decode_step(pruned, "static")
    assert step is not pruned and decode_step(pruned, "dynamic") is pruned
    compilations = []
    for batch in (2, 3, 1, 5):
        prompt = random_tokens(batch, 9, seed=batch)
        _, _, dynamic = greedy_decode(pruned, prompt, new_tokens=6, loop="dynamic")
        cache = static_cache(pruned, 9 + 6 + 1)
        for _ in range(2):  # a reused cache starts empty again
            _, _, static = greedy_decode(pruned, prompt, new_tokens=6, loop="static", step=step, cache=cache)
            assert torch.equal(static, dynamic)
        compilations.append(len(compiled))
    assert compilations == [1, 1, 2, 2]


def test_the_runs_speed_stage_with_a_compiled_static_step(tmp_path, tiny_files, monkeypatch):  # noqa: F811
    import prune.run as run_module

    compiled = compiling_on_the_cpu(monkeypatch)
    data = tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache")
    data["evaluation"]["speed"] |= {"decode_loop": "static", "batch_size": 2, "warmup": 1, "repeats": 2}
    (tmp_path / "recipe.json").write_text(json.dumps(data))
    assert run_module.main([str(tmp_path / "recipe.json")]) == 0
    speed = json.loads((tmp_path / "out" / "report.json").read_text())["speed"]
    assert speed["decode_loop"] == "static" and len(compiled) == 2  # the dense and the pruned model, once each
    for model in ("dense", "pruned"):
        assert speed[model]["compile_seconds"] > 0 and speed[model]["decode_tokens_per_s_median"] > 0


def test_measure_speed_reports_every_model():
    small = tiny_model(ffn=16)
    results = measure_speed(
        {"a": tiny_model(), "b": small},
        prompt_tokens=8,
        batch_size=2,
        new_tokens=4,
        warmup=1,
        repeats=3,
        progress=False,
    )
    for result in results.values():
        assert result.prefill_ms_min <= result.prefill_ms_median <= result.prefill_ms_max
        assert result.decode_tokens_per_s_min <= result.decode_tokens_per_s_median <= result.decode_tokens_per_s_max
        assert result.peak_memory_bytes >= result.weight_bytes > 0
    assert results["b"].weight_bytes < results["a"].weight_bytes


def test_report_of_a_layer_removal_run_names_the_removed_layers():
    from eval.report import MethodReport, render_markdown
    from prune.allocation import allocate
    from prune.blocks import block_shape
    from prune.recipe import AllocationSection, PruningSection
    from prune.run import layer_table
    from prune.statistics import collect_statistics

    model = tiny_model()
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(2, 8), "max_logit", BASIC_STATISTICS, progress=False)
    allocation = allocate(shape, None, 1, AllocationSection("shortgpt"), PruningSection(reconstruct="none"), stats)
    influence = allocation.block_influence
    assert allocation.plans[influence.index(min(influence))] is None and sum(p is None for p in allocation.plans) == 1
    method = MethodReport(0.1, None, None, None, "shortgpt", "query_head", 8, "none")
    text = render_markdown(make_report(layers=layer_table(shape, allocation), method=method))
    removed = influence.index(min(influence))
    assert f"| {removed} | removed | removed | removed |" in text and "shortgpt: whole layers removed" in text


def test_linear_macs_per_token_counts_every_linear_and_the_lm_head():
    from eval.speed import linear_macs_per_token
    from prune.pruner import LayerPlan, prune_model

    model = tiny_model()  # 3 layers, hidden 96, 6 heads of 16, 2 KV heads, FFN 64, vocab 128, tied lm_head
    per_layer = 96 * 96 + 2 * 32 * 96 + 96 * 96 + 3 * 64 * 96
    assert linear_macs_per_token(model) == 3 * per_layer + 128 * 96
    pruned = prune_model(model, [LayerPlan((0, 1, 3, 4), (0, 1), tuple(range(32)))] * 3)
    assert linear_macs_per_token(pruned) == 3 * (64 * 96 + 2 * 32 * 96 + 96 * 64 + 3 * 32 * 96) + 128 * 96


def test_transferred_widths_follow_relative_depth_and_attention_layout():
    from eval.speed import transferred_widths
    from prune.blocks import block_shape

    # source: 3 layers of 9 heads / 3 KV groups / 1536 channels; middle layer removed
    rows = [
        layer_row(0, (9, 3, 1536), (6, 3, 768)),
        layer_row(1, (9, 3, 1536), None),
        layer_row(2, (9, 3, 1536), (3, 1, 1536)),
    ]
    mha = block_shape(tiny_config(layers=5, hidden=128, heads=8, kv_heads=8, ffn=1000))
    widths = transferred_widths(rows, mha, round_to=64)
    # depth 0, .25, .5, .75, 1 -> source layers 0, 0 (round(0.5) = 0), 1, 2 (round(1.5) = 2), 2
    assert [None if w is None else (w.query_heads, w.kv_heads, w.ffn_channels) for w in widths] == [
        (5, 5, 512),
        (5, 5, 512),
        None,
        (3, 3, 1000),
        (3, 3, 1000),
    ]  # 2/3 of 8 heads -> 5; 1/3 -> 3; 1000 capped
    gqa = block_shape(tiny_config(layers=3, hidden=192, heads=12, kv_heads=4, ffn=256))
    widths = transferred_widths(rows, gqa, round_to=8)
    assert (widths[0].query_heads, widths[0].kv_heads, widths[0].ffn_channels) == (8, 4, 128)  # 2 of 3 per group
    assert (widths[2].query_heads, widths[2].kv_heads) == (3, 1)  # 1 of 3 groups, whole groups kept
    assert widths[1] is None


def test_shape_only_model_has_exactly_the_planned_shapes():
    from eval.speed import random_model
    from prune.blocks import LayerWidths, decoder_layers

    config = tiny_config(layers=3, hidden=96, heads=6, kv_heads=2, ffn=64)
    widths = [LayerWidths(4, 2, 40), None, LayerWidths(3, 1, 8)]
    model = random_model(config, widths, torch.float32, torch.device("cpu"), output_bias=True)
    layers = decoder_layers(model)
    assert len(layers) == 2
    for layer, w in zip(layers, [widths[0], widths[2]], strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (16 * w.query_heads, 96) and attn.k_proj.weight.shape == (
            16 * w.kv_heads,
            96,
        )
        assert attn.v_proj.weight.shape == (16 * w.kv_heads, 96) and attn.o_proj.weight.shape == (
            96,
            16 * w.query_heads,
        )
        assert mlp.gate_proj.weight.shape == (w.ffn_channels, 96) and mlp.down_proj.weight.shape == (96, w.ffn_channels)
        assert attn.o_proj.bias is not None and mlp.down_proj.bias is not None
    out = model(random_tokens(2, 7)).logits
    assert out.shape == (2, 7, 128) and torch.isfinite(out).all()
    dense = random_model(config, [LayerWidths(6, 2, 64)] * 3, torch.bfloat16, torch.device("cpu"))
    assert type(dense).__name__ == "LlamaForCausalLM" and next(dense.parameters()).dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # restored


def test_clock_synchronises_cuda_before_reading(monkeypatch):
    from eval import speed

    calls = []
    monkeypatch.setattr(speed.torch.cuda, "synchronize", lambda device=None: calls.append(device))
    speed.synchronized_clock(torch.device("cpu"))
    assert calls == []
    speed.synchronized_clock(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_shape_only_command_times_dense_and_transferred_widths(tmp_path, capsys):
    import json

    from eval.speed import main

    tiny_config(layers=2, hidden=96, heads=6, kv_heads=2, ffn=64).save_pretrained(tmp_path / "shape")
    from eval.report import write_report

    write_report(
        make_report(layers=[layer_row(0, (9, 3, 1536), (6, 3, 768)), layer_row(1, (9, 3, 1536), (9, 3, 1536))]),
        tmp_path,
    )
    assert (
        main(
            [
                "--config",
                str(tmp_path / "shape"),
                "--allocation",
                str(tmp_path),
                "--batch-sizes",
                "1",
                "2",
                "--prompt-tokens",
                "6",
                "--new-tokens",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--device",
                "cpu",
                "--json",
                str(tmp_path / "speed.json"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "speed.json").read_text())
    assert summary["pruned_widths"] == [
        {"query_heads": 4, "kv_heads": 2, "ffn_channels": 32, "experts": 0},
        {"query_heads": 6, "kv_heads": 2, "ffn_channels": 64, "experts": 0},
    ]
    assert [row["batch_size"] for row in summary["rows"]] == [1, 2]
    pruned_macs = summary["rows"][0]["results"]["pruned"]["linear_macs_per_token"]
    assert pruned_macs == (2 * 4 + 2 * 2) * 16 * 96 + 3 * 32 * 96 + (2 * 6 + 2 * 2) * 16 * 96 + 3 * 64 * 96 + 128 * 96
    table = capsys.readouterr().out
    assert table.count("| pruned |") == 2 and "limit" in table
    assert main(["--config", str(tmp_path / "shape"), "--allocation", str(tmp_path / "missing")]) == 2


def test_report_writes_linked_figures_and_the_zero_shot_table(tmp_path):
    from eval.report import read_report, write_report
    from eval.stages.perplexity import PerplexityReport
    from eval.stages.zeroshot import TaskAccuracy, ZeroshotReport, ZeroshotScores

    layers = [
        layer_row(
            i,
            (9, 3, 1536),
            None if i == 1 else (6, 3, 1000 - 100 * i),
            requested_sparsity=0.1 * i,
            activated_weights=1000.0 * (i + 1),
        )
        for i in range(3)
    ]
    dense = ZeroshotScores(
        {"piqa": TaskAccuracy(0.70, 100, 0.68, 0.046, 0.047), "boolq": TaskAccuracy(0.60, 100, None, 0.049)},
        0.65,
        0.034,
    )
    pruned = ZeroshotScores({"piqa": TaskAccuracy(0.61, 100, 0.60), "boolq": TaskAccuracy(0.55, 100)}, 0.58)
    report = make_report(
        layers=layers,
        perplexity=PerplexityReport("wikitext2", 2048, 16, 32752, 20.7, 45.4, None, "/cache/p.json", []),
        zeroshot=ZeroshotReport("local", "/data", 100, 0, "acc", ["boolq", "piqa"], dense, pruned, None),
        stage_seconds={"zero-shot": 1.0},
    )
    write_report(report, tmp_path)
    text = (tmp_path / "report.md").read_text()
    for name in ("headline.png", "widths.png", "allocation.png"):
        assert f"]({name})" in text
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| zero-shot mean acc (2 tasks, first 100 items each) | 65.00 ± 3.40 | 58.00 | n/a |" in text
    assert "| piqa | 100 | - | 70.0 ± 4.6 | 61.0 | - | 68.0 ± 4.7 | 60.0 |" in text  # no standard error: none shown
    assert "| boolq | 100 | - | 60.0 ± 4.9 | 55.0 | - | - | - |" in text
    assert "| mean acc | | - | 65.0 ± 3.4 | 58.0 | - | | |" in text
    assert "Dense perplexity reused from `/cache/p.json`" in text and "Dense zeroshot reused" not in text
    assert read_report(tmp_path) == report  # report.json reads back into the same typed report


def _zeroshot_result(per_item: dict[str, tuple[list[int], int]]) -> dict:
    """An eval.zeroshot result of made-up per-item answers: {task: (acc of each item, choices per item)}."""
    tasks = {task: {"acc": sum(acc) / len(acc), "items": len(acc)} for task, (acc, _) in per_item.items()}
    return {
        "source": "local",
        "data_dir": "/data",
        "limit": None,
        "seed": 0,
        "mean_metric": "acc",
        "mean_tasks": list(per_item),
        "tasks": tasks,
        "mean": sum(t["acc"] for t in tasks.values()) / len(tasks),
        "mean_stderr": None,
        "per_item": {
            task: {"doc_id": list(range(len(acc))), "acc": acc, "choices": [choices] * len(acc)}
            for task, (acc, choices) in per_item.items()
        },
    }


def test_the_zero_shot_change_is_paired_by_item_with_its_95_percent_interval(tmp_path):
    from eval.report import read_report, render_markdown, write_report
    from eval.stages.zeroshot import zeroshot_report

    dense = _zeroshot_result({"piqa": ([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], 2), "arc_easy": ([1, 1, 1, 1, 1, 1, 0, 0], 4)})
    pruned = _zeroshot_result({"piqa": ([1, 1, 1, 0, 0, 0, 0, 0, 0, 1], 2), "arc_easy": ([0] * 8, 4)})
    section = zeroshot_report(dense, pruned, None)
    # by hand: piqa's differences are 0 x 7, -1 x 2, +1: mean -0.1, squared deviations 7 x 0.01 + 2 x 0.81 + 1.21
    piqa_se = math.sqrt((7 * 0.01 + 2 * 0.81 + 1.21) / 9 / 10)
    # arc_easy's are -1 x 6, 0 x 2: mean -0.75, squared deviations 6 x 0.0625 + 2 x 0.5625
    arc_se = math.sqrt((6 * 0.0625 + 2 * 0.5625) / 7 / 8)
    piqa, arc = section.changes["piqa"], section.changes["arc_easy"]
    assert piqa.difference == pytest.approx(-0.1) and piqa.stderr == pytest.approx(piqa_se)
    assert piqa.interval95 == pytest.approx(1.959964 * piqa_se) and piqa.chance == 0.5
    assert arc.difference == pytest.approx(-0.75) and arc.stderr == pytest.approx(arc_se) and arc.chance == 0.25
    assert not piqa.measurable and arc.measurable  # |-0.1| < 0.352; |-0.75| > 0.321
    mean = section.mean_change
    assert mean is not None and mean.difference == pytest.approx(-0.425) and mean.chance == 0.375
    assert mean.stderr == pytest.approx(math.sqrt(piqa_se**2 + arc_se**2) / 2)
    # dense mean 0.625, pruned 0.2, chance 0.375: the pruned model keeps (0.2 - 0.375) / 0.25 of the margin
    assert section.margin_kept == pytest.approx(-0.7)
    assert section.margin_kept_interval95 == pytest.approx(1.959964 * mean.stderr / 0.25)

    report = make_report(zeroshot=section)
    text = render_markdown(report)
    interval = 100 * 1.959964 * math.sqrt(piqa_se**2 + arc_se**2) / 2
    assert f"| -42.50 points (95% interval ± {interval:.2f}) |" in text  # the headline: a change, not a ratio
    assert f"no measurable change (-10.00 ± {100 * 1.959964 * piqa_se:.2f} points, 95%)" in text
    assert "-70.0% ± " in text and "of dense's margin above chance (37.50)" in text
    write_report(report, tmp_path)
    assert read_report(tmp_path) == report


def test_paired_changes_refuse_results_of_different_items():
    from eval.zeroshot import accuracy_changes

    dense = _zeroshot_result({"piqa": ([1, 0, 1], 2)})
    pruned = _zeroshot_result({"piqa": ([1, 0, 1], 2)})
    pruned["per_item"]["piqa"]["doc_id"] = [0, 1, 3]
    with pytest.raises(ValueError, match="piqa: the dense and the pruned model were scored on different items"):
        accuracy_changes(dense, pruned)


def test_a_pruned_model_far_worse_than_dense_gets_a_warning_first_in_the_report(tmp_path, tiny_files, monkeypatch):  # noqa: F811
    import eval.stages.perplexity as perplexity_stage
    import prune.run as run_module

    monkeypatch.setattr(perplexity_stage, "BROKEN_RATIO", 0.5)  # any pruned model is "far worse" than that
    data = tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache")
    data["evaluation"]["speed"]["enabled"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert run_module.main([str(path)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    ratio = report["perplexity"]["pruned"] / report["perplexity"]["dense"]
    (warning,) = [note for note in report["notes"] if note.startswith("Warning:")]
    assert warning.startswith(f"Warning: the pruned model's perplexity is {ratio:.1f}x the dense model's (above 0.5x)")
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.index(f"**{warning}**") < text.index("| metric |")  # before the headline table
    assert stderr.getvalue().strip().splitlines()[-1] == warning  # and said by the command, after "done:"


def test_a_report_written_before_the_window_nlls_were_kept_reads_and_renders():
    """benchmarks/results/smollm2_30pct_report.json (which the GPU check reads; runs of earlier versions alike, which
    ``python -m prune.export RUN_DIR`` reads) has no window NLLs: it reads, and renders its perplexity."""
    from conftest import REPO

    from eval.report import read_report, render_markdown

    report = read_report(REPO / "benchmarks" / "results" / "smollm2_30pct_report.json")
    ppl = report.perplexity
    assert ppl is not None and ppl.pruned_window_nll == []
    assert f"| {ppl.dense:.2f} | {ppl.pruned:.2f} |" in render_markdown(report)


def test_a_resumed_run_keeps_the_engine_check_only_with_the_same_perplexity_windows():
    """The engine's check runs the perplexity evaluation's first windows and is compared with them: its kept result
    of an earlier attempt is keyed by the perplexity settings too; the speed stage's is not."""
    from conftest import REPO

    from eval.stages import EVALUATIONS
    from prune.recipe import load_recipe
    from prune.run import stage_settings

    recipe = load_recipe(REPO / "recipes" / "smollm2_30pct.yaml")
    fewer = load_recipe(REPO / "recipes" / "smollm2_30pct.yaml", ["evaluation.perplexity.windows=1"])
    assert stage_settings(EVALUATIONS["engine"], recipe) != stage_settings(EVALUATIONS["engine"], fewer)
    assert stage_settings(EVALUATIONS["speed"], recipe) == stage_settings(EVALUATIONS["speed"], fewer)
