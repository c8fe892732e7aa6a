"""Sequential reconstruction: exact cases, the least-squares optimality of each refit, and a measured gain."""

import pytest
import torch
from conftest import FAMILY_TYPES, random_tokens, tiny_model

from prune.blocks import block_shape, decoder_layers
from prune.pruner import LayerPlan, keep_everything, prune_model
from prune.reconstruct import least_squares_refit
from prune.sequential import sequential_refit

PLAN = LayerPlan((0, 2, 3, 5), (0, 1), tuple(range(0, 64, 2)))


def _sequential(model, plans, samples, damping=0.0):
    refit = sequential_refit(model, list(samples), block_shape(model.config).head_dim, damping, progress=False)
    return prune_model(model, plans, output_bias=True, refit=refit)


def _inputs(model, linear_name, layer, samples):
    """The input [N*T, F] of one linear of one decoder layer over ``samples``."""
    captured = []
    linear = decoder_layers(model)[layer].get_submodule(linear_name)
    handle = linear.register_forward_pre_hook(lambda m, a: captured.append(a[0].flatten(0, 1)))
    with torch.no_grad():
        model(samples)
    handle.remove()
    return torch.cat(captured).double()


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_keeping_everything_changes_no_logit(family):
    model = tiny_model(family)
    samples = random_tokens(8, 24)  # 192 tokens: more than the 97 columns of o_proj's augmented input
    pruned = _sequential(model, keep_everything(block_shape(model.config)), samples)
    x = random_tokens(2, 11, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, model(x).logits, atol=2e-4, rtol=1e-4)


def test_first_o_proj_refit_equals_the_one_shot_refit():
    """Layer 0's o_proj sees the same inputs in the dense and the pruned model: the one-shot refit."""
    model = tiny_model()
    samples = random_tokens(8, 16)
    pruned = _sequential(model, [PLAN] * 3, samples, damping=0.01)
    x = _inputs(model, "self_attn.o_proj", 0, samples)
    dense_o = decoder_layers(model)[0].self_attn.o_proj
    columns = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in PLAN.kept_query_heads])
    weight, bias = least_squares_refit(dense_o.weight, None, columns, x.T @ x, x.sum(0), len(x), damping=0.01)
    refit_o = decoder_layers(pruned)[0].self_attn.o_proj
    torch.testing.assert_close(refit_o.weight, weight.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(refit_o.bias, bias.float(), atol=1e-4, rtol=1e-4)


def _dense_inputs_on_pruned_states(model, pruned, layer, module_name, linear_name, samples):
    """The input [N*T, F] of the dense layer's ``linear_name`` when the dense ``module_name`` (self_attn or mlp) of
    ``layer`` runs on exactly what the pruned model feeds its own ``module_name`` there."""
    calls, captured = [], []
    pruned_module = decoder_layers(pruned)[layer].get_submodule(module_name)
    handle = pruned_module.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        pruned(samples, use_cache=False)  # a KV cache in the captured arguments would grow at every call
    handle.remove()
    dense_module = decoder_layers(model)[layer].get_submodule(module_name)
    linear = dense_module.get_submodule(linear_name)
    handle = linear.register_forward_pre_hook(lambda m, a: captured.append(a[0].flatten(0, 1)))
    with torch.no_grad():
        for args, kwargs in calls:
            dense_module(*args, **kwargs)
    handle.remove()
    return torch.cat(captured).double()


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_each_refit_is_the_least_squares_fit_to_the_dense_linear_on_the_pruned_models_inputs(family):
    """Without damping, the residual W x̂ + b - (W' x̂_K + b') is orthogonal to every kept input and to 1 (the normal
    equations), for every refit linear of every layer; x̂: the dense linear's input on the pruned model's states.
    Past layer 0 this holds only if the refit carried the pruned layers' outputs, which it assembles from the
    attention output and down_proj's kept inputs it kept, exactly as the pruned model computes them."""
    model = tiny_model(family)
    head_dim = block_shape(model.config).head_dim
    samples = random_tokens(8, 24)
    plans = [PLAN, LayerPlan((1, 2, 4, 5), (0, 1), tuple(range(30))), PLAN]
    pruned = _sequential(model, plans, samples)
    for layer, plan in enumerate(plans):
        kept = {
            "o_proj": torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in plan.kept_query_heads]),
            "down_proj": torch.tensor(plan.kept_ffn_channels),
        }
        for module, linear in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            x = _dense_inputs_on_pruned_states(model, pruned, layer, module, linear, samples)
            x_hat = x[:, kept[linear]]
            dense_linear = decoder_layers(model)[layer].get_submodule(f"{module}.{linear}")
            pruned_linear = decoder_layers(pruned)[layer].get_submodule(f"{module}.{linear}")
            with torch.no_grad():
                residual = dense_linear(x.float()).double() - pruned_linear(x_hat.float()).double()
            augmented = torch.cat([x_hat, torch.ones(len(x_hat), 1, dtype=torch.float64)], 1)
            normal = residual.T @ augmented / len(x_hat)
            assert float(normal.abs().max()) < 1e-4 * float(residual.abs().mean())


