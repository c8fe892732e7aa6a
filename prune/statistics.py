"""Activation statistics: the passes over the calibration samples that every scorer and allocator reads.

What is collected is what the recipe's methods declare they need (:class:`Statistic`; the registries in
``scoring.py``, ``allocation.py`` and ``reconstruct.py``). Per calibration sample s (one backward pass
each, so the absolute value is taken per sample, as in the paper), for every weight w of the 7 linear
layers of every decoder block:

    A(s, w) = |w * dD(s)/dw|        D = largest next-token logit at the last position ("max_logit")
                                    or the mean token NLL of the sample ("nll")

A parameter hook adds |w * grad| into a float32 accumulator the moment the gradient of that weight
is ready and frees the gradient, so at most one gradient exists at a time, and every decoder layer
is checkpointed (its activations are recomputed in the backward pass instead of kept). After the
pass the per-weight mean over samples is reduced to what the later stages need and the accumulators
are dropped; then a second, forward-only pass over the same samples collects the input statistics
(so the input second moments never coexist with the accumulators). Tensors, by what provides them:

- gradient products: ``layers.{i}.{linear}.row_sum`` / ``row_max`` [out_features]: sum / max over each
  output row of mean A; ``col_sum`` / ``col_max`` [in_features]: the same over each input column;
  ``layers.{i}.log10_hist`` [HIST_BINS]: histogram of log10(mean A) over all weights of the layer's
  7 linears (bins of HIST_WIDTH decades from HIST_MIN), from which the number of weights above any
  threshold is read;
- summed gradients: ``layers.{i}.{linear}.taylor_row_sum`` etc.: the same reductions of
  |w * mean_s dD(s)/dw| (LLM-Pruner's first-order Taylor term);
- input sums: ``layers.{i}.{site}.x_sum`` / ``x_sumsq`` [features]: sum and sum of squares over
  calibration tokens of the input of a linear (sites: ``attn_in`` = q/k/v input, ``o_in``, ``mlp_in``
  = gate/up input, ``down_in``);
- second moments: ``layers.{i}.{site}.xxt`` [features, features] (sum of x xᵀ) for ``o_in`` and ``down_in``;
- layer cosines: ``layers.{i}.cos_sum`` [1]: sum over tokens of cos(layer input, layer output) (Block Influence).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import PreTrainedModel

from prune.blocks import LINEAR_NAMES, decoder_layers, layer_linears
from prune.paths import DamagedCacheError, atomic_path, sha256_bytes

STATS_VERSION = 3
HIST_MIN = -20.0
HIST_WIDTH = 0.01
HIST_BINS = 2500  # log10(A) from -20 to +5 in 0.01-decade bins; values outside are clamped into the end bins
INPUT_SITE_OF_LINEAR = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_in",
}
INPUT_SITES = {site: linear for linear, site in reversed(INPUT_SITE_OF_LINEAR.items())}
"""Each input site and the one linear whose forward pre-hook records it (the first that reads it)."""
COVARIANCE_SITES = ("o_in", "down_in")


class Statistic(enum.Enum):
    """What a method can ask of the statistics pass (the value names it in messages and reports)."""

    GRADIENT_PRODUCTS = "gradient products"
    """Backward pass: reductions and log10 histogram of mean_s |w * dD(s)/dw| (the activation metric)."""
    SUMMED_GRADIENTS = "summed gradients"
    """Backward pass: reductions of |w * mean_s dD(s)/dw| (first-order Taylor of D summed over samples)."""
    INPUT_SUMS = "input sums"
    """Forward pass: sum and sum of squares of every linear's input over the calibration tokens."""
    SECOND_MOMENTS = "second moments"
    """Forward pass: sum of x xᵀ of the o_proj and down_proj inputs."""
    LAYER_COSINES = "layer cosines"
    """Forward pass: sum over tokens of cos(input, output) of every decoder layer."""


