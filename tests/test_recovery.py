"""Recovery stage: distillation loss, data order, kill-and-resume equivalence, LoRA merge, recipe checks."""

import copy
import json
import re

import pytest
import torch
from conftest import random_tokens, tiny_model
from transformers import AutoModelForCausalLM

import prune.recovery as recovery
from eval.perplexity import perplexity
from prune.blocks import block_shape
from prune.calibration import TextSource
from prune.checkpoint import save_checkpoint
from prune.pruner import LayerPlan, keep_everything, prune_model
from prune.recipe import RecipeError, RecoverySection, load_recipe
from prune.recovery import add_lora_adapters, batch_indices, distillation_loss, recover, training_loss, training_windows


def _heldout(tokens):
    """The held-out perplexity callable recover() logs: windows of 16 tokens of ``tokens``."""
    return lambda model: perplexity(model, tokens, 16, None, progress=False)["perplexity"]


def test_distillation_loss_is_zero_for_identical_logits_and_matches_kl_formula():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    assert float(distillation_loss(teacher.clone(), teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 5, 11)
    temperature = 2.0
    expected = 0.0
    for b in range(2):
        for t in range(5):
            p = torch.softmax(teacher[b, t] / temperature, -1)
            q = torch.softmax(student[b, t] / temperature, -1)
            expected += float((p * (p.log() - q.log())).sum())
    expected = expected / 10 * temperature**2
    assert float(distillation_loss(student, teacher, temperature)) == pytest.approx(expected, rel=1e-5)


def test_training_loss_is_zero_when_student_is_the_teacher():
    teacher = tiny_model()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        loss, parts = training_loss(student, teacher, random_tokens(2, 12), RecoverySection(method="distill"))
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and parts["kl"] == pytest.approx(0.0, abs=1e-6)
    settings = RecoverySection(method="distill", kl_weight=0.0, nll_weight=1.0)
    with torch.no_grad():
        loss, parts = training_loss(student, teacher, random_tokens(2, 12), settings)
    assert set(parts) == {"nll"} and float(loss) > 1.0  # random weights: far from zero NLL


def test_batch_indices_walk_seeded_permutations_epoch_by_epoch():
    n, batch = 10, 4
    order = [i for step in range(5) for i in batch_indices(step, batch, n, seed=3)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]  # each epoch has its own permutation
    assert order == [i for step in range(5) for i in batch_indices(step, batch, n, seed=3)]
    assert order != [i for step in range(5) for i in batch_indices(step, batch, n, seed=4)]


def test_training_windows_end_each_document_with_eos(tmp_path):
    class Tokenizer:
        eos_token_id = 0

        def __call__(self, text):
            class Encoding:
                input_ids = [ord(c) for c in text]

            return Encoding()

    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "defgh"}) + "\n")
    windows = training_windows(Tokenizer(), TextSource("docs", "jsonl", str(path)), 3)
    assert windows.tolist() == [[97, 98, 99], [0, 100, 101], [102, 103, 104]]  # the final eos does not fill a window


def _pruned_pair():
    """A tiny dense teacher and a pruned student (one query head per group and half the FFN gone in layer 1)."""
    teacher = tiny_model()
    plans = keep_everything(block_shape(teacher.config))
    plans[1] = LayerPlan((0, 1, 3, 4), (0, 1), tuple(range(0, 64, 2)))  # 6 heads in 2 groups -> 2 per group
    return teacher, prune_model(teacher, plans)


def _settings(**overrides) -> RecoverySection:
    values = {
        "method": "distill",
        "tokens": 6 * 2 * 16,
        "seqlen": 16,
        "batch_size": 2,
        "learning_rate": 0.01,
        "warmup_steps": 2,
        "eval_every": 2,
        "save_every": 2,
        "heldout_windows": 1,
        "train": "all",
    }
    return RecoverySection(**(values | overrides))


