"""Zero-shot evaluation: the shipped task definitions; lm-eval's log-likelihoods against an independent computation."""

import json
import string

import pytest
import torch
from conftest import EXPERT_FAMILY_TYPES, FAMILY_TYPES, byte_level_tokenizer, random_tokens, shared_dir, tiny_model

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
    correct = 0
    for sample in result["samples"]["arc_easy"]:
        doc = sample["doc"]
        harness = [response[0][0] for response in sample["resps"]]
        independent = [
            _log_likelihood(model, tokenizer, doc["query"], c if c[:1] in string.punctuation else " " + c)
            for c in doc["choices"]
        ]
        assert harness == pytest.approx(independent, abs=2e-3)
        correct += int(max(range(len(independent)), key=independent.__getitem__) == doc["gold"])
    assert result["tasks"]["arc_easy"]["acc"] == correct / 20
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


def _whole_pair_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """What lm-eval computes for one pair: context + continuation run whole, the continuation's tokens scored."""
    whole = context + continuation
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0, len(context) - 1 :]
    log_probs = torch.log_softmax(logits.float(), -1)
    target = torch.tensor(continuation)
    return float(log_probs.gather(1, target.unsqueeze(1)).sum()), bool((log_probs.argmax(-1) == target).all())


def _requests(model, vocab: int, seed: int) -> list:
    """Contexts of 1 to 20 tokens, each with 1 to 4 continuations of 1 to 6 tokens; one continuation per context is
    the model's greedy one (so both answers of the greedy flag occur)."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(6):
        context = torch.randint(0, vocab, (int(torch.randint(1, 21, (1,), generator=generator)),), generator=generator)
        greedy = model.generate(
            context.unsqueeze(0), max_new_tokens=3, do_sample=False, attention_mask=torch.ones(1, len(context))
        )[0, len(context) :]
        continuations = [greedy.tolist()]
        for _ in range(int(torch.randint(0, 4, (1,), generator=generator))):
            length = int(torch.randint(1, 7, (1,), generator=generator))
            continuations.append(torch.randint(0, vocab, (length,), generator=generator).tolist())
        requests += [(("", ""), context.tolist(), c) for c in continuations]
    return requests


@pytest.mark.parametrize("family", [*FAMILY_TYPES, *EXPERT_FAMILY_TYPES])
def test_shared_context_loglikelihoods_equal_running_each_pair_whole(family):
    from eval.loglikelihood import shared_context_loglikelihoods

    model = tiny_model(family)
    model.generation_config.pad_token_id = 0
    requests = _requests(model, 128, seed=3)
    shared = shared_context_loglikelihoods(model, requests, progress=False)
    whole = [_whole_pair_loglikelihood(model, context, continuation) for _, context, continuation in requests]
    assert [s[0] for s in shared] == pytest.approx([w[0] for w in whole], abs=1e-4)
    assert [s[1] for s in shared] == [w[1] for w in whole]
    assert any(s[1] for s in shared) and not all(s[1] for s in shared)
    assert len({tuple(r[1]) for r in requests}) < len(requests)  # contexts were shared


def test_shared_context_lm_equals_lm_eval_batches_including_pairs_longer_than_the_window():
    from lm_eval.models.huggingface import HFLM

    from eval.loglikelihood import SharedContextLM

    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer))
    requests = _requests(model, len(tokenizer), seed=4)
    long_context = random_tokens(1, 300, vocab=len(tokenizer), seed=5)[0].tolist()  # beyond the 256-token window
    requests.insert(2, (("", ""), long_context, [5, 6]))
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    shared = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    assert shared.max_length == 256
    expected = reference._loglikelihood_tokens(requests, disable_tqdm=True)
    got = shared._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert [g[1] for g in got] == [e[1] for e in expected]
