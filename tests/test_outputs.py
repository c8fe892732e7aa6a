"""Never lose a user's data: an output never overwrites an input, --overwrite replaces only a run's output, one run
writes an output at a time, damaged models are bad input, a 0% target changes nothing, a killed run's scratch
files go with the next run."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (  # noqa: F401 (fixture)
    REPO,
    assert_refused,
    byte_level_tokenizer,
    run_cli,
    run_outputs,
    tiny_files,
    tiny_model,
    tiny_recipe,
    write_recipe,
)
from safetensors.torch import load_file

import prune.prepare as prepare_module
import prune.run as run_module
from prune.outputs import exclusive_lock


def _fingerprint(path: Path) -> str:
    """SHA-256 over the names and bytes of every file under ``path``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def _run(recipe: Path, *arguments: str) -> tuple[int, list[str]]:
    """``python -m prune.run`` in this process: its exit code and the lines it printed on stderr."""
    import io

    previous, sys.stderr = sys.stderr, io.StringIO()
    try:
        code = run_module.main([str(recipe), *arguments])
        return code, sys.stderr.getvalue().strip().splitlines()
    finally:
        sys.stderr = previous


def _copy_of_model(tiny_files, root: Path) -> Path:  # noqa: F811
    """The tiny checkpoint copied under ``root/models/tiny`` (so that folders above it hold nothing else of value)."""
    model = root / "models" / "tiny"
    shutil.copytree(tiny_files["model"], model)
    return model


@pytest.mark.parametrize("where", ["the model", "above the model", "inside the model", "inside the data", "the cache"])
def test_an_output_on_an_input_is_refused_with_or_without_overwrite(tmp_path, tiny_files, monkeypatch, where):  # noqa: F811
    model = _copy_of_model(tiny_files, tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_files["calibration"], data / "calibration.txt")
    monkeypatch.setenv("PRUNE_DATA_DIR", str(data))
    cache = tmp_path / "cache"
    output = {
        "the model": model,
        "above the model": model.parent,
        "inside the model": model / "pruned",
        "inside the data": data / "out",
        "the cache": cache,
    }[where]
    recipe_data = tiny_recipe(tiny_files, output, cache)
    recipe_data["model"]["source"] = str(model)
    recipe_data["calibration"]["source"] = str(data / "calibration.txt")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_data)
    cache.mkdir()
    (cache / "kept.txt").write_text("a cache entry")
    before = {path: _fingerprint(path) for path in (model.parent, data, cache)}
    for arguments in ([], ["--overwrite"], ["--overwrite", "--dry-run"]):
        code, lines = _run(recipe, *arguments)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: output: "), lines
        assert any(word in lines[0] for word in (" is ", " contains ", " lies inside ")), lines
    assert {path: _fingerprint(path) for path in before} == before
    assert not output.with_name(output.name + ".partial").exists()


def test_overwrite_replaces_only_what_a_run_wrote_and_a_file_is_refused_before_loading(tmp_path, tiny_files):  # noqa: F811
    output = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_files, output, tmp_path / "cache"))
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    for arguments in ([], ["--overwrite"]):
        code, lines = _run(recipe, *arguments)
        assert code == 2 and lines == [f"error: output: {output} exists and is not a run's output; remove it "
                                       "yourself or choose another output"]  # fmt: skip
    assert (output / "thesis.tex").read_text() == "years of work"
    shutil.rmtree(output)
    output.write_text("a file")
    result = run_cli(recipe, "--overwrite")
    assert_refused_keeping(result, "exists and is not a run's output")
    assert "[load model]" not in result.stderr and output.read_text() == "a file"
    output.unlink()
    assert _run(recipe)[0] == 0
    first = run_outputs(output)
    assert _run(recipe)[0] == 2  # a run's output: replaced only with --overwrite
    code, _ = _run(recipe, "--overwrite")
    assert code == 0 and run_outputs(output) == first and not list(tmp_path.glob("*.previous"))


def assert_refused_keeping(result, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments)
    assert "Traceback" not in result.stderr