def test_the_refit_with_a_scratch_directory_gives_the_same_model_and_leaves_no_file(tmp_path):
    """What a layer's refit carries (attention outputs, kept down_proj inputs) in files, as a run keeps them: the
    same weights as in memory, and the files removed as read."""
    model = tiny_model("qwen2")
    samples = random_tokens(8, 24)
    plans = [PLAN, LayerPlan((1, 2, 4, 5), (0, 1), tuple(range(30))), PLAN]
    in_memory = _sequential(model, plans, samples)
    head_dim = block_shape(model.config).head_dim
    refit = sequential_refit(model, list(samples), head_dim, 0.0, progress=False, scratch=tmp_path / "refit")
    with_files = prune_model(model, plans, output_bias=True, refit=refit)
    expected = in_memory.state_dict()
    for name, tensor in with_files.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert list((tmp_path / "refit").iterdir()) == []


def test_sequential_output_error_is_below_the_one_shot_one():
    """On the calibration samples, the last layer's output is closer to the dense one than with one-shot lstsq."""
    from conftest import ALL_STATISTICS

    from prune.reconstruct import reconstructed_layer
    from prune.statistics import collect_statistics

    model = tiny_model(layers=4)
    samples = random_tokens(8, 24)
    shape = block_shape(model.config)
    plans = [PLAN] * 4
    statistics = collect_statistics(model, samples, "max_logit", ALL_STATISTICS, progress=False)

    def one_shot(index, layer, plan):
        return reconstructed_layer(index, layer, plan, shape.head_dim, statistics, "lstsq", damping=0.0)

    models = {"one-shot": prune_model(model, plans, output_bias=True, refit=one_shot)}
    models["sequential"] = _sequential(model, plans, samples)
    with torch.no_grad():
        dense = model.model(samples).last_hidden_state
        errors = {k: float((m.model(samples).last_hidden_state - dense).square().mean()) for k, m in models.items()}
    assert errors["sequential"] < errors["one-shot"]


def test_layers_must_come_in_order():
    model = tiny_model()
    refit = sequential_refit(model, list(random_tokens(2, 8)), 16, 0.0, progress=False)
    with pytest.raises(ValueError, match="layer 1 after layer -1"):
        refit(1, decoder_layers(model)[1], PLAN)


def test_the_progress_bar_starts_with_the_first_layer(capsys):
    """Nothing is printed when the refit is built (before the pruning stage announces itself on a line of its own)."""
    model = tiny_model()
    refit = sequential_refit(model, list(random_tokens(2, 8)), 16, 0.0, progress=True)
    assert capsys.readouterr().err == ""
    refit(0, decoder_layers(model)[0], PLAN)
    assert "sequential reconstruction" in capsys.readouterr().err
