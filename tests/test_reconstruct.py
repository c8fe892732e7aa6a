"""Reconstruction of o_proj / down_proj outputs: exact cases and a measured improvement."""

import pytest
import torch
from conftest import ALL_STATISTICS, random_tokens, tiny_model

import prune.reconstruct
from prune.blocks import block_shape, decoder_layers
from prune.pruner import LayerPlan, prune_model
from prune.reconstruct import (
    cholesky_in_place,
    compensated_bias,
    least_squares_refit,
    lower_inverse_by_solve,
    lower_inverse_in_place,
    reconstructed_layer,
    second_moment,
)
from prune.statistics import collect_statistics


def _moments(x):
    """x [tokens, F] -> (Σ x xᵀ, Σ x, tokens)."""
    x = x.double()
    return x.T @ x, x.sum(0), x.shape[0]


def test_refit_keeping_everything_returns_the_weights():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(200, 12, generator=g), torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    weight, bias = least_squares_refit(w, b, torch.arange(12), *_moments(x), damping=0.0)
    torch.testing.assert_close(weight, w.double(), atol=1e-9, rtol=0)
    torch.testing.assert_close(bias, b.double(), atol=1e-9, rtol=0)


def test_refit_is_exact_when_removed_inputs_depend_linearly_on_kept_ones():
    g = torch.Generator().manual_seed(1)
    kept_inputs = torch.randn(300, 8, generator=g, dtype=torch.float64)
    mix = torch.randn(8, 4, generator=g, dtype=torch.float64)
    x = torch.cat([kept_inputs, kept_inputs @ mix + 0.5], 1)  # removed columns = linear map of kept + constant
    w = torch.randn(6, 12, generator=g)
    weight, bias = least_squares_refit(w, None, torch.arange(8), *_moments(x), damping=0.0)
    torch.testing.assert_close(x[:, :8].double() @ weight.T + bias, x.double() @ w.double().T, atol=1e-8, rtol=0)
    # and it is the least-squares optimum: no other kept-column weights do better
    error = ((x[:, :8].double() @ weight.T + bias - x.double() @ w.double().T) ** 2).sum()
    plain = ((x[:, :8].double() @ w[:, :8].double().T - x.double() @ w.double().T) ** 2).sum()
    assert error < 1e-10 < plain


