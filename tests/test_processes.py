"""Two CPU processes under ``accelerate launch`` (gloo) against one process: the same widths and, to the order of
summation, the same statistics and checkpoint; only the first process writes and prints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prune.processes import ALONE, Processes
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, tiny_files: dict[str, Path], **recovery) -> Path:
    data = tiny_recipe(tiny_files, tmp_path / "unused", tmp_path / "unused-cache")
    data["calibration"]["samples"] = 5  # shared unevenly: 3 and 2
    data["pruning"]["reconstruct"] = "lstsq-sequential"
    data["evaluation"]["speed"]["enabled"] = False
    data["recovery"] = {
        "method": "distill",
        "source": str(tiny_files["calibration"]),
        "seqlen": 32,
        "batch_size": 4,
        "tokens": 4 * 32 * 6,  # 6 steps
        "warmup_steps": 2,
        "learning_rate": 0.001,
        "eval_every": 3,
        **recovery,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    recipe: Path, output: Path, processes: int, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = ["-m", "prune.run", str(recipe), "--set", f"output={output}", "--set", f"cache_dir={output}-cache"]
    if processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command = [*launch, "--main_process_port", str(_free_port()), *command]
    else:
        command = [sys.executable, *command]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(environment or {})}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment, timeout=600)


def test_two_processes_give_the_single_process_run(tmp_path, tiny_files):
    recipe = _recipe(tmp_path, tiny_files)
    one, two = _run(recipe, tmp_path / "one", 1), _run(recipe, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    # only the first process announces stages and the end
    assert two.stderr.count("[load model]") == 1 and two.stderr.count("done: ") == 1, two.stderr[-3000:]

    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    assert [row["pruned"] for row in reports[0]["layers"]] == [row["pruned"] for row in reports[1]["layers"]]
    assert reports[0]["parameters"]["pruned"] == reports[1]["parameters"]["pruned"]
    assert reports[0]["recovery"]["steps"] == reports[1]["recovery"]["steps"] == 6

    statistics = [load_file(tmp_path / name / "activation_stats.safetensors") for name in ("one", "two")]
    assert statistics[0].keys() == statistics[1].keys()
    for key, value in statistics[0].items():
        if key.endswith("log10_hist"):  # counts: a score on a bin edge falls either side in another summing order
            moved = float((statistics[1][key] - value).abs().sum()) / 2
            assert statistics[1][key].sum() == value.sum() and moved <= 1e-4 * float(value.sum()), (key, moved)
        else:
            torch.testing.assert_close(statistics[1][key], value, rtol=1e-4, atol=1e-6, msg=key)

    weights = [load_file(tmp_path / name / "model" / "model.safetensors") for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():  # six AdamW steps on gradients averaged across the processes
        torch.testing.assert_close(weights[1][key], value, rtol=1e-3, atol=1e-4, msg=key)

    logs = [(tmp_path / name / "recovery_log.jsonl").read_text().splitlines() for name in ("one", "two")]
    losses = [[json.loads(line)["loss"] for line in log if "loss" in json.loads(line)] for log in logs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)  # the logged loss is the mean over the processes
    assert not (tmp_path / "two.partial").exists()


@pytest.mark.parametrize(
    "settings",
    [
        {"pruning.reconstruct": "lstsq"},  # the schema's default: the others leave after the statistics
        {"pruning.reconstruct": "lstsq-sequential"},
        {"allocation.strategy": "shortgpt", "pruning.reconstruct": "none"},  # whole layers, from layer cosines
        {"allocation.strategy": "searched", "allocation.search_generations": 2, "allocation.search_samples": 2},
        {"scoring.method": "magnitude", "allocation.strategy": "uniform", "pruning.reconstruct": "none"},  # no pass
        {"pruning.rounds": 2},  # every process stays for the second round's statistics, which they share
    ],
    ids=["lstsq", "lstsq-sequential", "shortgpt", "searched", "no-statistics", "rounds"],
)
def test_two_processes_run_every_recipe_without_recovery_as_one(tmp_path, tiny_files, settings):
    """Without recovery or rounds the other processes leave after their share of the statistics (or at once when
    there is none) and the first goes on alone; with rounds they stay. Either way the result is one process's."""
    data = yaml.safe_load(_recipe(tmp_path, tiny_files).read_text())
    data["recovery"] = {"method": "none"}
    for key, value in settings.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    recipe = tmp_path / "matrix.yaml"
    recipe.write_text(yaml.safe_dump(data))
    one, two = _run(recipe, tmp_path / "one", 1), _run(recipe, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    rounds = settings.get("pruning.rounds", 1)
    assert reports[0]["allocation"]["rounds"] == reports[1]["allocation"]["rounds"] == rounds
    assert [row["pruned"] for row in reports[0]["layers"]] == [row["pruned"] for row in reports[1]["layers"]]
    weights = [load_file(tmp_path / name / "model" / "model.safetensors") for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-3, atol=1e-4, msg=key)


INJECTED = """
import os
if os.environ.get("RANK") == "1":
    import prune.statistics as statistics

    def collect_statistics(*args, **kwargs):
        if os.environ["PRUNE_TEST_FAILURE"] == "exit":
            os._exit(9)  # killed, as by the out-of-memory killer: no word left
        raise RuntimeError("the device fell over")

    statistics.collect_statistics = collect_statistics
"""


@pytest.mark.parametrize(
    "failure, line",
    [
        ("raise", "error: process 1 failed: RuntimeError: the device fell over; nothing was written"),
        ("exit", "process 1 left without a word (killed, or out of memory?)"),
    ],
)
def test_a_worker_that_fails_or_leaves_stops_the_run_with_one_line_naming_it(tmp_path, tiny_files, failure, line):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(INJECTED)  # process 1 fails in its share of the statistics pass
    recipe = _recipe(tmp_path, tiny_files)
    environment = {"PYTHONPATH": f"{site}{os.pathsep}{REPO}", "PRUNE_TEST_FAILURE": failure}
    result = _run(recipe, tmp_path / "out", 2, environment)
    assert result.returncode != 0
    # the first process says it once, whether its wait failed first or the launcher stopped it first
    said = [text for text in result.stderr.splitlines() if text.startswith(("error:", "terminated:"))]
    assert len(said) == 1 and line in said[0], result.stderr[-3000:]
    assert "closed by peer" not in result.stderr and "Gloo" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_bad_input_under_two_processes_is_one_line(tmp_path, tiny_files):
    recipe = _recipe(tmp_path, tiny_files, batch_size=3)
    result = _run(recipe, tmp_path / "out", 2)
    assert result.returncode != 0
    message = "error: recovery.batch_size: 3 is not a multiple of the 2 processes that share each batch"
    assert result.stderr.count(message) == 1, result.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_shares_cover_every_item_once():
    items = list(range(7))
    shares = [Processes(index, 3).share(items) for index in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert ALONE.share(items) == items and ALONE.main and not Processes(1, 3).main
    assert ALONE.sum(torch.ones(2)).tolist() == [1.0, 1.0]
