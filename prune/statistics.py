"""Activation statistics: the passes over the calibration samples that every scorer and allocator reads.

What is collected is what the recipe's methods declare they need (:class:`Statistic`; the registries in
``scoring.py``, ``allocation.py`` and ``reconstruct.py``). Per calibration sample s (one backward pass
each, so the absolute value is taken per sample, as in the paper), for every weight w of the 7 linear
layers of every decoder block:

    A(s, w) = |w * dD(s)/dw|        D = largest next-token logit at the last position ("max_logit")
                                    or the mean token NLL of the sample ("nll")

The pass goes layer by layer, never through the whole model at once: every sample's hidden state
passes decoder layer 0, then layer 1, ... (the input statistics of a layer are collected as all
samples pass it; each layer's inputs are kept, in scratch files when given a directory); then, from
the top, layer i's forward is recomputed from its kept inputs and differentiated for every sample,
the gradient with respect to its input carried down to layer i - 1. So at any time one layer's
weight gradients, one layer's per-weight sums and one layer's second moments exist, and a layer's
per-weight mean is reduced to what the later stages need as soon as every sample has passed it.
Tensors, by what provides them:

- gradient products: ``layers.{i}.{linear}.row_sum`` / ``row_max`` [out_features]: sum / max over each
  output row of mean A; ``col_sum`` / ``col_max`` [in_features]: the same over each input column (with a
  leading expert dimension for the experts' gate/up/down of a mixture-of-experts layer);
  ``layers.{i}.log10_hist`` [HIST_BINS]: histogram of log10(mean A) over all weights of the layer's
  7 linears (bins of HIST_WIDTH decades from HIST_MIN), from which the number of weights above any
  threshold is read;
- summed gradients: ``layers.{i}.{linear}.taylor_row_sum`` etc.: the same reductions of
  |w * mean_s dD(s)/dw| (LLM-Pruner's first-order Taylor term);
- input sums: ``layers.{i}.{site}.x_sum`` / ``x_sumsq`` [features]: sum and sum of squares over
  calibration tokens of the input of a linear (sites: ``attn_in`` = q/k/v input, ``o_in``, ``mlp_in``
  = gate/up input, ``down_in``; in a mixture-of-experts layer only the attention's);
- second moments: ``layers.{i}.{site}.xxt`` [features, features] (sum of x xᵀ) for ``o_in`` and ``down_in``;
- layer cosines: ``layers.{i}.cos_sum`` [1]: sum over tokens of cos(layer input, layer output) (Block Influence).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scipy.linalg.blas
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from prune.blocks import LINEAR_NAMES, ExpertLinears, decoder_layers, layer_linears, split_fused_projections
from prune.paths import DamagedCacheError, atomic_path, file_sha256, sha256_bytes
from prune.placement import input_device, module_device, resident
from prune.processes import ALONE, Processes

STATS_VERSION = 4
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


SECOND_MOMENTS_FILE = "second-moments-{layer}.safetensors"
"""File of one layer's second moments in a statistics directory (when they are not kept in memory)."""
SUMMARY_FILE = "summary.safetensors"


