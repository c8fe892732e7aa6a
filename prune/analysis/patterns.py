"""Activation patterns of single inputs (docs/METHOD.md §1), on top of the statistics pass's backward loop.

For an input s, the pattern of decoder layer l is the vector A_l(s) of A(s, w) = |w * dD(s)/dw| over
every weight of the layer's 7 linears (one backward pass per input, the same code as the pruning
statistics: :func:`prune.statistics.weight_gradient_products`). Three uses:

- :func:`domain_patterns`: the mean A over a set of inputs, reduced to per-layer activated-weight
  counts, plus a count sketch of every input's pattern for many-to-many comparisons;
- :func:`similarities` / :func:`similarity`: exact LLMDcos_l(s1, s2) = <A_l(s1), A_l(s2)> / (|A_l(s1)| |A_l(s2)|)
  for pairs of texts (one layer of the first input's pattern is held while the second's streams past it);
- :func:`sketch_cosines`: LLMDcos estimated from two sketches.

A count sketch maps each weight to one of ``size`` buckets with a random sign, fixed per (linear name,
weight count) and seed; the inner product of two sketches is an unbiased estimate of the inner
product of the patterns, with a standard error of about sqrt(2 / size) on a cosine (0.016 at 8192).
A sketch costs ``num_layers x size x 4`` bytes per input instead of 4 bytes per weight.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prune.allocation import activated_count, activation_threshold
from prune.blocks import block_shape, decoder_layers
from prune.statistics import ActivationStatistics, Statistic, layer_reductions, weight_gradient_products


@dataclass
class CountSketch:
    """Signed random hashing of a weight matrix's entries into ``size`` buckets (same map for every layer).

    Values are added into a buffer of ``2 * size`` (positive-sign buckets, then negative-sign ones) so
    that adding is one ``index_add_`` without a multiplication; :meth:`fold` gives the sketch.
    """

    size: int
    seed: int
    _maps: dict = field(default_factory=dict, repr=False)

    def slots(self, name: str, numel: int) -> torch.Tensor:
        """[numel] int32 buffer slot of each weight of linear ``name``: bucket, plus ``size`` for a negative sign."""
        key = (name, numel)
        if key not in self._maps:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()) + numel)
            buckets = torch.randint(0, self.size, (numel,), generator=generator)
            negative = torch.randint(0, 2, (numel,), generator=generator)
            self._maps[key] = (buckets + self.size * negative).int()
        return self._maps[key]

    def add(self, buffer: torch.Tensor, name: str, values: torch.Tensor) -> None:
        """buffer [2 * size] += the weights of linear ``name`` (``values``, any shape) in their slots."""
        buffer.index_add_(0, self.slots(name, values.numel()).to(values.device), values.flatten())

    def fold(self, buffer: torch.Tensor) -> torch.Tensor:
        """Sketch [..., size] from buffers [..., 2 * size]: positive minus negative buckets."""
        return buffer[..., : self.size] - buffer[..., self.size :]


@dataclass
class DomainPatterns:
    """What :func:`domain_patterns` measured over one set of inputs."""

    activated: list[float]
    """Per layer: weights whose mean A exceeds the absolute threshold ``gamma``."""
    activated_relative: list[float]
    """Per layer: weights whose mean A exceeds ``gamma_relative`` x the mean A over all decoder linear weights."""
    relative_threshold: float
    """That threshold as an absolute A value."""
    weights_per_layer: list[int]
    sketches: torch.Tensor
    """[inputs, layers, sketch size] float32: count sketch of each input's pattern per layer."""