BACKWARD = frozenset({Statistic.GRADIENT_PRODUCTS, Statistic.SUMMED_GRADIENTS})
FORWARD = frozenset({Statistic.INPUT_SUMS, Statistic.SECOND_MOMENTS, Statistic.LAYER_COSINES})
MARKER_TENSORS = {
    Statistic.GRADIENT_PRODUCTS: "layers.0.log10_hist",
    Statistic.SUMMED_GRADIENTS: "layers.0.q_proj.taylor_row_sum",
    Statistic.INPUT_SUMS: "layers.0.attn_in.x_sum",
    Statistic.SECOND_MOMENTS: f"layers.0.{COVARIANCE_SITES[0]}.xxt",
    Statistic.LAYER_COSINES: "layers.0.cos_sum",
}
"""A tensor whose presence shows that a statistic was collected."""


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
    def provides(self) -> frozenset[Statistic]:
        """The statistics these tensors hold."""
        return frozenset(kind for kind, marker in MARKER_TENSORS.items() if marker in self.tensors)

    def merged(self, other: ActivationStatistics) -> ActivationStatistics:
        """These tensors and ``other``'s (same samples, tokens and objective), ``other`` winning on a clash."""
        if (self.samples, self.tokens, self.objective) != (other.samples, other.tokens, other.objective):
            raise ValueError("statistics of different calibration data cannot be merged")
        return ActivationStatistics(self.tensors | other.tensors, self.samples, self.tokens, self.objective)

    def checksum(self) -> str:
        """SHA-256 of the tensors' names, shapes, dtypes and bytes, in name order."""
        chunks = []
        for name in sorted(self.tensors):
            tensor = self.tensors[name].contiguous()
            chunks += [
                f"{name}:{list(tensor.shape)}:{tensor.dtype}".encode(),
                tensor.view(-1).view(torch.uint8).numpy(),
            ]
        return sha256_bytes(chunks)

    def save(self, path: Path) -> None:
        """Write atomically as safetensors (metadata: samples, tokens, objective, format version, checksum)."""
        metadata = {
            "samples": str(self.samples),
            "tokens": str(self.tokens),
            "objective": self.objective,
            "version": str(STATS_VERSION),
            "sha256": self.checksum(),
        }
        with atomic_path(path) as temporary:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(temporary), metadata=metadata)

    @classmethod
    def load(cls, path: Path) -> ActivationStatistics:
        """Read a file :meth:`save` wrote; DamagedCacheError when it is truncated, altered or of another version."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:  # safetensors reports a damaged file with its own exception types
            raise DamagedCacheError(f"not a readable statistics file ({type(error).__name__})") from None
        if metadata.get("version") != str(STATS_VERSION) or "sha256" not in metadata:
            raise DamagedCacheError(f"statistics of format version {metadata.get('version')}, not {STATS_VERSION}")
        statistics = cls(tensors, int(metadata["samples"]), int(metadata["tokens"]), metadata["objective"])
        if statistics.checksum() != metadata["sha256"]:
            raise DamagedCacheError("the statistics do not match their checksum")
        return statistics


class StatisticsError(ValueError):
    """Statistics from which no unit can be told from another (all zero, or not finite); the message says which."""


def check_statistics(statistics: ActivationStatistics) -> None:
    """StatisticsError when what was collected is not finite, or is zero everywhere (no unit could be ranked)."""
    totals = {
        Statistic.GRADIENT_PRODUCTS: ("row_sum", "every |w * dD/dw| is zero: D does not depend on the weights"),
        Statistic.SUMMED_GRADIENTS: ("taylor_row_sum", "every summed gradient product is zero"),
        Statistic.INPUT_SUMS: ("x_sumsq", "every linear layer's input is zero on the calibration text"),
    }
    for kind, (suffix, zero_message) in totals.items():
        if kind not in statistics.provides:
            continue
        values = [v for name, v in statistics.tensors.items() if name.endswith(suffix)]
        total = sum(float(v.double().sum()) for v in values)
        if not math.isfinite(total):
            raise StatisticsError(f"activation statistics: {kind.value} hold NaN or infinite values")
        if total == 0:
            raise StatisticsError(f"activation statistics: {zero_message}")


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


def objective_value(model: PreTrainedModel, input_ids: torch.Tensor, objective: str) -> torch.Tensor:
    """D for a batch [B, T] of token ids, summed over the batch (a scalar that carries gradients)."""
    if objective == "max_logit":
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, -1, :]
        return model.lm_head(hidden).max(dim=-1).values.sum()
    if objective == "nll":
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss * input_ids.shape[0]
    raise ValueError(f"unknown objective {objective!r}")


def row_col_reductions(score: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row sums / maxima [out] and column sums / maxima [in] of a per-weight score matrix [out, in], on CPU."""
    return {
        "row_sum": score.sum(1).cpu(),
        "row_max": score.amax(1).cpu(),
        "col_sum": score.sum(0).cpu(),
        "col_max": score.amax(0).cpu(),
    }