@dataclass
class ActivationStatistics:
    """Reduced statistics (CPU tensors, names as in the module docstring) and how they were made.

    The second moments (``xxt``, [features, features] per site and layer; 17.6 GB for a 7B model in
    float32) are either in ``tensors`` or, when ``directory`` is set, in one file per layer there,
    read one tensor at a time by :meth:`get`; everything else is always in ``tensors``.
    """

    tensors: dict[str, torch.Tensor]
    samples: int
    tokens: int
    """Calibration tokens that fed the input statistics (samples x seqlen)."""
    objective: str
    provides: frozenset[Statistic]
    """The statistics these hold."""
    directory: Path | None = None
    """The directory holding the second moments, one file per layer, when they are not in ``tensors``."""

    def find(self, layer: int, name: str) -> torch.Tensor | None:
        """The tensor ``layers.{layer}.{name}``, or None when these statistics do not hold it."""
        key = f"layers.{layer}.{name}"
        if key in self.tensors:
            return self.tensors[key]
        path = None if self.directory is None else self.directory / SECOND_MOMENTS_FILE.format(layer=layer)
        if path is None or not name.endswith(".xxt") or not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            return f.get_tensor(key) if key in names else None

    def get(self, layer: int, name: str) -> torch.Tensor:
        tensor = self.find(layer, name)
        if tensor is None:
            raise KeyError(f"layers.{layer}.{name}")
        return tensor

    def merged(self, other: ActivationStatistics) -> ActivationStatistics:
        """These statistics and ``other``'s (same samples, tokens, objective and directory), ``other`` winning."""
        same = (self.samples, self.tokens, self.objective) == (other.samples, other.tokens, other.objective)
        if not same or (self.directory and other.directory and self.directory != other.directory):
            raise ValueError("statistics of different calibration data cannot be merged")
        return ActivationStatistics(
            self.tensors | other.tensors,
            self.samples,
            self.tokens,
            self.objective,
            self.provides | other.provides,
            self.directory or other.directory,
        )

    def checksum(self) -> str:
        """SHA-256 of the in-memory tensors' names, shapes, dtypes and bytes, in name order."""
        chunks = []
        for name in sorted(self.tensors):
            tensor = self.tensors[name].contiguous()
            description = f"{name}:{list(tensor.shape)}:{tensor.dtype}".encode()
            chunks += [description, tensor.view(-1).view(torch.uint8).numpy()]
        return sha256_bytes(chunks)

    def save_tensors(self, path: Path) -> None:
        """The in-memory tensors as one safetensors file, written atomically (metadata: samples, tokens, objective,
        what they provide, format version, checksum, and the SHA-256 of each second-moment file beside them)."""
        files = {}
        if self.directory is not None:
            files = {f.name: file_sha256(f) for f in sorted(self.directory.glob(SECOND_MOMENTS_FILE.format(layer="*")))}
        metadata = {
            "samples": str(self.samples),
            "tokens": str(self.tokens),
            "objective": self.objective,
            "provides": json.dumps(sorted(kind.value for kind in self.provides)),
            "second_moment_files": json.dumps(files),
            "version": str(STATS_VERSION),
            "sha256": self.checksum(),
        }
        with atomic_path(path) as temporary:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(temporary), metadata=metadata)

    def save(self, directory: Path) -> None:
        """Write into the statistics directory ``directory`` (which already holds any second-moment files)."""
        if self.directory not in (None, directory):
            raise ValueError(f"statistics whose second moments are in {self.directory} are saved there")
        directory.mkdir(parents=True, exist_ok=True)
        ActivationStatistics(
            self.tensors, self.samples, self.tokens, self.objective, self.provides, directory
        ).save_tensors(directory / SUMMARY_FILE)

    @classmethod
    def load(cls, directory: Path) -> ActivationStatistics:
        """Read what :meth:`save` wrote; DamagedCacheError when a file is missing, truncated, altered or of another
        format version."""
        path = directory / SUMMARY_FILE
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:  # safetensors reports a damaged file with its own exception types
            raise DamagedCacheError(f"not a readable statistics file ({type(error).__name__})") from None
        if metadata.get("version") != str(STATS_VERSION) or "sha256" not in metadata:
            raise DamagedCacheError(f"statistics of format version {metadata.get('version')}, not {STATS_VERSION}")
        provides = frozenset(Statistic(value) for value in json.loads(metadata["provides"]))
        statistics = cls(
            tensors, int(metadata["samples"]), int(metadata["tokens"]), metadata["objective"], provides, directory
        )
        if statistics.checksum() != metadata["sha256"]:
            raise DamagedCacheError("the statistics do not match their checksum")
        for name, digest in json.loads(metadata["second_moment_files"]).items():
            if not (directory / name).is_file():
                raise DamagedCacheError(f"{name} is missing")
            if file_sha256(directory / name) != digest:
                raise DamagedCacheError(f"{name} does not match its checksum")
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


def objective_from_normed(
    model: PreTrainedModel, normed: torch.Tensor, input_ids: torch.Tensor, objective: str
) -> torch.Tensor:
    """D from the decoder's final normed hidden states [B, T, H] for token ids [B, T], summed over the batch."""
    if objective == "max_logit":
        return output_logits(model, normed[:, -1, :]).max(dim=-1).values.sum()
    if objective == "nll":
        logits = output_logits(model, normed)
        loss = model.loss_function(logits=logits, labels=input_ids, vocab_size=model.config.vocab_size)
        return loss * input_ids.shape[0]
    raise ValueError(f"unknown objective {objective!r}")


