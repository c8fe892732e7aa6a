"""benchmarks/zeroshot_table.py: models side by side, each mean against the first's."""

import pytest
from conftest import benchmark_script


def _result(boolq: float, piqa: float, piqa_items: int = 400) -> dict:
    tasks = {
        "boolq": {"acc": boolq, "acc_stderr": 0.02, "items": 100},
        "piqa": {"acc": piqa, "acc_stderr": 0.01, "acc_norm": 0.5, "acc_norm_stderr": 0.01, "items": piqa_items},
    }
    return {"tasks": tasks, "mean_tasks": ["boolq", "piqa"], "mean": (boolq + piqa) / 2, "mean_stderr": 0.0112}


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


def test_results_over_other_items_do_not_compare():
    with pytest.raises(ValueError, match="pruned: other tasks or item counts than dense"):
        benchmark_script("zeroshot_table").zeroshot_table(
            {"dense": _result(0.6, 0.7), "pruned": _result(0.5, 0.7, piqa_items=100)}
        )
