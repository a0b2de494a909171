"""Training-loop helpers: reach the :class:`AdaLoraModel` inside wrappers (DDP, torch.compile,
accelerate) and drive its allocator from a wrapped model."""

from __future__ import annotations

import torch
from torch import nn

from ..model import AdaLoraModel

# Attributes under which common wrappers keep the wrapped module: DistributedDataParallel /
# DataParallel / accelerate / DeepSpeed (``module``), torch.compile's OptimizedModule (``_orig_mod``).
_WRAPPED_ATTRS = ("module", "_orig_mod")


def wrapped_module(module: object) -> nn.Module | None:
    """The module a wrapper (DDP, ``torch.compile``, accelerate, ...) holds, or None for a module that
    wraps nothing."""
    if not isinstance(module, nn.Module):
        return None
    for attr in _WRAPPED_ATTRS:
        candidate = getattr(module, attr, None)
        if isinstance(candidate, nn.Module) and candidate is not module:
            return candidate
    return None


def find_adalora_model(model: object) -> AdaLoraModel | None:
    """The :class:`AdaLoraModel` inside ``model`` (itself, or through DDP, ``torch.compile``,
    ``DataParallel`` or accelerate wrappers, nested in any order), or None."""
    current: object | None = model
    while current is not None and not isinstance(current, AdaLoraModel):
        current = wrapped_module(current)
    return current


def wrapper_chain(model: object) -> list[str]:
    """The class names of ``model`` and of the modules its wrappers hold, outermost first."""
    chain, current = [type(model).__name__], wrapped_module(model)
    while current is not None:
        chain.append(type(current).__name__)
        current = wrapped_module(current)
    return chain


def unwrap_model(model: nn.Module) -> AdaLoraModel:
    """The :class:`AdaLoraModel` inside ``model`` (see :func:`find_adalora_model`). ``TypeError`` naming
    the wrapper chain if there is none."""
    found = find_adalora_model(model)
    if found is None:
        raise TypeError(
            f"no adalora_fast.AdaLoraModel in {' -> '.join(wrapper_chain(model))}: wrap the model with "
            "adalora_fast.get_adalora_model(model, config) before DDP / torch.compile / accelerate"
        )
    return found


def update_and_allocate(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> int:
    """``unwrap_model(model).update_and_allocate(step, optimizer)``: the allocator call for a model
    wrapped by DDP, ``torch.compile`` or accelerate. Under DDP every rank calls it with its all-reduced
    gradients and reaches the same scores and masks, with no communication of its own."""
    return unwrap_model(model).update_and_allocate(step, optimizer=optimizer)