def log10_histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts of log10(values) in HIST_BINS bins of HIST_WIDTH decades from HIST_MIN (float64, on CPU)."""
    logs = values.float().clamp_min(1e-38).log10().clamp(HIST_MIN, HIST_MIN + HIST_BINS * HIST_WIDTH - HIST_WIDTH / 2)
    bins = ((logs - HIST_MIN) / HIST_WIDTH).floor().long()
    return torch.bincount(bins.flatten(), minlength=HIST_BINS).double().cpu()


@contextmanager
def checkpointed_layers(layers):
    """Run every decoder layer under (non-reentrant) activation checkpointing while inside the block."""
    for layer in layers:
        original = layer.forward
        layer.forward = lambda *args, _forward=original, **kwargs: checkpoint(
            _forward, *args, use_reentrant=False, **kwargs
        )
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


def decoder_linear_weights(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer index, linear name): weight [out, in]} for the 7 linears of every decoder layer."""
    return {
        (i, name): linear.weight
        for i, layer in enumerate(decoder_layers(model))
        for name, linear in layer_linears(layer).items()
    }


def weight_gradient_products(
    model: PreTrainedModel, samples, objective: str, consume, progress: bool, desc: str, checkpoint_layers: bool = True
) -> None:
    """One backward pass of D per sample; ``consume(s, (layer, linear), w * dD(s)/dw)`` for every decoder linear.

    ``samples``: token-id tensors [T] (a [N, T] tensor or a list of unequal lengths). The product
    [out, in] is float32, a fresh tensor ``consume`` may modify; the gradient is freed right after,
    so at most one exists at a time. With ``checkpoint_layers`` the decoder layers' activations are
    recomputed in the backward pass instead of kept (about a quarter more compute; worth it for long
    samples). The model's ``requires_grad`` flags are restored and its weights are not modified.
    """
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    weights = decoder_linear_weights(model)
    current = [0]

    def hook_for(key):
        def hook(param: torch.Tensor) -> None:
            consume(current[0], key, param.detach().float() * cast(torch.Tensor, param.grad).float())
            param.grad = None

        return hook

    previous_flags = {p: p.requires_grad for p in model.parameters()}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for key, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(hook_for(key)))
        with torch.enable_grad(), checkpointed_layers(layers if checkpoint_layers else []):
            for s, sample in enumerate(tqdm(samples, desc=desc, unit="sample", disable=not progress)):
                current[0] = s
                objective_value(model, sample.unsqueeze(0).to(device), objective).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in previous_flags.items():
            p.requires_grad_(flag)
            p.grad = None


