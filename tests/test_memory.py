"""Memory: the CPU baseline counts live memory only (not heap memory freed earlier and kept by the allocator); the
memory plan estimates every stage's peak from the shape and the recipe and stops a run its device cannot hold."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, tiny_files, tiny_recipe  # noqa: F401
from transformers import AutoConfig

from eval.speed import KNOWN_SHAPES
from prune.blocks import block_shape
from prune.estimate import estimate_memory
from prune.memory import current_bytes, reset_peak
from prune.prepare import statistics_needs
from prune.recipe import load_recipe, recipe_from_mapping, recipe_to_dict
from prune.statistics import Statistic

CPU = torch.device("cpu")


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or platform.system() != "Linux", reason="glibc malloc_trim and /proc"
)
def test_reset_peak_returns_freed_heap_memory_before_the_baseline():
    reset_peak(CPU)
    start = current_bytes(CPU)
    tensors = [torch.ones(1000) for _ in range(60_000)]  # 4 KB each: about 240 MB from the C heap
    kept = tensors[::50]  # every 50th stays alive, so the freed memory is fragmented and not trimmed on free
    del tensors
    held = current_bytes(CPU) - start
    assert held > 150 * 2**20  # the heap still holds the freed memory
    reset_peak(CPU)
    live = current_bytes(CPU) - start
    assert live < 0.25 * held, f"baseline still holds {live / 2**20:.0f} MiB of {held / 2**20:.0f} MiB"
    del kept  # alive until the baseline is read


def _rss_file_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or platform.system() != "Linux", reason="glibc madvise and /proc")
def test_the_pages_of_a_memory_mapped_tensor_leave_the_resident_set_and_no_other_memory_is_touched(tmp_path):
    from safetensors.torch import load_file, save_file

    from prune.memory import drop_mapped_pages

    weights = torch.randn(64, 2**18)  # 64 MiB
    save_file({"w": weights}, tmp_path / "w.safetensors")
    mapped = torch.from_file(
        str(tmp_path / "w.safetensors"),
        shared=False,
        size=(tmp_path / "w.safetensors").stat().st_size,
        dtype=torch.uint8,
    )
    assert int(mapped.sum()) > 0  # every page read: in the resident set
    owned, from_numpy = weights.clone(), torch.from_numpy(weights.numpy().copy())
    before = _rss_file_bytes()
    drop_mapped_pages([mapped, owned, from_numpy])
    assert before - _rss_file_bytes() > 60 * 2**20  # the file's pages left
    assert torch.equal(owned, weights) and torch.equal(from_numpy, weights)  # memory not of a file: untouched
    assert torch.equal(mapped[-weights.numel() * 4 :].view(torch.float32).view(64, -1), weights)  # read again
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], weights)  # the file unchanged


# ---------------------------------------------------------------------------------------------------------------
# The memory plan: estimates from the shape and the recipe, and the refusal before any weight is loaded


def _plan(recipe, in_place=True, needs=None):
    shape = block_shape(AutoConfig.for_model("llama", **KNOWN_SHAPES["llama-2-7b"]))
    total = 6_738_415_616  # Llama-2-7B's parameters
    return {
        stage.stage: stage
        for stage in estimate_memory(
            recipe, shape, 32000, total, statistics_needs(recipe) if needs is None else needs, in_place
        )
    }


def test_the_plan_follows_the_shape_and_the_recipe():
    recipe = load_recipe(REPO / "recipes" / "llama_30pct.yaml", ["pruning.reconstruct=lstsq"])  # the one-shot refit
    plan = _plan(recipe)
    assert plan["load model"].peak_bytes == 6_738_415_616 * 2  # bfloat16
    assert list(plan) == [
        "load model",
        "activation statistics",
        "scoring",
        "pruning",
        "perplexity",
        "zero-shot",
        "speed",
    ]
    doubled = _plan(recipe_from_mapping(recipe_to_dict(recipe), ("calibration.samples=256",)))
    added = doubled["activation statistics"].peak_bytes - plan["activation statistics"].peak_bytes
    assert added == 2 * 128 * 256 * 4096 * 2  # two layer boundaries of 128 more samples x 256 tokens x 4096 x 2 bytes
    window = recipe.evaluation.perplexity.seqlen  # the pruned model, a layer's activations, 256 positions' logits
    activations, log_probabilities = window * (4 * 11008 + 6 * 4096) * 2, 12 * 256 * 32000
    assert plan["perplexity"].peak_bytes == round(6_738_415_616 * 2 * 0.7) + activations + log_probabilities
    kept = _plan(recipe, in_place=False)["pruning"].peak_bytes - plan["pruning"].peak_bytes
    assert kept == round(6_738_415_616 * 2 * 0.7)  # the pruned model beside the dense one
    assert "second-moment" in plan["scoring"].dominant
    no_second = _plan(recipe, needs=frozenset({Statistic.GRADIENT_PRODUCTS}))
    assert "scoring" not in no_second and no_second["pruning"].dominant == "one pruned decoder block"
    sequential = _plan(
        recipe_from_mapping(recipe_to_dict(recipe), ("pruning.reconstruct=lstsq-sequential",)),
        needs=frozenset({Statistic.GRADIENT_PRODUCTS}),
    )["pruning"]
    states = 128 * 256 * 4096 * 2  # the hidden states: 128 samples x 256 tokens x 4096 x 2 bytes
    refit = 4 * 11008**2 + 18 * 11009**2 + 256 * (4 * 11008 + 6 * 4096) * 2  # down_proj's moments, refit; activations
    assert sequential.peak_bytes - no_second["pruning"].peak_bytes == states + refit
    on_cpu = _plan(
        recipe_from_mapping(recipe_to_dict(recipe), ("pruning.reconstruct=lstsq-sequential", "model.device=cpu")),
    )  # the factor and the inverse written over the matrix, the refit's kept block only (benchmarks/largest_steps.py)
    assert on_cpu["scoring"].peak_bytes - on_cpu["load model"].peak_bytes == 14 * 11009**2
    cpu_refit = 4 * 11008**2 + 8 * 11009**2 + 256 * (4 * 11008 + 6 * 4096) * 2
    assert on_cpu["pruning"].peak_bytes - no_second["pruning"].peak_bytes == states + cpu_refit
    scored = _plan(recipe_from_mapping(recipe_to_dict(recipe), ("pruning.reconstruct=lstsq-sequential",)))
    assert scored["pruning"].peak_bytes == sequential.peak_bytes  # its refit reads no stored second moments
    # the statistics pass of the 7B recipe scales with one layer: within 1.3x its weights
    assert plan["activation statistics"].peak_bytes < 1.3 * plan["load model"].peak_bytes
    lora = _plan(recipe_from_mapping(recipe_to_dict(recipe), ("recovery.method=lora",)), in_place=False)
    distill = _plan(recipe_from_mapping(recipe_to_dict(recipe), ("recovery.method=distill",)), in_place=False)
    assert lora["recovery"].peak_bytes < distill["recovery"].peak_bytes


def test_the_llama_cpp_stage_is_planned_in_host_memory(monkeypatch):
    """Both GGUF files (the speed measurement holds them), ENGINE_UBATCH rows of logits twice in float32 and 256 in
    float64 twice, a float16 KV cache of a window; no PyTorch weights (freed before it); checked against host memory
    even when the run's device is a GPU."""
    from types import SimpleNamespace

    import prune.prepare
    from prune.estimate import MemoryPlanError

    gguf = ["export.formats=[hf, gguf]", "evaluation.engine.enabled=true"]
    recipe = load_recipe(REPO / "recipes" / "llama_30pct.yaml", [*gguf, "export.gguf_type=q8_0"])
    plan = _plan(recipe)
    engine = plan["engine (llama.cpp)"]
    window = recipe.evaluation.perplexity.seqlen
    kv_cache = 2 * 32 * 32 * 128 * window * 2  # keys and values: 32 layers x 32 KV heads x 128 x window x 2 bytes
    logits = 8 * 512 * 32000 + 16 * 256 * 32000
    assert engine.host and not plan["perplexity"].host and list(plan)[-1] == "engine (llama.cpp)"
    assert engine.peak_bytes == round(6_738_415_616 * 34 / 32 * 1.7) + logits + kv_cache
    smaller = _plan(load_recipe(REPO / "recipes" / "llama_30pct.yaml", [*gguf, "export.gguf_type=q4_k_m"]))
    assert smaller["engine (llama.cpp)"].peak_bytes < engine.peak_bytes
    monkeypatch.setattr(prune.prepare, "resolve_device", lambda name: torch.device("cuda", 0))
    free = {"cuda": 100 * 2**30, "cpu": 2**30}
    monkeypatch.setattr(prune.prepare, "available_bytes", lambda device: free[device.type])
    with pytest.raises(MemoryPlanError, match=r"^the engine \(llama.cpp\) stage needs .*; cpu has 1.00 GiB available"):
        prune.prepare.check_memory_plan(SimpleNamespace(recipe=recipe, memory=list(plan.values())))
    free["cpu"] = 100 * 2**30
    prune.prepare.check_memory_plan(SimpleNamespace(recipe=recipe, memory=list(plan.values())))


