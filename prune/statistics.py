"""Activation statistics: one pass over the calibration samples that every scorer and allocator reads.

Per calibration sample s (one backward pass each, so the absolute value is taken per sample, as in
the paper), for every weight w of the 7 linear layers of every decoder block:

    A(s, w) = |w * dD(s)/dw|        D = largest next-token logit at the last position ("max_logit")
                                    or the mean token NLL of the sample ("nll")

A parameter hook adds |w * grad| into a float32 accumulator the moment the gradient of that weight
is ready and frees the gradient, so at most one gradient exists at a time. After the pass the
per-weight mean over samples is reduced to what the later stages need, and the accumulators are
dropped:

- ``layers.{i}.{linear}.row_sum`` / ``row_max`` [out_features]: sum / max over each output row of mean A;
- ``layers.{i}.{linear}.col_sum`` / ``col_max`` [in_features]: the same over each input column;
- ``layers.{i}.log10_hist`` [HIST_BINS]: histogram of log10(mean A) over all weights of the layer's
  7 linears (bins of HIST_WIDTH decades from HIST_MIN), from which the number of weights above any
  threshold is read;
- ``layers.{i}.{site}.x_sum`` / ``x_sumsq`` [features]: sum and sum of squares over calibration
  tokens of the input of a linear (sites: ``attn_in`` = q/k/v input, ``o_in``, ``mlp_in`` = gate/up
  input, ``down_in``), for input-aware scores (wanda-sp) and bias compensation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from prune.blocks import LINEAR_NAMES, decoder_layers, layer_linears

STATS_VERSION = 2
HIST_MIN = -20.0
HIST_WIDTH = 0.01
HIST_BINS = 2500  # log10(A) from -20 to +5 in 0.01-decade bins; values outside are clamped into the end bins
INPUT_SITE_OF_LINEAR = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                        "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
INPUT_SITES = {site: linear for linear, site in reversed(INPUT_SITE_OF_LINEAR.items())}
"""Each input site and the one linear whose forward pre-hook records it (the first that reads it)."""
COVARIANCE_SITES = ("o_in", "down_in")


@dataclass
class ActivationStatistics:
    """Reduced statistics (CPU tensors, names as in the module docstring) and how they were made."""

    tensors: dict[str, torch.Tensor]
    samples: int
    tokens: int
    """Calibration tokens that fed the input statistics (samples x seqlen)."""
    objective: str

    def get(self, layer: int, name: str) -> torch.Tensor:
        return self.tensors[f"layers.{layer}.{name}"]

    @property
    def has_covariances(self) -> bool:
        return f"layers.0.{COVARIANCE_SITES[0]}.xxt" in self.tensors

    @property
    def has_taylor(self) -> bool:
        return "layers.0.q_proj.taylor_row_sum" in self.tensors

    def save(self, path: Path) -> None:
        """Write atomically as safetensors (metadata: samples, tokens, objective, version)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"samples": str(self.samples), "tokens": str(self.tokens), "objective": self.objective,
                    "version": str(STATS_VERSION)}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: Path) -> "ActivationStatistics":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        return cls(load_file(str(path)), int(metadata["samples"]), int(metadata["tokens"]), metadata["objective"])


def cache_key(model_fingerprint: str, dtype: str, calibration: dict, data_fingerprint: str, objective: str) -> str:
    """Hex digest identifying statistics: same model, dtype, calibration data and objective -> same key."""
    description = {
        "version": STATS_VERSION,
        "model": model_fingerprint,
        "dtype": dtype,
        "calibration": calibration,
        "data": data_fingerprint,
        "objective": objective,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def objective_value(model, input_ids: torch.Tensor, objective: str) -> torch.Tensor:
    """D for a batch [B, T] of token ids, summed over the batch (a scalar that carries gradients)."""
    if objective == "max_logit":
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, -1, :]
        return model.lm_head(hidden).max(dim=-1).values.sum()
    if objective == "nll":
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss * input_ids.shape[0]
    raise ValueError(f"unknown objective {objective!r}")


