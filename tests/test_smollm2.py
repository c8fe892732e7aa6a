"""Integration on the real SmolLM2-135M: the command line end to end, reload, independent perplexity."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, shared_dir

from eval.report import read_report

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        shared_dir("PRUNE_MODELS_DIR") is None or shared_dir("PRUNE_DATA_DIR") is None,
        reason="PRUNE_MODELS_DIR / PRUNE_DATA_DIR not set",
    ),
]

QUICK = [
    "calibration.samples=6",
    "calibration.seqlen=64",
    "calibration.min_tokens_per_input=0",  # 384 tokens for 1,536-wide inputs: a smoke test, not a quality run
    "evaluation.perplexity.windows=2",
    "evaluation.speed.repeats=1",
    "evaluation.speed.new_tokens=8",
    "evaluation.speed.prompt_tokens=32",
    "evaluation.zeroshot.tasks=[piqa, winogrande]",
    "evaluation.zeroshot.limit=3",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(output, cache, *overrides):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prune.run",
            "recipes/smollm2_30pct.yaml",
            "--set",
            f"output={output}",
            "--set",
            f"cache_dir={cache}",
            *[arg for o in (*QUICK, *overrides) for arg in ("--set", o)],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_report(output)


def test_default_recipe_end_to_end(tmp_path, cache):
    output = tmp_path / "s30"
    report = _run(output, cache)
    dense, pruned = report.parameters.dense, report.parameters.pruned
    assert dense.total == 134_515_008
    assert 0.695 <= pruned.total / dense.total <= 0.70
    hf = report.export("hf")
    assert hf is not None and hf.remote_code is True and hf.path == "model"
    assert report.statistics is not None and report.statistics.reused is False
    assert sorted(os.listdir(output)) == [
        "activation_stats.safetensors",
        "allocation.png",
        "headline.png",
        "model",
        "report.json",
        "report.md",
        "widths.png",
    ]
    assert {"model.safetensors", "config.json", "modeling_pruned.py", "tokenizer.json"} <= set(
        os.listdir(output / "model")
    )
    layers = report.layers
    assert len(layers) == 30 and all(
        row.pruned and row.pruned.query_heads % row.pruned.kv_groups == 0 for row in layers
    )
    assert report.speed and report.speed.pruned.decode_tokens_per_s_median > 0
    assert report.perplexity and report.perplexity.pruned > report.perplexity.dense > 1
    zeroshot = report.zeroshot
    assert zeroshot and zeroshot.source == "local" and zeroshot.mean_tasks == ["piqa", "winogrande"]
    for scores in (zeroshot.dense, zeroshot.pruned):
        assert {t: m.items for t, m in scores.tasks.items()} == {"piqa": 3, "winogrande": 3}
        assert all(0 <= m.acc <= 1 for m in scores.tasks.values())

    check = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "independent_perplexity.py"),
            str(output / "model"),
            os.path.join(os.environ["PRUNE_DATA_DIR"], "wikitext2", "wiki.test.raw"),
            "2048",
            "2",
        ],
        cwd="/",
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert "trust_remote_code" not in check.stdout + check.stderr  # the tokenizer loads without a prompt
    independent = json.loads(check.stdout.strip().splitlines()[-1])
    assert independent["class"] == "PrunedLlamaForCausalLM" and independent["cache_agrees"]
    assert independent["parameters"] == pruned.total
    assert abs(independent["perplexity"] / report.perplexity.pruned - 1) < 0.01

    # same model and calibration, another target: the statistics are reused, not recomputed; with one step of recovery
    second = _run(
        tmp_path / "s20",
        cache,
        "pruning.target=0.2",
        "allocation.strategy=uniform",
        "recovery.method=distill",
        "recovery.tokens=128",
        "recovery.seqlen=64",
        "recovery.batch_size=2",
        "recovery.heldout_windows=1",
        "recovery.learning_rate=0.0002",
        "recovery.warmup_steps=0",
    )
    recovery = second.recovery
    assert recovery and recovery.steps == 1 and recovery.tokens_seen == 128 and recovery.resumed_from_step == 0
    assert [point.step for point in recovery.curve] == [0, 1]
    assert recovery.curve[1].perplexity != recovery.curve[0].perplexity  # the weights did change
    assert not os.path.exists(recovery.state_dir)  # the resumable state is removed after success
    assert {"recovery.png", "recovery_log.jsonl"} <= set(os.listdir(tmp_path / "s20"))
    assert second.perplexity and second.perplexity.before_recovery != second.perplexity.pruned
    assert second.statistics and second.statistics.reused is True
    # ... and so are the dense model's evaluations
    assert second.perplexity.dense_reused_from and second.zeroshot and second.zeroshot.dense_reused_from
    assert second.perplexity.dense == report.perplexity.dense
    assert second.zeroshot.dense == report.zeroshot.dense
    assert second.statistics.cache_path == report.statistics.cache_path
    assert 0.795 <= second.parameters.pruned.total / dense.total <= 0.80


def test_a_gguf_source_is_converted_in_the_dtype_it_is_loaded_in(cache):
    """One conversion per dtype; the bfloat16 one holds the float32 one's weights rounded, in half the bytes."""
    import torch

    from prune.models import load_model, resolve_model_source

    source = resolve_model_source("smollm2-135m", cache)
    full, _ = load_model(source, "float32", "cpu", cache)
    half, _ = load_model(source, "bfloat16", "cpu", cache)
    full_weights, half_weights = full.state_dict(), half.state_dict()
    assert full_weights.keys() == half_weights.keys()
    assert all(half_weights[k].dtype == torch.bfloat16 for k in half_weights)
    assert all(torch.equal(half_weights[k], full_weights[k].to(torch.bfloat16)) for k in full_weights)
    sizes = {
        d.name.rsplit("-", 1)[1]: (d / "model.safetensors").stat().st_size for d in (cache / "converted").iterdir()
    }
    assert set(sizes) == {"float32", "bfloat16"}
    assert 0.49 < sizes["bfloat16"] / sizes["float32"] < 0.51