def test_a_full_or_read_only_cache_is_refused_before_loading(tmp_path, tiny_files, monkeypatch):  # noqa: F811
    output = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_files, output, tmp_path / "cache"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(prepare_module.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    code, lines = _run(recipe)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cache_dir: "), lines
    assert "GiB free and the run writes" in lines[0] and "the pruned checkpoint" in lines[0]
    monkeypatch.undo()
    (tmp_path / "cache").mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "cache" and access(path, mode))
    code, lines = _run(recipe)
    assert code == 2 and lines[0].startswith("error: cache_dir: ") and "read-only" in lines[0]
    assert not output.exists()


def test_two_runs_of_one_output_one_stops_in_one_line_and_the_output_is_whole(tmp_path, tiny_files):  # noqa: F811
    data = tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache")
    steps = {"tokens": 64 * 4 * 1000, "seqlen": 64, "batch_size": 4, "save_every": 500, "eval_every": 1000}
    data["recovery"] = {"method": "distill", "source": str(tiny_files["calibration"]), "heldout_windows": 1, **steps}
    data["evaluation"]["speed"]["enabled"] = False
    recipe = write_recipe(tmp_path / "r.yaml", data)
    first = subprocess.Popen(
        [sys.executable, "-m", "prune.run", str(recipe)], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    for line in first.stderr:
        if "[recovery (distill)]" in line:  # 1,000 steps to go: seconds
            break
    second = run_cli(recipe, "--overwrite")
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert lines[0].startswith(
        f"error: output: {tmp_path / 'out'} is being written by another run (process {first.pid}"
    )
    first.stderr.read()
    assert first.wait(timeout=600) == 0
    output = tmp_path / "out"
    expected = {"report.json", "report.md", "activation_stats.safetensors", "recovery_log.jsonl", "model"}
    assert expected <= {p.name for p in output.iterdir()}
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.lock").exists()


def test_concurrent_runs_of_different_recipes_on_one_cache_both_match_their_solo_runs(tmp_path, tiny_files):  # noqa: F811
    recipes = {}
    for target in (0.2, 0.3):
        data = tiny_recipe(tiny_files, tmp_path / f"shared-{target}", tmp_path / "shared-cache")
        data["calibration"] |= {"samples": 32, "seqlen": 64}
        data["pruning"]["target"] = target
        data["evaluation"]["speed"]["enabled"] = False
        recipes[target] = write_recipe(tmp_path / f"r{target}.yaml", data)
    together = [
        subprocess.Popen([sys.executable, "-m", "prune.run", str(recipe)], cwd=REPO, stderr=subprocess.PIPE, text=True)
        for recipe in recipes.values()
    ]
    logs = [process.communicate(timeout=600)[1] for process in together]
    assert [process.returncode for process in together] == [0, 0], [log[-1500:] for log in logs]
    for target, recipe in recipes.items():
        solo = [f"output={tmp_path / f'solo-{target}'}", f"cache_dir={tmp_path / f'solo-cache-{target}'}"]
        assert run_cli(recipe, "--set", solo[0], "--set", solo[1]).returncode == 0
        assert run_outputs(tmp_path / f"shared-{target}") == run_outputs(tmp_path / f"solo-{target}")
    reused = [
        json.loads((tmp_path / f"shared-{t}" / "report.json").read_text())["statistics"]["reused"] for t in recipes
    ]
    assert sorted(reused) == [False, True]  # computed once: the second run waited for the first and read it


def _damaged(tmp_path: Path, name: str, change) -> Path:
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), layers=3, ffn=64)
    directory = tmp_path / name
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    change(directory)
    return directory


