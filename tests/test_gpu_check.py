"""The GPU check (benchmarks/gpu_check.py) in its reduced form on the CPU, so that the script a short GPU lease runs
cannot rot: every step runs and writes what the tables read."""

import json
import subprocess
import sys

from conftest import REPO


def test_the_gpu_check_runs_every_step_on_the_cpu_at_tiny_shapes(tmp_path):
    out = tmp_path / "check"
    command = [sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "run" / "output" / "report.json").read_text())
    assert report["speed"]["decode_loop"] == "static" and report["zeroshot"]["pruned"]["tasks"]["boolq"]
    assert [e["format"] for e in report["exports"]] == ["hf", "gguf"] and report["perplexity"]["pruned"] > 0
    speed = json.loads((out / "speed.json").read_text())
    parts = [(row["loop"], row["batch_size"]) for row in speed["rows"]]
    assert parts == [("static", 1), ("static", 2), ("dynamic", 1), ("dynamic", 2)]
    assert all(r["tokens_per_s_median"] > 0 for r in speed["reference"].values()) and len(speed["reference"]) == 2
    (scale,) = json.loads((out / "scale.json").read_text())
    assert [row["stage"] for row in scale["stages"]][:4] == [
        "activation statistics",
        "scoring",
        "allocation",
        "pruning",
    ]
    assert "| decode batch 1, pruned / dense |" in result.stdout and "scoring" in result.stdout
    assert not (out / "work").exists()
