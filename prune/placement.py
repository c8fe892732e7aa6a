"""Where a model's weights live: one device, or spread over devices by accelerate's big-model dispatch
(``model.device_map`` in a recipe, with ``model.max_memory``).

With a device map, modules can be *offloaded*: their weights stay in CPU memory (or on disk) as meta
parameters, and accelerate's hooks load them onto an execution device for each forward call and drop them
after. Forward calls need nothing from this module. The stages that read or differentiate a decoder layer's
weights do so one layer at a time inside :func:`resident`, which loads that layer's offloaded weights once
and keeps the same parameter objects until the block ends; so at most one offloaded layer is on its
execution device at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import has_offloaded_params
from torch import nn

from prune.blocks import decoder_layers


def module_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else its first parameter's."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type == "meta":
        return next((module_device(child) for child in module.children()), torch.device("cpu"))
    return parameter.device


def input_device(model: nn.Module) -> torch.device:
    """The device a causal LM's token ids go to: its input embedding's."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    return module_device(embeddings)


def is_offloaded(modules: Iterable[nn.Module]) -> bool:
    """Whether one of ``modules`` keeps its weights off its execution device (accelerate offload)."""
    return any(has_offloaded_params(m) for m in modules)


def outside_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that are not in a decoder layer (embeddings, final norm, head, ...)."""
    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()} | {id(decoder_layers(model))}
    return [m for m in model.modules() if id(m) not in inside]


@contextmanager
def resident(modules: Iterable[nn.Module], device: torch.device | None = None) -> Iterator[None]:
    """The offloaded weights of ``modules`` (e.g. ``layer.modules()``: a layer and its submodules) on their execution
    devices (or on ``device``) inside the block, as ordinary parameters that forward calls keep (the hooks'
    offloading is suspended); offloaded again after. Modules without offloaded weights are left as they are."""
    offloaded = [m for m in dict.fromkeys(modules) if has_offloaded_params(m)]
    loaded = []
    try:
        for m in offloaded:
            hook: Any = m._hf_hook
            loaded.append((m, hook.execution_device))
            if device is not None:
                hook.execution_device = device
            hook.pre_forward(m)
            hook.offload = False
        yield
    finally:
        for m, execution_device in loaded:
            hook = m._hf_hook
            hook.offload = True
            hook.post_forward(m, None)
            hook.execution_device = execution_device