def output_logits(model: PreTrainedModel, normed: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits [..., V] for final normed hidden states [..., H]: its output head, then the logit
    soft-capping of the families that have it (Gemma 2: cap * tanh(logits / cap))."""
    logits = model.lm_head(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def objective_value(model: PreTrainedModel, input_ids: torch.Tensor, objective: str) -> torch.Tensor:
    """D for a batch [B, T] of token ids, summed over the batch (a scalar that carries gradients), by the model's
    whole forward pass: the reference the layer-by-layer pass is checked against."""
    normed = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return objective_from_normed(model, normed, input_ids, objective)


def add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """Add xᵀ x to ``total`` [F, F] (float32, contiguous) for the inputs x [T, F] (float32), in place: on the CPU
    only its lower triangle (:func:`add_lower_gram`), elsewhere the whole matrix (:func:`add_whole_gram`);
    :func:`filled_gram` makes the sum whole once every input has been added."""
    (add_lower_gram if total.device.type == "cpu" else add_whole_gram)(total, x)


def add_lower_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """The lower triangle of xᵀ x (the diagonal included) added to CPU ``total`` by BLAS's symmetric rank-k update
    (SciPy's ``ssyrk``: half the multiply-adds of a product, no temporary; at [256, 8,960] 0.13 s against 0.30 for
    ``addmm_`` and 0.65 for a product and a sum on a 2-core AVX2 CPU)."""
    # ssyrk on the column-major view of ``total`` (its transpose) fills that view's upper triangle: our lower one
    scipy.linalg.blas.ssyrk(
        1.0, x.detach().contiguous().numpy().T, beta=1.0, c=total.numpy().T, trans=0, lower=0, overwrite_c=1
    )


def add_whole_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """xᵀ x added to ``total`` whole, in place (``addmm_``: what CUDA runs)."""
    total.addmm_(x.T, x)


def filled_gram(total: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``total``, a sum of :func:`add_gram`, made whole in place: its upper triangle set from its lower one, ``block``
    rows at a time (no [F, F] temporary). A matrix already whole (symmetric) is left as it is."""
    features = len(total)
    for start in range(0, features, block):
        end = min(start + block, features)
        total[start:end, end:] = total[end:, start:end].T
        diagonal = total[start:end, start:end]
        diagonal.copy_(torch.tril(diagonal) + torch.tril(diagonal, -1).T)
    return total


def row_col_reductions(score: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row sums / maxima [out] and column sums / maxima [in] of a per-weight score matrix [out, in], on CPU; of
    every expert's matrix for [experts, out, in] (then [experts, out] and [experts, in])."""
    return {
        "row_sum": score.sum(-1).cpu(),
        "row_max": score.amax(-1).cpu(),
        "col_sum": score.sum(-2).cpu(),
        "col_max": score.amax(-2).cpu(),
    }


def log10_histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts of log10(values) in HIST_BINS bins of HIST_WIDTH decades from HIST_MIN (float64, on CPU).

    Computed in place on one float32 copy of ``values`` (a layer's weights can be large)."""
    logs = values.float().clamp_min(1e-38).log10_().clamp_(HIST_MIN, HIST_MIN + HIST_BINS * HIST_WIDTH - HIST_WIDTH / 2)
    bins = logs.sub_(HIST_MIN).div_(HIST_WIDTH).floor_().long()
    return torch.bincount(bins.flatten(), minlength=HIST_BINS).double().cpu()


def decoder_linear_weights(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer index, linear name): weight [out, in]} for the 7 linears of every decoder layer."""
    return {
        (i, name): linear.weight
        for i, layer in enumerate(decoder_layers(model))
        for name, linear in layer_linears(layer).items()
    }


class _Captured(Exception):
    """Ends a forward pass once every decoder layer's arguments are captured."""


def layer_arguments(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The hidden state [1, T, H] that enters the first decoder layer for token ids [T], and the keyword arguments
    (attention mask, position embeddings, ...) the model passes each decoder layer for them, by layer (they
    differ between layers in families with sliding-window or local-attention layers).

    The decoder layers are replaced by stand-ins that record their arguments and pass the hidden state on, so
    only the embedding and what the model computes before its layers run."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    arguments: list[dict[str, Any]] = []

    def stand_in(index: int) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            state = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(state)
            arguments.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            if index == len(layers) - 1:
                raise _Captured
            return state

        return forward

    replaced = [layer.__dict__.get("forward") for layer in layers]  # accelerate's hooks live there
    for index, layer in enumerate(layers):
        layer.forward = stand_in(index)
    try:
        with torch.no_grad():
            model.model(input_ids=input_ids.unsqueeze(0).to(input_device(model)), use_cache=False)
    except _Captured:
        pass
    finally:
        for layer, forward in zip(layers, replaced, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return hidden[0], arguments


def call_layer(layer: nn.Module, hidden: torch.Tensor, arguments: dict[str, Any]) -> torch.Tensor:
    """One decoder layer's output [1, T, H] for ``hidden`` [1, T, H], on the layer's device."""
    device = module_device(layer)
    arguments = {k: _to(v, device) for k, v in arguments.items()}
    output = layer(hidden.to(device), **arguments)
    return output[0] if isinstance(output, tuple) else output


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


class Boundaries:
    """Every sample's hidden state [1, T, H] entering a decoder layer, one layer at a time, kept in memory or, with
    a ``scratch`` directory, in a file per layer there (so that only the layer being worked on is in memory)."""

    def __init__(self, scratch: Path | None):
        self.scratch = scratch
        self.kept: dict[int, list[torch.Tensor]] = {}

    def put(self, layer: int, states: list[torch.Tensor]) -> None:
        if self.scratch is None:
            self.kept[layer] = states
        else:
            torch.save([state.cpu() for state in states], self.scratch / f"boundary-{layer}.pt")

    def take(self, layer: int) -> list[torch.Tensor]:
        if self.scratch is None:
            return self.kept.pop(layer)
        path = self.scratch / f"boundary-{layer}.pt"
        states = torch.load(path, weights_only=True)
        path.unlink()
        return states


def forward_through_layers(
    model: PreTrainedModel,
    samples: list[torch.Tensor],
    layer_hooks: Callable[[int, nn.Module], list],
    layer_done: Callable[[int], None],
    keep: Boundaries | None,
    progress: bool,
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Every sample's hidden state through the decoder layers, layer by layer (every sample through layer i before
    layer i + 1), for token ids ``samples`` (each [T]); returns the last layer's outputs and every sample's layer
    keyword arguments (:func:`layer_arguments`). ``layer_hooks(i, layer)`` installs hooks for layer i (their
    handles are removed after it), ``layer_done(i)`` follows each layer, ``keep`` receives each layer's inputs.
    Two boundaries' hidden states are in memory at a time (a layer's inputs and outputs)."""
    layers = decoder_layers(model)
    hidden, arguments = [], []
    for ids in samples:
        state, kwargs = layer_arguments(model, ids)
        hidden.append(state)
        arguments.append(kwargs)
    bar = tqdm(total=len(layers) * len(hidden), desc="forward, layer by layer", unit="sample", disable=not progress)
    with bar, torch.no_grad():  # the bar is closed before an error or a signal is reported
        for i, layer in enumerate(layers):
            if keep is not None:
                keep.put(i, hidden)
            handles = layer_hooks(i, layer)
            try:
                outputs = []
                with resident(layer.modules()):
                    for state, kwargs in zip(hidden, arguments, strict=True):
                        outputs.append(call_layer(layer, state, kwargs[i]))
                        bar.update()
            finally:
                for handle in handles:
                    handle.remove()
            hidden = outputs
            layer_done(i)
    return hidden, arguments


def backward_through_layers(
    model: PreTrainedModel,
    samples: list[torch.Tensor],
    arguments: list[list[dict[str, Any]]],
    last: list[torch.Tensor],
    inputs: Boundaries,
    objective: str,
    consume: Callable[[int, tuple[int, str], torch.Tensor], None],
    layer_done: Callable[[int], None],
    progress: bool,
    desc: str,
) -> None:
    """dD(s)/dw for every sample s and decoder linear weight w, from the top layer down, one layer at a time:
    ``consume(s, (layer, linear), w * dD(s)/dw)`` (float32 [out, in], a fresh tensor ``consume`` may modify),
    then ``layer_done(layer)`` once every sample has passed through that layer.

    ``last``: the last layer's outputs (emptied here, each replaced by its gradient); ``inputs``: every layer's
    inputs (:func:`forward_through_layers`). Layer i's forward is recomputed from its inputs, and the gradient
    with respect to them carried down.
    """
    layers = decoder_layers(model)
    gradients = []
    for ids in samples:
        state = last.pop(0).detach().requires_grad_(True)
        with torch.enable_grad():
            norm = model.get_submodule("model.norm")
            normed = norm(state.to(module_device(norm)))
            value = objective_from_normed(model, normed, ids.unsqueeze(0).to(normed.device), objective)
            (gradient,) = torch.autograd.grad(value, state)
        gradients.append(gradient)
    bar = tqdm(total=len(layers) * len(samples), desc=desc, unit="sample", disable=not progress)
    with bar:  # closed before an error or a signal is reported
        for i in reversed(range(len(layers))):
            layer, states = layers[i], inputs.take(i)
            with resident(layer.modules()):
                weights = layer_linears(layer)
                for w in weights.values():
                    w.weight.requires_grad_(True)
                try:
                    for s, (state, kwargs) in enumerate(zip(states, arguments, strict=True)):
                        state = state.detach().to(module_device(layer)).requires_grad_(True)
                        with torch.enable_grad():
                            output = call_layer(layer, state, kwargs[i])
                            results = torch.autograd.grad(
                                output,
                                [state, *(w.weight for w in weights.values())],
                                grad_outputs=gradients[s].to(output.device),
                            )
                        gradients[s] = results[0]
                        weight_gradients = list(results[1:])
                        del results
                        for name, linear in weights.items():  # each gradient freed as soon as it is consumed
                            consume(s, (i, name), weight_gradients.pop(0).float().mul_(linear.weight.detach()))
                        bar.update()
                finally:
                    for w in weights.values():
                        w.weight.requires_grad_(False)
            del states  # before the next layer's inputs are read
            layer_done(i)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter without gradients inside the block; the ``requires_grad`` flags are restored after it."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def weight_gradient_products(
    model: PreTrainedModel,
    samples,
    objective: str,
    consume: Callable[[int, tuple[int, str], torch.Tensor], None],
    progress: bool,
    desc: str,
    layer_done: Callable[[int], None] = lambda layer: None,
    scratch: Path | None = None,
) -> None:
    """One backward pass of D per sample, layer by layer from the top: ``consume(s, (layer, linear), w * dD(s)/dw)``
    for every decoder linear, then ``layer_done(layer)``.

    ``samples``: token-id tensors [T] (a [N, T] tensor or a list of unequal lengths). The samples go through the
    decoder layer by layer (:func:`forward_through_layers`), keeping each layer's inputs (in ``scratch`` files
    when given), then back (:func:`backward_through_layers`): at any time one layer's gradients exist. The
    model's ``requires_grad`` flags are restored and its weights are not modified.
    """
    samples = list(samples)
    split_fused_projections(model)
    inputs = Boundaries(scratch)
    with frozen(model):
        last, arguments = forward_through_layers(model, samples, lambda i, layer: [], lambda i: None, inputs, progress)
        backward_through_layers(model, samples, arguments, last, inputs, objective, consume, layer_done, progress, desc)


def layer_reductions(
    accumulators: dict[str, torch.Tensor], samples: int, layer: int, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Row/column reductions of mean A = sum / samples for one layer's linears, and (without ``prefix``) the layer's
    log10 histogram. ``accumulators``: {linear: summed |w * grad| [out, in]}, consumed to free memory early.
    ``prefix`` goes before the reduction names (``taylor_`` for the signed Taylor sums)."""
    tensors: dict[str, torch.Tensor] = {}
    histogram = torch.zeros(HIST_BINS, dtype=torch.float64)
    for name in LINEAR_NAMES:
        mean = accumulators.pop(name).div_(samples).abs_()
        tensors |= {f"layers.{layer}.{name}.{prefix}{k}": v for k, v in row_col_reductions(mean).items()}
        if not prefix:
            histogram += log10_histogram(mean)
    if not prefix:
        tensors[f"layers.{layer}.log10_hist"] = histogram
    return tensors


def collect_statistics(
    model: PreTrainedModel,
    samples: torch.Tensor,
    objective: str,
    needs: frozenset[Statistic],
    progress: bool = True,
    store: Path | None = None,
    scratch: Path | None = None,
    processes: Processes = ALONE,
) -> ActivationStatistics:
    """The statistics ``needs`` asks for over ``samples`` [N, T], layer by layer: a forward pass through the decoder
    that collects the input statistics of each layer as all samples pass it, then (for gradient products and
    summed gradients) one backward pass per sample from the top layer down, reducing each layer's per-weight
    mean as soon as every sample has passed it. Memory beyond the weights: one layer's per-weight sums, one
    layer's second moments, and the samples' hidden states at one layer boundary (with ``scratch``; else at
    every boundary).

    ``store``: the statistics directory the second moments are written to, one file per layer (None: they
    stay in memory). Second moments come with the input sums they are centred by. The model's
    ``requires_grad`` flags are restored afterwards; its weights are not modified.

    ``processes``: each of them passes its share of the samples and the sums are added across them before
    anything is reduced; every process returns the statistics of all samples, and only the main one writes to
    ``store`` (the others may read it once it has: after :meth:`Processes.wait`).
    """
    split_fused_projections(model)  # Phi-3's qkv_proj and gate_up_proj as their linears: the same outputs
    if Statistic.SECOND_MOMENTS in needs:
        needs = needs | {Statistic.INPUT_SUMS}
    sums, covariances = Statistic.INPUT_SUMS in needs, Statistic.SECOND_MOMENTS in needs
    cosines = Statistic.LAYER_COSINES in needs
    products, summed = Statistic.GRADIENT_PRODUCTS in needs, Statistic.SUMMED_GRADIENTS in needs
    every_sample = list(samples)
    samples_list = processes.share(every_sample)
    if not samples_list:
        raise ValueError(f"{len(every_sample)} calibration samples cannot be shared by {processes.count} processes")
    tensors: dict[str, torch.Tensor] = {}
    accumulated: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        if key in accumulated:
            accumulated[key].add_(value)  # in place: a fresh sum per sample would churn the allocator
        else:
            accumulated[key] = value

    def input_hook(prefix: str, with_covariance: bool):
        def hook(module, args):
            x = args[0].detach().flatten(0, -2)
            x64 = x.double()
            add(f"{prefix}.x_sum", x64.sum(0))
            add(f"{prefix}.x_sumsq", (x64 * x64).sum(0))
            if with_covariance:
                key = f"{prefix}.xxt"
                if key not in accumulated:
                    accumulated[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                add_gram(accumulated[key], x.float())

        return hook

    def cosine_hook(key: str):
        def hook(module, args, output):
            output = output[0] if isinstance(output, tuple) else output
            h_in, h_out = args[0].detach().flatten(0, -2).double(), output.detach().flatten(0, -2).double()
            add(key, torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum().reshape(1))

        return hook

    def layer_hooks(i: int, layer: nn.Module) -> list:
        handles = []
        if cosines:
            handles.append(layer.register_forward_hook(cosine_hook(f"layers.{i}.cos_sum")))
        if sums:
            linears = layer_linears(layer)
            for site, linear_name in INPUT_SITES.items():
                linear = linears[linear_name]
                if isinstance(linear, ExpertLinears):  # experts see only the tokens routed to them: not collected
                    continue
                hook = input_hook(f"layers.{i}.{site}", covariances and site in COVARIANCE_SITES)
                handles.append(linear.register_forward_pre_hook(hook))
        return handles

    def inputs_done(i: int) -> None:
        layer_tensors = {k: processes.sum(accumulated[k]).float().cpu() for k in sorted(accumulated)}
        accumulated.clear()
        for key in layer_tensors:
            if key.endswith(".xxt"):
                filled_gram(layer_tensors[key])
        if store is not None and covariances:
            moments = {k: layer_tensors.pop(k) for k in list(layer_tensors) if k.endswith(".xxt")}
            if processes.main:
                with atomic_path(store / SECOND_MOMENTS_FILE.format(layer=i)) as temporary:
                    save_file(moments, str(temporary))
        tensors.update(layer_tensors)

    per_weight: dict[str, dict[str, torch.Tensor]] = {"products": {}, "signed": {}}

    def accumulate(sample: int, key: tuple[int, str], product: torch.Tensor) -> None:
        name = key[1]
        if summed:
            signed = per_weight["signed"]
            signed[name] = signed[name].add_(product) if name in signed else product.clone()
        if products:
            sums_ = per_weight["products"]
            absolute = product.abs_()
            sums_[name] = sums_[name].add_(absolute) if name in sums_ else absolute

    def gradients_done(i: int) -> None:
        for sums_ in per_weight.values():
            for name in sorted(sums_):
                processes.sum(sums_[name])
        if products:
            tensors.update(layer_reductions(per_weight["products"], len(every_sample), i))
        if summed:
            tensors.update(layer_reductions(per_weight["signed"], len(every_sample), i, prefix="taylor_"))

    inputs = Boundaries(scratch) if products or summed else None
    with frozen(model):
        last, arguments = forward_through_layers(model, samples_list, layer_hooks, inputs_done, inputs, progress)
        if inputs is not None:
            backward_through_layers(
                model,
                samples_list,
                arguments,
                last,
                inputs,
                objective,
                accumulate,
                gradients_done,
                progress,
                f"activation statistics (D={objective})",
            )
    provided = needs & (BACKWARD | FORWARD)
    return ActivationStatistics(
        tensors,
        samples=len(every_sample),
        tokens=sum(len(ids) for ids in every_sample),
        objective=objective,
        provides=frozenset(provided),
        directory=store if covariances else None,
    )
