"""benchmarks/zeroshot_table.py: models side by side, each mean against the first's and against chance."""

import json

import pytest
from conftest import benchmark_script


def _result(boolq: float, piqa: float, piqa_items: int = 400, source: str = "harness") -> dict:
    tasks = {
        "boolq": {"acc": boolq, "acc_stderr": 0.02, "items": 100},
        "piqa": {"acc": piqa, "acc_stderr": 0.01, "acc_norm": 0.5, "acc_norm_stderr": 0.01, "items": piqa_items},
    }
    return {
        "source": source,
        "data_dir": "$PRUNE_DATA_DIR" if source == "local" else None,
        "tasks": tasks,
        "mean_tasks": ["boolq", "piqa"],
        "mean": (boolq + piqa) / 2,
        "mean_stderr": 0.0112,
    }


def test_table_puts_models_side_by_side_and_each_mean_as_a_share_of_the_first():
    table = benchmark_script("zeroshot_table").zeroshot_table(
        {"dense": _result(0.6, 0.7), "pruned": _result(0.5, 0.69)}
    )
    assert table.splitlines()[2:] == [
        "| boolq | 100 | 60.00 ± 2.00 | 50.00 ± 2.00 |",
        "| piqa | 400 | 70.00 ± 1.00 | 69.00 ± 1.00 |",
        "| mean acc (2 tasks) | | 65.00 ± 1.12 | 59.50 ± 1.12 |",
        "| mean, % of dense | | 100.0% | 91.5% |",
    ]


def _write_items(path, choice_counts: list[int]) -> None:
    items = [{"query": "q", "choices": [f"c{i}" for i in range(count)], "gold": 0} for count in choice_counts]
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def test_local_results_get_the_chance_of_a_uniform_guess_over_the_scored_items(tmp_path, monkeypatch):
    (tmp_path / "zeroshot").mkdir()
    # boolq: 100 scored items of 2 choices, then one of 10 beyond the scored ones; piqa: 200 of 2, 200 of 4
    _write_items(tmp_path / "zeroshot" / "boolq.jsonl", [2] * 100 + [10])
    _write_items(tmp_path / "zeroshot" / "piqa.jsonl", [2] * 200 + [4] * 200)
    monkeypatch.setenv("PRUNE_DATA_DIR", str(tmp_path))
    table = benchmark_script("zeroshot_table").zeroshot_table(
        {"dense": _result(0.6, 0.7, source="local"), "pruned": _result(0.5, 0.69, source="local")}
    )
    assert table.splitlines() == [
        "| task | items | chance | dense acc | pruned acc |",
        "|---|---:|---:|---:|---:|",
        "| boolq | 100 | 50.00 | 60.00 ± 2.00 | 50.00 ± 2.00 |",
        "| piqa | 400 | 37.50 | 70.00 ± 1.00 | 69.00 ± 1.00 |",
        "| mean acc (2 tasks) | | 43.75 | 65.00 ± 1.12 | 59.50 ± 1.12 |",
        "| mean, % of dense | | | 100.0% | 91.5% |",
        "| mean above chance, % of dense's | | | 100.0% | 74.1% |",
    ]


def test_results_over_other_items_do_not_compare():
    with pytest.raises(ValueError, match="pruned: other tasks or item counts than dense"):
        benchmark_script("zeroshot_table").zeroshot_table(
            {"dense": _result(0.6, 0.7), "pruned": _result(0.5, 0.7, piqa_items=100)}
        )
