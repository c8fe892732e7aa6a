"""The statistics pass against brute-force autograd on a tiny model."""

import pytest
import torch
from conftest import ALL_STATISTICS, BASIC_STATISTICS, random_tokens, tiny_model

from prune.allocation import activated_count
from prune.blocks import LINEAR_NAMES, decoder_layers, layer_linears, split_fused_projections
from prune.paths import DamagedCacheError
from prune.statistics import (
    HIST_MIN,
    HIST_WIDTH,
    ActivationStatistics,
    Statistic,
    add_gram,
    add_whole_gram,
    collect_statistics,
    filled_gram,
    objective_value,
)


def _brute_force_mean_activation(model, samples, objective):
    """mean_s |w * dD(s)/dw| for every decoder linear weight, one autograd.grad call per sample."""
    weights = {
        (i, n): linear.weight
        for i, layer in enumerate(decoder_layers(model))
        for n, linear in layer_linears(layer).items()
    }
    total = {k: torch.zeros_like(w) for k, w in weights.items()}
    for sample in samples:
        grads = torch.autograd.grad(objective_value(model, sample[None], objective), list(weights.values()))
        for (k, w), g in zip(weights.items(), grads, strict=True):
            total[k] += (w.detach() * g).abs()
    return {k: v / len(samples) for k, v in total.items()}


