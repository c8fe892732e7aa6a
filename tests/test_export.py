"""Exports: a run writes the formats its recipe names; python -m prune.export writes GGUF for a run or a model."""

import json
import subprocess
import sys

import gguf
import pytest
import yaml
from conftest import REPO, tiny_files, tiny_recipe  # noqa: F401 (fixture)
from transformers import GPT2Config

from eval.engine import engine_available
from eval.perplexity import leading_perplexity
from prune.export import main
from prune.prepare import prepare
from prune.recipe import load_recipe
from prune.run import execute


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_files):  # noqa: F811
    """A finished run on the tiny checkpoint that wrote both formats."""
    root = tmp_path_factory.mktemp("export")
    data = tiny_recipe(tiny_files, root / "run", root / "cache")
    data["export"] = {"formats": ["hf", "gguf"], "gguf_type": "f32"}
    data["evaluation"]["perplexity"]["windows"] = 3  # the engine's check runs the first 2 of them
    (root / "recipe.yaml").write_text(yaml.safe_dump(data))
    report = execute(prepare(load_recipe(root / "recipe.yaml")))
    return root / "run", report


def test_a_run_writes_every_format_its_recipe_names(tiny_run):
    run, report = tiny_run
    assert [e.format for e in report.exports] == ["hf", "gguf"]
    gguf_export = report.export("gguf")
    assert gguf_export and gguf_export.path == "model-f32.gguf" and gguf_export.tensor_type == "f32"
    assert gguf_export.bytes == (run / "model-f32.gguf").stat().st_size
    reader = gguf.GGUFReader(run / "model-f32.gguf")
    heads = reader.fields["deci.attention.head_count"].contents()
    assert heads == [row.pruned.query_heads for row in report.layers if row.pruned]
    assert "Export `gguf`: `model-f32.gguf`" in (run / "report.md").read_text()
    if not engine_available():
        assert report.engine is None and any("llama.cpp is not installed" in note for note in report.notes)
        return
    engine = report.engine
    assert engine and engine.tensor_type == "f32" and engine.dense.file_bytes > engine.pruned.file_bytes
    windows = engine.perplexity_windows
    assert windows == 2 < report.perplexity.windows
    pytorch = leading_perplexity(report.perplexity.pruned_window_nll, report.perplexity.seqlen, windows)
    assert engine.perplexity == pytest.approx(pytorch, rel=0.01)  # f16 KV cache in the engine
    assert f"the first 2 of the {report.perplexity.seqlen}-token windows" in (run / "report.md").read_text()
    assert engine.linear_macs_ratio == pytest.approx(
        report.speed.dense.linear_macs_per_token / report.speed.pruned.linear_macs_per_token
    )


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_export_command_writes_a_runs_gguf_and_refuses_bad_input(tiny_run, tmp_path, capsys, tiny_files):  # noqa: F811
    run, _ = tiny_run
    assert main([str(run), "--type", "q8_0"]) == 0
    assert gguf.GGUFReader(run / "model-q8_0.gguf").fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    capsys.readouterr()
    assert main([str(run), "--type", "q8_0"]) == 2
    assert "already exists" in _one_error_line(capsys)
    assert main([str(run), "--type", "q3_k"]) == 2
    assert "--type: 'q3_k' is not one of f32, f16" in _one_error_line(capsys)
    assert main([str(tmp_path / "no_such_run")]) == 2
    assert "no such file or directory" in _one_error_line(capsys)
    GPT2Config().save_pretrained(tmp_path / "gpt2")
    assert main([str(tmp_path / "gpt2"), "--output", str(tmp_path / "gpt2.gguf")]) == 2
    assert "model type 'gpt2' is not one the toolkit prunes" in _one_error_line(capsys)
    assert main([str(tiny_files["model"])]) == 2
    assert "--output: required" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]  # nothing written
    # the dense model the same way, for a like-for-like comparison in the engine
    assert main([str(tiny_files["model"]), "--output", str(tmp_path / "dense.gguf"), "--type", "f16"]) == 0
    dense = gguf.GGUFReader(tmp_path / "dense.gguf").fields
    assert dense["general.architecture"].contents() == "deci"
    assert dense["deci.attention.head_count"].contents() == [6, 6, 6]


def test_checkpoint_perplexity_scores_the_saved_model_as_the_run_did(tiny_run, tiny_files, tmp_path):  # noqa: F811
    run, report = tiny_run
    out = tmp_path / "ppl.json"
    script = REPO / "benchmarks" / "checkpoint_perplexity.py"
    argv = [str(run / "model"), str(tiny_files["evaluation"]), "3", "--seqlen", "64", "--json", str(out)]
    printed = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=REPO)
    assert printed.returncode == 0, printed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert report.perplexity is not None and result["windows"] == 3
    assert result["window_nll"] == pytest.approx(report.perplexity.pruned_window_nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(report.perplexity.pruned, rel=1e-5)
    assert json.loads(printed.stdout)["perplexity"] == result["perplexity"]
