"""Zero-shot evaluation: the shipped task definitions; lm-eval's log-likelihoods against an independent computation."""

import json
import string

import pytest
import torch
from conftest import shared_dir, tiny_model

from eval.tasks.local_tasks import choices, joined
from eval.zeroshot import LOCAL_TASKS, MEAN_TASKS, local_task_config, resolve_source
from prune.calibration import DataSourceError
from prune.recipe import RecipeError, load_recipe


def test_choices_are_joined_by_a_space_unless_they_start_with_punctuation():
    assert joined("yes") == " yes" and joined(", then he left.") == ", then he left." and joined("'s") == "'s"
    assert choices({"choices": ["a", ".b"]}) == [" a", ".b"]


def test_local_task_configs_read_files_from_the_data_directory(tmp_path, monkeypatch):
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "piqa.jsonl").write_text(
        json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n"
    )
    monkeypatch.setenv("PRUNE_DATA_DIR", str(tmp_path))
    config = local_task_config("piqa", tmp_path)
    assert config["task"] == "piqa" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "zeroshot" / "piqa.jsonl")
    assert config["doc_to_choice"]({"choices": ["x", "!"]}) == [" x", "!"] and config["target_delimiter"] == ""
    assert resolve_source(["piqa"], "auto") == "local"
    assert resolve_source(["piqa", "boolq"], "auto") == "harness"  # boolq's file is missing
    with pytest.raises(DataSourceError, match="boolq: data file not found"):
        local_task_config("boolq", tmp_path)
    monkeypatch.delenv("PRUNE_DATA_DIR")
    assert resolve_source(["piqa"], "auto") == "harness" and resolve_source(["piqa"], "local") == "local"


def test_every_local_task_has_a_definition_and_seven_feed_the_mean():
    from eval.zeroshot import TASK_DIR

    assert sorted(p.stem for p in TASK_DIR.glob("*.yaml")) == sorted(LOCAL_TASKS)
    assert MEAN_TASKS == ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def test_recipe_rejects_unknown_local_tasks():
    with pytest.raises(RecipeError, match="evaluation.zeroshot.tasks: must be among the local tasks"):
        load_recipe(None, ["evaluation.zeroshot.tasks=[piqa, mmlu]"])
    assert load_recipe(
        None, ["evaluation.zeroshot.tasks=[mmlu]", "evaluation.zeroshot.source=harness"]
    ).evaluation.zeroshot.tasks == ["mmlu"]
    with pytest.raises(RecipeError, match="evaluation.zeroshot.limit: must be > 0 or null"):
        load_recipe(None, ["evaluation.zeroshot.limit=0"])


def _log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context): the whole text tokenized once; the continuation = tokens after the context's."""
    whole = tokenizer(context + continuation).input_ids
    n_context = len(tokenizer(context).input_ids)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(log_probs[t - 1, whole[t]]) for t in range(n_context, len(whole)))


@pytest.mark.smollm2
@pytest.mark.skipif(
    shared_dir("PRUNE_MODELS_DIR") is None or shared_dir("PRUNE_DATA_DIR") is None,
    reason="PRUNE_MODELS_DIR / PRUNE_DATA_DIR not set",
)
def test_harness_log_likelihoods_equal_an_independent_computation(tmp_path):
    from eval.zeroshot import zeroshot_accuracy
    from prune.models import load_model, resolve_model_source
    from prune.paths import cache_dir

    model, tokenizer = load_model(resolve_model_source("smollm2-135m", cache_dir()), "float32", "cpu", cache_dir())
    result = zeroshot_accuracy(
        model, tokenizer, ["arc_easy", "winogrande"], "local", limit=20, batch_size=8, log_samples=True
    )
    assert result["source"] == "local" and result["tasks"]["arc_easy"]["items"] == 20
    correct = []
    for sample in result["samples"]["arc_easy"]:
        doc = sample["doc"]
        harness = [response[0][0] for response in sample["resps"]]
        independent = [
            _log_likelihood(model, tokenizer, doc["query"], c if c[:1] in string.punctuation else " " + c)
            for c in doc["choices"]
        ]
        assert harness == pytest.approx(independent, abs=2e-3)
        correct.append(int(max(range(len(independent)), key=independent.__getitem__) == doc["gold"]))
    assert result["tasks"]["arc_easy"]["acc"] == sum(correct) / 20
    arc_easy = sorted(result["samples"]["arc_easy"], key=lambda sample: sample["doc_id"])
    assert result["per_item"]["arc_easy"] == {  # what the paired change reads
        "doc_id": list(range(20)),
        "acc": [correct[result["samples"]["arc_easy"].index(sample)] for sample in arc_easy],
        "choices": [len(sample["doc"]["choices"]) for sample in arc_easy],
    }
    assert result["per_item"]["winogrande"]["choices"] == [2] * 20
    for sample in result["samples"]["winogrande"][:8]:  # partial scoring: one continuation after each context option
        doc = sample["doc"]
        harness = [response[0][0] for response in sample["resps"]]
        independent = [
            _log_likelihood(model, tokenizer, option, " " + doc["continuation"]) for option in doc["context_options"]
        ]
        assert harness == pytest.approx(independent, abs=2e-3)
    # standard errors: a proportion's over its items, and the mean's over the two tasks
    errors = []
    for task in ("arc_easy", "winogrande"):
        p, n = result["tasks"][task]["acc"], result["tasks"][task]["items"]
        assert result["tasks"][task]["acc_stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5, rel=1e-9)
        errors.append(result["tasks"][task]["acc_stderr"])
    assert result["mean_stderr"] == pytest.approx((errors[0] ** 2 + errors[1] ** 2) ** 0.5 / 2, rel=1e-12)


def test_bfloat16_if_fast_is_bfloat16_only_where_the_hardware_multiplies_it(monkeypatch):
    import eval.stages.zeroshot
    import prune.models
    from eval.stages.zeroshot import scoring_dtype

    model = tiny_model("llama", layers=1)  # float32, on the CPU
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(prune.models, "cpu_has_bfloat16_instructions", lambda: False)
    assert scoring_dtype("bfloat16-if-fast", model) == torch.float32
    assert prune.models.resolve_dtype("bfloat16-if-fast", cpu) == torch.float32  # model.dtype's value alike
    assert prune.models.resolve_dtype("bfloat16-if-fast", cuda) == torch.bfloat16
    assert scoring_dtype("auto", model) == torch.float32 and scoring_dtype("bfloat16", model) == torch.bfloat16
    monkeypatch.setattr(prune.models, "cpu_has_bfloat16_instructions", lambda: True)
    assert scoring_dtype("bfloat16-if-fast", model) == torch.bfloat16
    assert prune.models.resolve_dtype("bfloat16-if-fast", cpu) == torch.bfloat16
    monkeypatch.setattr(prune.models, "cpu_has_bfloat16_instructions", lambda: False)
    monkeypatch.setattr(eval.stages.zeroshot, "input_device", lambda m: torch.device("cuda"))
    assert scoring_dtype("bfloat16-if-fast", model) == torch.bfloat16