def _truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _edit_config(**changes):
    def edit(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        (directory / "config.json").write_text(json.dumps(config))

    return edit


@pytest.mark.parametrize(
    "change, fragments",
    [
        (_truncate_weights, ["model.safetensors is damaged", "incomplete metadata"]),
        (_edit_config(num_attention_heads=5), ["model.source: ", "tiny"]),
        (_edit_config(vocab_size=None), ["model.source: ", "tiny"]),
    ],
)
def test_a_damaged_model_is_bad_input_for_every_command(tmp_path, tiny_files, change, fragments):  # noqa: F811
    model = _damaged(tmp_path, "tiny", change)
    output = tmp_path / "out"
    data = tiny_recipe(tiny_files, output, tmp_path / "cache")
    data["model"]["source"] = str(model)
    assert_refused(run_cli(write_recipe(tmp_path / "r.yaml", data)), output, *fragments)
    export = subprocess.run(
        [sys.executable, "-m", "prune.export", str(model), "--output", str(tmp_path / "x.gguf")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert_refused(export, tmp_path / "x.gguf", *fragments)
    analysis = tmp_path / "analysis.yaml"
    write_recipe(analysis, {"output": str(tmp_path / "analysis"), "model": {"source": str(model)},
                            "domains": {"enabled": False}, "similarity": {"enabled": True}})  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "prune.analysis", str(analysis)], cwd=REPO, capture_output=True, text=True
    )
    if "similarity.dataset" not in result.stderr:  # without the STS-B data the recipe is refused first
        assert_refused(result, tmp_path / "analysis", *fragments)


def test_the_export_refuses_inputs_and_foreign_files_and_a_run_with_truncated_weights(tmp_path, tiny_files):  # noqa: F811
    output = tmp_path / "out"
    assert (
        run_cli(write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_files, output, tmp_path / "cache"))).returncode == 0
    )
    notes = output / "notes.txt"
    notes.write_text("mine")
    for target, fragment in [(output / "model" / "x.gguf", "lies inside the model"), (notes, "is not a GGUF file")]:
        export = [sys.executable, "-m", "prune.export", str(output), "--output", str(target), "--overwrite"]
        result = subprocess.run(export, cwd=REPO, capture_output=True, text=True)
        assert_refused_keeping(result, f"error: --output: {target}", fragment)
    assert notes.read_text() == "mine" and not (output / "model" / "x.gguf").exists()
    _truncate_weights(output / "model")
    export = subprocess.run(
        [sys.executable, "-m", "prune.export", str(output)], cwd=REPO, capture_output=True, text=True
    )
    assert_refused(export, output / "model-f16.gguf", "model.safetensors is damaged")


def test_a_zero_target_changes_no_weight(tmp_path, tiny_files):  # noqa: F811
    data = tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache")
    data["pruning"]["target"] = 0.0
    report = run_module.execute(prepare_module.prepare(run_module.load_recipe(write_recipe(tmp_path / "r.yaml", data))))
    assert report.parameters.removed == 0
    dense, pruned = (
        load_file(path / "model.safetensors") for path in (tiny_files["model"], tmp_path / "out" / "model")
    )
    assert dense.keys() == pruned.keys() and all(torch.equal(dense[k], pruned[k]) for k in dense)


def test_a_killed_runs_scratch_files_are_removed_by_the_next_run_and_a_live_ones_are_not(tmp_path, tiny_files):  # noqa: F811
    cache = tmp_path / "cache"
    scratch = cache / "scratch"
    (scratch / "tmpkilled").mkdir(parents=True)  # what a run killed in its statistics pass leaves
    (scratch / "tmpkilled" / "boundary-3.pt").write_bytes(b"x" * 1000)
    (scratch / "tmplive").mkdir()
    with exclusive_lock(scratch / "tmplive.lock", wait=False) as held:  # a run of another process, still going
        assert held
        recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_files, tmp_path / "out", cache))
        assert _run(recipe)[0] == 0
        assert sorted(p.name for p in scratch.iterdir()) == ["tmplive", "tmplive.lock"]
    # released (the run of the other process ended or was killed): the next run removes it too
    assert _run(recipe, "--overwrite", "--set", f"cache_dir={cache}")[0] == 0
    assert not any(p.name.startswith("tmplive") for p in scratch.iterdir())
    assert os.listdir(scratch) == []