def test_refit_in_row_blocks_equals_the_formula_on_the_whole_second_moment(monkeypatch):
    """Blocks of 5 rows of a float32 Σ x xᵀ (as the statistics store it), unordered kept columns, a bias, damping:
    the module docstring's formula with the whole [F+1, F+1] S and an LU solve."""
    monkeypatch.setattr(prune.reconstruct, "ROW_BLOCK", 5)
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(400, 17, generator=g) + 0.3, torch.randn(6, 17, generator=g), torch.randn(6, generator=g)
    xxt, x_sum, tokens = (x.T @ x).float(), x.sum(0), x.shape[0]
    kept, damping = torch.tensor([16, 3, 0, 9, 11, 4, 7, 12, 1, 14, 5, 8]), 0.01
    weight, bias = least_squares_refit(w, b, kept, xxt, x_sum, tokens, damping)
    second = second_moment(xxt, x_sum, tokens)
    second[kept, kept] += damping * float(second[kept, kept].mean())  # S_λ: the kept features' diagonal damped
    columns = torch.cat([kept, torch.tensor([17])])
    gram = second[columns][:, columns]
    expected = torch.linalg.solve(gram, (torch.cat([w.double(), b.double()[:, None]], 1) @ second[:, columns]).T).T
    torch.testing.assert_close(weight, expected[:, :-1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(bias, expected[:, -1], atol=1e-10, rtol=1e-10)


def test_a_strong_damping_pulls_the_refit_towards_the_kept_weights_and_the_compensated_bias():
    """The ridge is on the change of the kept weights: as it grows the refit tends to FLAP's bias compensation
    (W[:, K] as it is, the removed columns' mean output as a bias), not to zero weights."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 16, generator=g) @ torch.randn(16, 16, generator=g) + 0.5  # correlated inputs
    w, b, kept = torch.randn(4, 16, generator=g), torch.randn(4, generator=g), torch.arange(0, 16, 2)
    flap = compensated_bias(w, b, kept, x.double().mean(0))
    distances = []
    for damping in (0.0, 1.0, 1e8):
        weight, bias = least_squares_refit(w, b, kept, *_moments(x), damping)
        distances.append(float((weight - w.double()[:, kept]).norm()))
    torch.testing.assert_close(weight, w.double()[:, kept], atol=1e-6, rtol=0)
    torch.testing.assert_close(bias, flap, atol=1e-6, rtol=0)
    assert distances[0] > distances[1] > distances[2]


def test_the_refit_keeps_the_kept_weights_on_input_directions_no_calibration_token_has():
    """Fewer calibration tokens than kept inputs: on a direction v of the kept inputs orthogonal to every token's,
    the damped refit's output is the dense kept columns' (W'_K v = W[:, K] v); a ridge towards zero weights gave 0."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(10, 16, generator=g, dtype=torch.float64), torch.randn(5, 16, generator=g)
    kept = torch.arange(12)
    unseen = torch.linalg.svd(x[:, kept]).Vh[-1]  # [12], orthogonal to the 10 tokens' kept inputs
    assert float((x[:, kept] @ unseen).abs().max()) < 1e-12
    weight, _ = least_squares_refit(w, None, kept, *_moments(x), damping=0.5)
    torch.testing.assert_close(weight @ unseen, w.double()[:, kept] @ unseen, atol=1e-9, rtol=0)
    assert float((w.double()[:, kept] @ unseen).abs().max()) > 0.1


def test_the_refit_a_gpu_runs_equals_the_cpu_one(monkeypatch):
    """On a GPU the factor and the solve are torch's (a new matrix each): the same refit."""
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(300, 20, generator=g) + 0.2, torch.randn(5, 20, generator=g)
    kept, arguments = torch.tensor([1, 4, 5, 9, 12, 13, 17, 19]), ((x.T @ x).float(), x.sum(0), 300, 0.01)
    on_cpu = least_squares_refit(w, None, kept, *arguments)
    monkeypatch.setattr(prune.reconstruct, "cholesky_in_place", torch.linalg.cholesky)
    monkeypatch.setattr(prune.reconstruct, "cholesky_solve", torch.cholesky_solve)
    on_gpu = least_squares_refit(w, None, kept, *arguments)
    for cpu, gpu in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(gpu, cpu, atol=1e-10, rtol=1e-10)


def test_refit_with_fewer_tokens_than_kept_inputs_and_no_damping_fits_the_tokens():
    """S[K̃, K̃] is singular (not positive definite): the refit still interpolates the calibration tokens."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 12, generator=g, dtype=torch.float64), torch.randn(4, 12, generator=g)
    weight, bias = least_squares_refit(w, None, torch.arange(9), *_moments(x), damping=0.0)
    torch.testing.assert_close(x[:, :9] @ weight.T + bias, x @ w.double().T, atol=1e-6, rtol=0)


def test_the_cholesky_factor_is_written_over_the_matrix():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64)
    matrix = x.T @ x / 300
    expected = torch.linalg.cholesky(matrix)
    address = matrix.data_ptr()
    lower = cholesky_in_place(matrix)
    assert lower.data_ptr() == address  # no second matrix
    torch.testing.assert_close(lower, expected, atol=1e-12, rtol=0)
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky_in_place(-torch.eye(3, dtype=torch.float64))


def test_the_inverse_of_the_factor_is_written_over_it_and_the_gpu_path_gives_the_same():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 30, generator=g, dtype=torch.float64)
    lower = torch.linalg.cholesky(x.T @ x / 200)
    expected = torch.linalg.inv(lower)
    torch.testing.assert_close(lower_inverse_by_solve(lower), expected, atol=1e-10, rtol=0)  # what a GPU runs
    factor = cholesky_in_place(x.T @ x / 200)
    address = factor.data_ptr()
    inverse = lower_inverse_in_place(factor)
    assert inverse.data_ptr() == address
    torch.testing.assert_close(inverse, expected, atol=1e-10, rtol=0)


def test_bias_compensation_is_exact_for_constant_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(50, 6, generator=g), torch.full((50, 3), 0.7)], 1)
    w = torch.randn(4, 9, generator=g)
    bias = compensated_bias(w, None, torch.arange(6), x.double().mean(0))
    torch.testing.assert_close(
        x[:, :6].double() @ w[:, :6].double().T + bias, x.double() @ w.double().T, atol=1e-10, rtol=0
    )


def test_reconstruction_brings_layer_outputs_closer_to_dense():
    model = tiny_model()
    shape = block_shape(model.config)
    samples = random_tokens(8, 16)
    statistics = collect_statistics(model, samples, "max_logit", ALL_STATISTICS, progress=False)
    plans = [LayerPlan((0, 2, 3, 5), (0, 1), tuple(range(0, 64, 2)))] * 3
    models = {"none": prune_model(model, plans, output_bias=True)}
    for method in ("bias", "lstsq"):

        def refit(index, layer, plan, method=method):
            return reconstructed_layer(index, layer, plan, shape.head_dim, statistics, method, damping=0.0)

        models[method] = prune_model(model, plans, output_bias=True, refit=refit)
    # the down_proj output of layer 1 on the dense model's own calibration inputs (what the refit optimises)
    captured = {}
    handle = decoder_layers(model)[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    with torch.no_grad():
        model(samples)
    handle.remove()
    x = captured["x"].flatten(0, 1)
    kept = torch.tensor(plans[1].kept_ffn_channels)
    errors = {}
    with torch.no_grad():
        dense_out = decoder_layers(model)[1].mlp.down_proj(x)
        for method, pruned in models.items():
            out = decoder_layers(pruned)[1].mlp.down_proj(x[:, kept])
            errors[method] = float((out - dense_out).square().mean())
            if method != "none":  # both fit a bias, which restores the mean output exactly
                torch.testing.assert_close(out.mean(0), dense_out.mean(0), atol=1e-4, rtol=1e-4)
    # least squares is optimal over kept-column maps with a bias, so it beats bias compensation
    assert errors["lstsq"] < errors["bias"] < errors["none"]


def test_pruning_in_place_gives_the_same_model_and_releases_the_dense_layers():
    model = tiny_model("qwen2", layers=4)
    shape = block_shape(model.config)
    statistics = collect_statistics(model, random_tokens(4, 12), "max_logit", ALL_STATISTICS, progress=False)
    plans = [LayerPlan((0, 2, 3, 5), (0, 1), tuple(range(0, 64, 2))), None] + [
        LayerPlan((0, 1, 2), (0,), tuple(range(40)))
    ] * 2

    def refit(index, layer, plan):
        return reconstructed_layer(index, layer, plan, shape.head_dim, statistics, "lstsq", damping=0.01)

    kept = prune_model(model, plans, output_bias=True, refit=refit)
    in_place = prune_model(model, plans, output_bias=True, refit=refit, in_place=True)
    assert kept.state_dict().keys() == in_place.state_dict().keys()
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in in_place.state_dict().items())
    assert all(layer.mlp.down_proj.weight.numel() == 0 for layer in decoder_layers(model))  # released
    x = random_tokens(2, 9)
    assert torch.equal(kept(x).logits, in_place(x).logits)