def mean_activation_reductions(
    accumulators: dict, samples: int, num_layers: int, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Row/column reductions and the per-layer log10 histogram of mean A = sum / samples.

    ``accumulators``: {(layer, linear): summed |w * grad| [out, in]}; consumed (emptied) to free memory early.
    ``prefix`` goes before the reduction names (``taylor_`` for the signed Taylor sums, no histogram then).
    """
    tensors: dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        histogram = torch.zeros(HIST_BINS, dtype=torch.float64)
        for name in LINEAR_NAMES:
            mean = accumulators.pop((i, name)).div_(samples).abs_()
            tensors |= {f"layers.{i}.{name}.{prefix}{k}": v for k, v in row_col_reductions(mean).items()}
            histogram += log10_histogram(mean)
        if not prefix:
            tensors[f"layers.{i}.log10_hist"] = histogram
    return tensors


def gradient_statistics(
    model: PreTrainedModel, samples: torch.Tensor, objective: str, products: bool, summed: bool, progress: bool
) -> dict[str, torch.Tensor]:
    """The backward pass: per-layer reductions of mean A (``products``) and of the Taylor term (``summed``)."""
    layers = decoder_layers(model)
    weights = decoder_linear_weights(model)
    accumulators = {key: torch.zeros_like(w, dtype=torch.float32) for key, w in weights.items()} if products else {}
    signed = {key: torch.zeros_like(w, dtype=torch.float32) for key, w in weights.items()} if summed else {}

    def accumulate(sample: int, key, product: torch.Tensor) -> None:
        if summed:
            signed[key].add_(product)
        if products:
            accumulators[key].add_(product.abs_())

    weight_gradient_products(model, samples, objective, accumulate, progress, f"activation statistics (D={objective})")
    tensors = mean_activation_reductions(accumulators, len(samples), len(layers)) if products else {}
    if summed:
        tensors |= mean_activation_reductions(signed, len(samples), len(layers), prefix="taylor_")
    return tensors


@torch.no_grad()
def input_statistics(
    model: PreTrainedModel, samples: torch.Tensor, sums: bool, covariances: bool, cosines: bool, progress: bool
) -> dict[str, torch.Tensor]:
    """The forward-only pass through the decoder (no head): input sums (``sums``; with ``covariances`` also
    ``xxt`` of the o_proj / down_proj inputs) per site, and cosine sums per layer (``cosines``)."""
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    accumulated: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        if key in accumulated:
            accumulated[key].add_(value)  # in place: a fresh sum per sample would churn the allocator
        else:
            accumulated[key] = value

    def accumulate_input(prefix, with_covariance):
        def hook(module, args):
            x = args[0].detach().flatten(0, -2)
            x64 = x.double()
            add(f"{prefix}.x_sum", x64.sum(0))
            add(f"{prefix}.x_sumsq", (x64 * x64).sum(0))
            if with_covariance:
                x32 = x.float()
                add(f"{prefix}.xxt", x32.T @ x32)

        return hook

    def accumulate_cosine(key):
        def hook(module, args, output):
            h_in, h_out = args[0].detach().flatten(0, -2).double(), output.detach().flatten(0, -2).double()
            add(key, torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum().reshape(1))

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            if cosines:
                handles.append(layer.register_forward_hook(accumulate_cosine(f"layers.{i}.cos_sum")))
            if sums:
                linears = layer_linears(layer)
                for site, linear_name in INPUT_SITES.items():
                    hook = accumulate_input(f"layers.{i}.{site}", covariances and site in COVARIANCE_SITES)
                    handles.append(linears[linear_name].register_forward_pre_hook(hook))
        for sample in tqdm(samples, desc="input statistics", unit="sample", disable=not progress):
            model.model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {k: v.float().cpu() for k, v in accumulated.items()}


def collect_statistics(
    model: PreTrainedModel, samples: torch.Tensor, objective: str, needs: frozenset[Statistic], progress: bool = True
) -> ActivationStatistics:
    """Run the statistics passes over ``samples`` [N, T] that ``needs`` asks for: one backward pass per sample
    (gradient products, summed gradients), then one forward-only pass (input sums, second moments, cosines).

    Second moments come with the input sums they are centred by. Summed gradients cost one more float32
    copy of the linear weights during the backward pass. The model's ``requires_grad`` flags are restored
    afterwards; its weights are not modified.
    """
    if Statistic.SECOND_MOMENTS in needs:
        needs = needs | {Statistic.INPUT_SUMS}
    tensors: dict[str, torch.Tensor] = {}
    if needs & BACKWARD:
        tensors = gradient_statistics(
            model,
            samples,
            objective,
            Statistic.GRADIENT_PRODUCTS in needs,
            Statistic.SUMMED_GRADIENTS in needs,
            progress,
        )
    if needs & FORWARD:
        tensors |= input_statistics(
            model,
            samples,
            Statistic.INPUT_SUMS in needs,
            Statistic.SECOND_MOMENTS in needs,
            Statistic.LAYER_COSINES in needs,
            progress,
        )
    return ActivationStatistics(tensors, samples=len(samples), tokens=samples.numel(), objective=objective)