def domain_patterns(
    model: PreTrainedModel,
    samples: list[torch.Tensor],
    objective: str,
    gamma: float,
    gamma_relative: float,
    sketch: CountSketch,
    progress: bool = True,
    desc: str = "activation patterns",
) -> DomainPatterns:
    """One backward pass per input (token ids [T]): per-layer activated counts of the mean A, and per-input sketches.

    Counts are read from the same per-layer log10 histogram the allocation stage uses (linear within
    the 0.01-decade bin that holds the threshold).
    """
    num_layers = len(decoder_layers(model))
    device = next(model.parameters()).device
    accumulators: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    buffers = torch.zeros(len(samples), num_layers, 2 * sketch.size, device=device)

    def consume(sample: int, key, product: torch.Tensor) -> None:
        activation = product.abs_()
        name = key[1]
        accumulators[name] = accumulators[name].add_(activation) if name in accumulators else activation.clone()
        sketch.add(buffers[sample, key[0]], name, activation)

    def layer_done(layer: int) -> None:
        tensors.update(layer_reductions(accumulators, len(samples), layer))

    weight_gradient_products(model, samples, objective, consume, progress, desc, layer_done)
    statistics = ActivationStatistics(
        tensors,
        samples=len(samples),
        tokens=sum(len(s) for s in samples),
        objective=objective,
        provides=frozenset({Statistic.GRADIENT_PRODUCTS}),
    )
    shape = block_shape(model.config)
    threshold = activation_threshold(statistics, shape, gamma_relative, "relative")
    histograms = [statistics.get(i, "log10_hist") for i in range(num_layers)]
    return DomainPatterns(
        activated=[activated_count(h, gamma) for h in histograms],
        activated_relative=[activated_count(h, threshold) for h in histograms],
        relative_threshold=threshold,
        weights_per_layer=[shape.linear_weight_count(w) for w in shape.layers],
        sketches=sketch.fold(buffers).cpu(),
    )


def sketch_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Estimated LLMDcos per layer from sketches a, b [..., layers, size] -> [..., layers]."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def pattern_similarities(
    model: PreTrainedModel,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    objective: str = "max_logit",
    progress: bool = True,
) -> torch.Tensor:
    """Exact LLMDcos per layer for pairs of inputs (token ids [T] each): [pairs, layers] float64.

    Two backward passes per pair; the first input's pattern is kept (4 bytes per decoder linear
    weight), the second's is compared with it as its gradients arrive.
    """
    num_layers = len(decoder_layers(model))
    result = torch.zeros(len(pairs), num_layers, dtype=torch.float64)
    for p, (ids_a, ids_b) in enumerate(tqdm(pairs, desc="pattern similarity", unit="pair", disable=not progress)):
        result[p] = _pair_similarity(model, ids_a, ids_b, objective, num_layers)
    return result


def _pair_similarity(
    model: PreTrainedModel, ids_a: torch.Tensor, ids_b: torch.Tensor, objective: str, num_layers: int
) -> torch.Tensor:
    """LLMDcos per layer [num_layers] of two inputs' patterns (float64)."""
    first: dict = {}
    dot = torch.zeros(num_layers, dtype=torch.float64)
    norm_a = torch.zeros(num_layers, dtype=torch.float64)
    norm_b = torch.zeros(num_layers, dtype=torch.float64)

    def consume(sample: int, key, product: torch.Tensor) -> None:
        activation = product.abs_().flatten()
        layer = key[0]
        if sample == 0:
            first[key] = activation
            norm_a[layer] += float(torch.dot(activation, activation))
        else:
            dot[layer] += float(torch.dot(first.pop(key), activation))
            norm_b[layer] += float(torch.dot(activation, activation))

    weight_gradient_products(model, [ids_a, ids_b], objective, consume, progress=False, desc="")
    return dot / (norm_a.sqrt() * norm_b.sqrt()).clamp_min(1e-300)


def similarities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    objective: str = "max_logit",
    progress: bool = True,
) -> torch.Tensor:
    """LLMDcos per decoder layer for each pair of texts: [pairs, layers] float64 (see :func:`pattern_similarities`)."""

    def ids(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)

    return pattern_similarities(model, [(ids(a), ids(b)) for a, b in pairs], objective, progress)


def similarity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text_a: str,
    text_b: str,
    layers: list[int] | None = None,
    objective: str = "max_logit",
) -> float:
    """Mean LLMDcos over ``layers`` (decoder layer indices; None = all) of two texts' activation patterns.

    1.0 for identical patterns. The paper sums over its deep layers; the mean ranks pairs the same way.
    """
    per_layer = similarities(model, tokenizer, [(text_a, text_b)], objective, progress=False)[0]
    return float(per_layer[layers].mean() if layers is not None else per_layer.mean())