@pytest.mark.parametrize("objective", ["max_logit", "nll"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_reduced_activation_matches_brute_force(objective, family):
    model = tiny_model(family)
    split_fused_projections(model)  # as the pass does (Phi-3), so that the parameter names below stay the same
    samples = random_tokens(3, 10)  # longer than Gemma's 4-token sliding window: its layers see different masks
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = collect_statistics(model, samples, objective, BASIC_STATISTICS, progress=False)
    brute = _brute_force_mean_activation(model, samples, objective)
    for (i, name), mean in brute.items():
        torch.testing.assert_close(stats.get(i, f"{name}.row_sum"), mean.sum(1), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats.get(i, f"{name}.col_sum"), mean.sum(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats.get(i, f"{name}.row_max"), mean.amax(1), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats.get(i, f"{name}.col_max"), mean.amax(0), rtol=1e-4, atol=1e-7)
    # the weights, their requires_grad flags and .grad are left as they were
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad and p.grad is None
    assert stats.samples == 3 and stats.tokens == 30 and stats.objective == objective


def test_histogram_counts_match_brute_force():
    model = tiny_model()
    samples = random_tokens(2, 8)
    stats = collect_statistics(model, samples, "max_logit", BASIC_STATISTICS, progress=False)
    brute = _brute_force_mean_activation(model, samples, "max_logit")
    for layer in range(3):
        values = torch.cat([brute[(layer, n)].flatten() for n in LINEAR_NAMES]).double()
        assert stats.get(layer, "log10_hist").sum() == values.numel()
        median_bin = int(((values.median().log10() - HIST_MIN) / HIST_WIDTH).floor())
        for k in (median_bin - 50, median_bin, median_bin + 30):
            threshold = 10 ** (HIST_MIN + k * HIST_WIDTH)
            exact = int((values > threshold).sum())
            # exact up to weights whose log10 sits within float32 rounding of the bin edge
            assert abs(activated_count(stats.get(layer, "log10_hist"), threshold) - exact) <= 2


def test_input_statistics_match_hidden_states():
    model = tiny_model()
    samples = random_tokens(2, 8)
    stats = collect_statistics(model, samples, "nll", BASIC_STATISTICS, progress=False)
    expected_sum = torch.zeros(96, dtype=torch.float64)
    expected_sumsq = torch.zeros(96, dtype=torch.float64)
    with torch.no_grad():
        for sample in samples:
            hidden = model(sample[None], output_hidden_states=True).hidden_states[1]  # input of layer 1
            x = decoder_layers(model)[1].input_layernorm(hidden)[0].double()
            expected_sum += x.sum(0)
            expected_sumsq += (x * x).sum(0)
    torch.testing.assert_close(stats.get(1, "attn_in.x_sum").double(), expected_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.get(1, "attn_in.x_sumsq").double(), expected_sumsq, rtol=1e-5, atol=1e-5)
    assert stats.get(1, "down_in.x_sumsq").shape == (64,)
    assert stats.get(1, "o_in.x_sum").shape == (96,)


def test_save_and_load_round_trip(tmp_path):
    stats = collect_statistics(tiny_model(), random_tokens(2, 6), "max_logit", BASIC_STATISTICS, progress=False)
    stats.save(tmp_path / "s")
    loaded = ActivationStatistics.load(tmp_path / "s")
    assert (loaded.samples, loaded.tokens, loaded.objective) == (2, 12, "max_logit")
    assert loaded.tensors.keys() == stats.tensors.keys()
    for k, v in stats.tensors.items():
        assert torch.equal(loaded.tensors[k], v)


def test_taylor_reductions_match_brute_force():
    model = tiny_model()
    samples = random_tokens(3, 10)
    stats = collect_statistics(model, samples, "nll", ALL_STATISTICS, progress=False)
    weights = {
        (i, n): linear.weight
        for i, layer in enumerate(decoder_layers(model))
        for n, linear in layer_linears(layer).items()
    }
    summed = {k: torch.zeros_like(w) for k, w in weights.items()}
    for sample in samples:
        grads = torch.autograd.grad(objective_value(model, sample[None], "nll"), list(weights.values()))
        for k, g in zip(weights, grads, strict=True):
            summed[k] += g
    for (i, name), g in summed.items():
        score = (weights[(i, name)].detach() * g / len(samples)).abs()
        torch.testing.assert_close(stats.get(i, f"{name}.taylor_row_sum"), score.sum(1), rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(stats.get(i, f"{name}.taylor_col_max"), score.amax(0), rtol=1e-4, atol=1e-8)
    assert Statistic.SUMMED_GRADIENTS in stats.provides
    assert (
        Statistic.SUMMED_GRADIENTS
        not in collect_statistics(model, samples[:1], "nll", BASIC_STATISTICS, progress=False).provides
    )


def test_block_influence_matches_hidden_state_cosines():
    model = tiny_model()
    samples = random_tokens(2, 8)
    stats = collect_statistics(model, samples, "max_logit", BASIC_STATISTICS, progress=False)
    expected = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for sample in samples:
            hidden = model(sample[None], output_hidden_states=True).hidden_states
            for i in range(2):  # the last entry of hidden_states is after the final norm
                expected[i] += torch.nn.functional.cosine_similarity(
                    hidden[i][0].double(), hidden[i + 1][0].double(), dim=-1
                ).sum()
    for i in range(2):
        torch.testing.assert_close(stats.get(i, "cos_sum").double(), expected[i : i + 1], rtol=1e-5, atol=1e-6)
    assert float(stats.get(2, "cos_sum")) < 16


def test_second_moments_in_layer_files_and_hidden_states_in_scratch_files_change_nothing(tmp_path):
    model = tiny_model("qwen2")
    samples = random_tokens(3, 12)
    in_memory = collect_statistics(model, samples, "nll", ALL_STATISTICS, progress=False)
    (tmp_path / "scratch").mkdir()
    on_disk = collect_statistics(
        model, samples, "nll", ALL_STATISTICS, progress=False, store=tmp_path / "s", scratch=tmp_path / "scratch"
    )
    assert not list((tmp_path / "scratch").iterdir())  # every layer's hidden states were read back and removed
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [f"second-moments-{i}.safetensors" for i in range(3)]
    assert not any(name.endswith(".xxt") for name in on_disk.tensors)
    assert on_disk.tensors.keys() | {k for k in in_memory.tensors if k.endswith(".xxt")} == in_memory.tensors.keys()
    for name, tensor in in_memory.tensors.items():
        layer, rest = int(name.split(".")[1]), name.split(".", 2)[2]
        assert torch.equal(on_disk.get(layer, rest), tensor), name
    on_disk.save(tmp_path / "s")
    loaded = ActivationStatistics.load(tmp_path / "s")
    assert loaded.provides == frozenset(Statistic) and torch.equal(
        loaded.get(2, "down_in.xxt"), in_memory.get(2, "down_in.xxt")
    )
    layer_file = tmp_path / "s" / "second-moments-1.safetensors"
    damaged = bytearray(layer_file.read_bytes())
    damaged[-5] ^= 0x01  # one flipped bit in a layer file is noticed
    layer_file.write_bytes(bytes(damaged))
    with pytest.raises(DamagedCacheError, match="second-moments-1.safetensors does not match its checksum"):
        ActivationStatistics.load(tmp_path / "s")
    layer_file.unlink()
    with pytest.raises(DamagedCacheError, match="second-moments-1.safetensors is missing"):
        ActivationStatistics.load(tmp_path / "s")


def test_gram_sums_add_the_lower_triangle_on_the_cpu_and_fill_to_x_transpose_x():
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(37, 301, generator=generator) for _ in range(3)]
    total = torch.zeros(301, 301)
    for x in inputs:
        add_gram(total, x)
    assert torch.triu(total, 1).count_nonzero() == 0  # the symmetric rank-k update: lower triangle only
    expected = sum(x.T @ x for x in inputs)
    filled = filled_gram(total, block=64)  # 301 features: a last block of 45
    assert filled is total and torch.equal(filled, filled.T)
    torch.testing.assert_close(filled, expected, rtol=1e-5, atol=1e-4)
    whole = (expected + expected.T) / 2  # what addmm_ adds on CUDA: the whole (symmetric) matrix
    assert torch.equal(filled_gram(whole.clone(), block=64), whole)
    on_cuda = torch.zeros(301, 301)  # CUDA's adder, run here
    for x in inputs:
        add_whole_gram(on_cuda, x)
    torch.testing.assert_close(filled_gram(on_cuda, block=64), expected, rtol=1e-5, atol=1e-4)