def row_col_reductions(score: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row sums / maxima [out] and column sums / maxima [in] of a per-weight score matrix [out, in], on CPU."""
    return {"row_sum": score.sum(1).cpu(), "row_max": score.amax(1).cpu(),
            "col_sum": score.sum(0).cpu(), "col_max": score.amax(0).cpu()}


def log10_histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts of log10(values) in HIST_BINS bins of HIST_WIDTH decades from HIST_MIN (float64, on CPU)."""
    logs = values.float().clamp_min(1e-38).log10().clamp(HIST_MIN, HIST_MIN + HIST_BINS * HIST_WIDTH - HIST_WIDTH / 2)
    bins = ((logs - HIST_MIN) / HIST_WIDTH).floor().long()
    return torch.bincount(bins.flatten(), minlength=HIST_BINS).double().cpu()


def collect_statistics(model, samples: torch.Tensor, objective: str, covariances: bool = False,
                       taylor: bool = False, progress: bool = True) -> ActivationStatistics:
    """Run the statistics pass over ``samples`` [N, T] (one sample per backward pass).

    ``covariances`` adds the ``xxt`` sums, ``taylor`` the Taylor reductions (one more float32 copy of the
    linear weights during the pass).

    The model's ``requires_grad`` flags are restored afterwards; its weights are not modified.
    """
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    weights = {(i, name): linear.weight for i, layer in enumerate(layers) for name, linear in layer_linears(layer).items()}
    accumulators = {key: torch.zeros_like(w, dtype=torch.float32) for key, w in weights.items()}
    signed = {key: torch.zeros_like(w, dtype=torch.float32) for key, w in weights.items()} if taylor else {}
    input_sums: dict[str, torch.Tensor] = {}

    def accumulate_grad(key):
        def hook(param: torch.Tensor) -> None:
            product = param.detach().float() * param.grad.float()
            if taylor:
                signed[key].add_(product)
            accumulators[key].add_(product.abs_())
            param.grad = None

        return hook

    def accumulate_input(prefix, with_covariance):
        def hook(module, args):
            x = args[0].detach().flatten(0, -2)
            x64 = x.double()
            values = [("x_sum", x64.sum(0)), ("x_sumsq", (x64 * x64).sum(0))]
            if with_covariance:
                x32 = x.float()
                values.append(("xxt", x32.T @ x32))
            for name, value in values:
                key = f"{prefix}.{name}"
                input_sums[key] = input_sums[key] + value if key in input_sums else value

        return hook

    def accumulate_cosine(key):
        def hook(module, args, output):
            h_in, h_out = args[0].detach().flatten(0, -2).double(), output.detach().flatten(0, -2).double()
            value = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum().reshape(1)
            input_sums[key] = input_sums[key] + value if key in input_sums else value

        return hook

    previous_flags = {p: p.requires_grad for p in model.parameters()}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for key, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(accumulate_grad(key)))
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(accumulate_cosine(f"layers.{i}.cos_sum")))
            linears = layer_linears(layer)
            for site, linear_name in INPUT_SITES.items():
                hook = accumulate_input(f"layers.{i}.{site}", covariances and site in COVARIANCE_SITES)
                handles.append(linears[linear_name].register_forward_pre_hook(hook))
        with torch.enable_grad():
            for sample in tqdm(samples, desc=f"activation statistics (D={objective})", unit="sample", disable=not progress):
                objective_value(model, sample.unsqueeze(0).to(device), objective).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in previous_flags.items():
            p.requires_grad_(flag)
            p.grad = None

    n = len(samples)
    tensors = {k: v.float().cpu() for k, v in input_sums.items()}
    for i in range(len(layers)):
        histogram = torch.zeros(HIST_BINS, dtype=torch.float64)
        for name in LINEAR_NAMES:
            mean = accumulators.pop((i, name)).div_(n)
            tensors |= {f"layers.{i}.{name}.{k}": v for k, v in row_col_reductions(mean).items()}
            if taylor:
                tensors |= {f"layers.{i}.{name}.taylor_{k}": v
                            for k, v in row_col_reductions(signed.pop((i, name)).div_(n).abs_()).items()}
            histogram += log10_histogram(mean)
        tensors[f"layers.{i}.log10_hist"] = histogram
    return ActivationStatistics(tensors, samples=n, tokens=samples.numel(), objective=objective)