@pytest.mark.parametrize("method", ["distill", "lora"])
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch, method):
    teacher, student = _pruned_pair()
    windows, heldout = random_tokens(5, 16, seed=2), random_tokens(1, 32, seed=3)[0]
    settings = _settings(method=method, learning_rate={"distill": 0.002, "lora": 0.01}[method])

    uninterrupted, expected = recover(
        copy.deepcopy(student), teacher, windows, _heldout(heldout), settings, tmp_path / "a", progress=False
    )
    assert expected.steps == 6 and expected.resumed_from_step == 0 and len(expected.curve) == 4
    with torch.no_grad():  # it learned: the distillation loss on the training windows went down
        before, _ = training_loss(student, teacher, windows, settings)
        after, _ = training_loss(uninterrupted, teacher, windows, settings)
    assert float(after) < 0.9 * float(before)

    calls = {"n": 0}
    real_loss = recovery.training_loss

    def dies_in_step_five(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # steps 1-4 done, state saved after step 4
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(recovery, "training_loss", dies_in_step_five)
    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(student), teacher, windows, _heldout(heldout), settings, tmp_path / "b", progress=False)
    monkeypatch.setattr(recovery, "training_loss", real_loss)
    resumed, outcome = recover(
        copy.deepcopy(student), teacher, windows, _heldout(heldout), settings, tmp_path / "b", progress=False
    )

    assert outcome.resumed_from_step == 4
    expected_state, resumed_state = uninterrupted.state_dict(), resumed.state_dict()
    assert list(expected_state) == list(resumed_state) == list(student.state_dict())  # lora: merged, plain names
    assert all(torch.equal(expected_state[k], resumed_state[k]) for k in expected_state)
    assert outcome.curve == expected.curve
    strip = [{k: v for k, v in e.items() if k != "tokens_per_second"} for e in expected.log]
    assert [{k: v for k, v in e.items() if k != "tokens_per_second"} for e in outcome.log] == strip


@pytest.mark.parametrize("train", ["all", "decoder_layers"])
def test_training_leaves_the_teacher_untouched(tmp_path, train):
    teacher, student = _pruned_pair()  # the pruned model shares embeddings and norms with the dense one
    assert student.model.norm.weight.data_ptr() == teacher.model.norm.weight.data_ptr()
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    trained, _ = recover(
        student,
        teacher,
        random_tokens(5, 16, seed=2),
        _heldout(random_tokens(1, 16, seed=3)[0]),
        _settings(train=train, tokens=64),
        tmp_path,
        progress=False,
    )
    assert all(torch.equal(before[name], tensor) for name, tensor in teacher.state_dict().items())
    assert not torch.equal(
        trained.model.layers[0].input_layernorm.weight, teacher.model.layers[0].input_layernorm.weight
    )
    if train == "all":
        assert trained.lm_head.weight is trained.model.embed_tokens.weight  # still tied
        assert not torch.equal(trained.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_decoder_layers_setting_leaves_embeddings_unchanged(tmp_path):
    teacher, student = _pruned_pair()
    embeddings = student.model.embed_tokens.weight.clone()
    final_norm = student.model.norm.weight.clone()
    trained, _ = recover(
        student,
        teacher,
        random_tokens(5, 16, seed=2),
        _heldout(random_tokens(1, 16, seed=3)[0]),
        _settings(train="decoder_layers", tokens=64),
        tmp_path,
        progress=False,
    )
    assert torch.equal(trained.model.embed_tokens.weight, embeddings) and torch.equal(
        trained.model.norm.weight, final_norm
    )
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    assert not any(p.requires_grad for p in trained.parameters())


def test_merged_lora_gives_the_unmerged_logits_and_a_plain_checkpoint(tmp_path):
    class NoTokenizer:
        def save_pretrained(self, directory):
            pass

    _, student = _pruned_pair()
    names = list(student.state_dict())
    adapted = add_lora_adapters(student, RecoverySection(method="lora", lora_rank=4))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)  # peft starts B at zero, which would make the test trivial
    ids = random_tokens(2, 10)
    with torch.no_grad():
        unmerged = adapted(input_ids=ids).logits
        base = adapted.get_base_model()
        with adapted.disable_adapter():
            without = adapted(input_ids=ids).logits
    assert (unmerged - without).abs().max() > 0.1  # the adapters do change the output
    merged = adapted.merge_and_unload()
    assert list(merged.state_dict()) == names and merged is base
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, atol=5e-4, rtol=1e-4)
    save_checkpoint(merged, NoTokenizer(), tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, unmerged, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("recovery.method=finetune", "recovery.method: expected one of"),
        ("recovery.tokens=0", "recovery.tokens: must be > 0"),
        ("recovery.kl_weight=0", "recovery.nll_weight: must be >= 0, and kl_weight + nll_weight > 0"),
        ("recovery.temperature=0", "recovery.temperature: must be > 0"),
        ("recovery.train=embeddings", "recovery.train: expected one of"),
    ],
)
def test_recipe_errors_name_the_recovery_key(override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(None, [override])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_every_step_trains_with_a_positive_learning_rate(schedule):
    """Warm-up starts at lr / warmup_steps (not 0) and the last step of a decaying schedule is above 0."""
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], lr=0.01)
    scheduler = recovery.learning_rate_schedule(optimizer, _settings(schedule=schedule, warmup_steps=4), 12)
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert min(rates) > 0 and max(rates) == pytest.approx(0.01)
    if schedule != "constant":
        assert rates[-1] < rates[4] and rates == sorted(rates[:4]) + sorted(rates[4:], reverse=True)