def test_a_run_its_device_cannot_hold_stops_before_loading_the_weights(tmp_path, tiny_files):  # noqa: F811
    recipe = tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    huge = ["--set", "calibration.samples=100000000"]
    run = subprocess.run(
        [sys.executable, "-m", "prune.run", str(path), *huge], capture_output=True, text=True, cwd=REPO
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr  # one line, nothing loaded (no progress bars)
    assert lines[0].startswith("error: the activation statistics stage needs an estimated ")
    assert "lower calibration.samples or calibration.seqlen" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    dry = subprocess.run(
        [sys.executable, "-m", "prune.run", str(path), "--dry-run"], capture_output=True, text=True, cwd=REPO
    )
    printed = yaml.safe_load(dry.stdout)["estimated_peak_memory"]
    assert dry.returncode == 0 and list(printed) == [
        "load model",
        "activation statistics",
        "scoring",
        "pruning",
        "perplexity",
        "speed",
    ]


HEAP_HOLES = """
import sys
from pathlib import Path

import torch

from prune.memory import give_large_frees_back

def anonymous_bytes():
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["RssAnon"].split()[0]) * 1024

if sys.argv[1] == "given back":
    give_large_frees_back()
block = torch.ones(30 * 2**18)  # 30 MiB, mapped; freed, it raises glibc's threshold to its size
del block
start = anonymous_bytes()
tensors = [torch.ones(2**21) for _ in range(100)]  # 8 MiB each
kept = tensors[::2]  # every other one stays alive: the freed ones are holes, not the heap's top
del tensors
print((anonymous_bytes() - start) / (50 * 2**23))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or platform.system() != "Linux", reason="glibc mallopt and /proc")
def test_freed_large_tensors_go_back_to_the_os():
    def held_over_live(mode: str) -> float:
        command = [sys.executable, "-c", HEAP_HOLES, mode]
        return float(subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout)

    assert held_over_live("glibc's default") > 1.7  # the 50 freed 8 MiB tensors stay resident beside the 50 live
    assert held_over_live("given back") < 1.2


def test_the_finite_check_reads_a_parameter_in_chunks_and_finds_the_last_element(monkeypatch):
    from conftest import tiny_model

    import prune.models
    from prune.models import ModelSourceError, check_finite

    model = tiny_model("llama", layers=2, ffn=64)
    checked_sizes = []
    isfinite = torch.isfinite
    monkeypatch.setattr(prune.models, "FINITE_CHECK_ELEMENTS", 100)
    monkeypatch.setattr(torch, "isfinite", lambda x: checked_sizes.append(x.numel()) or isfinite(x))
    check_finite(model)
    assert max(checked_sizes) == 100
    per_module = [p for m in model.modules() for p in m.parameters(recurse=False)]  # a tied weight twice
    assert sum(checked_sizes) == sum(p.numel() for p in per_module)  # every element of every parameter
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[-1, -1] = float("inf")  # the last chunk of that parameter
    with pytest.raises(ModelSourceError, match="model.layers.1.mlp.down_proj.weight hold NaN or infinite"):
        check_finite(model)


def test_bfloat16_on_a_cpu_without_its_instructions_is_noted(monkeypatch):
    import prune.estimate
    from prune.estimate import planned_dtype, slow_dtype_note

    recipe = load_recipe(
        REPO / "recipes" / "qwen2.5_coder_1.5b_20pct.yaml", ["model.device=cpu", "model.dtype=bfloat16"]
    )
    monkeypatch.setattr(prune.models, "cpu_has_bfloat16_instructions", lambda: False)
    monkeypatch.setattr(prune.estimate, "bfloat16_product_slowdown", lambda: 68.4)
    note = slow_dtype_note(recipe)
    assert note is not None and note.startswith("note: model.dtype bfloat16 on a CPU without bfloat16 instructions")
    assert "a matrix product took 68x as long as in float32 here" in note
    float32 = recipe_from_mapping(recipe_to_dict(recipe), ("model.dtype=float32", "evaluation.zeroshot.dtype=bfloat16"))
    assert slow_dtype_note(float32) is None  # its zero-shot is disabled
    as_fast = recipe_from_mapping(recipe_to_dict(recipe), ("model.dtype=bfloat16-if-fast",))
    assert slow_dtype_note(as_fast) is None and planned_dtype(as_fast) == torch.float32  # the recipe as shipped
    zeroshot = recipe_from_mapping(recipe_to_dict(float32), ("evaluation.zeroshot.enabled=true",))
    assert str(slow_dtype_note(zeroshot)).startswith("note: evaluation.zeroshot.dtype bfloat16 on a CPU without")
    monkeypatch.setattr(prune.models, "cpu_has_bfloat16_instructions", lambda: True)
    assert slow_dtype_note(recipe) is None and planned_dtype(as_fast) == torch.bfloat16


def test_the_dry_run_lists_the_slow_dtype_note(tmp_path, tiny_files, monkeypatch):  # noqa: F811
    import prune.estimate
    from prune.prepare import dry_run_text, prepare

    recipe = tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache")
    prepared = prepare(recipe_from_mapping(recipe, ("model.dtype=bfloat16",)))
    monkeypatch.setattr(prune.models, "cpu_has_bfloat16_instructions", lambda: False)
    monkeypatch.setattr(prune.estimate, "bfloat16_product_slowdown", lambda: 5.2)
    notes = yaml.safe_load(dry_run_text(prepared))["notes"]
    assert len(notes) == 1 and notes[0].startswith("note: model.dtype bfloat16 on a CPU without bfloat16")
    monkeypatch.setattr(prune.models, "cpu_has_bfloat16_instructions", lambda: True)
    assert "notes" not in yaml.safe_load(dry_run_text(prepared))
