"""Training-loop helpers: reach the :class:`AdaLoraModel` inside wrappers (DDP, torch.compile,
accelerate) and drive its allocator from a wrapped model."""

from __future__ import annotations

import torch
from torch import nn

from ..model import AdaLoraModel

# Attributes under which common wrappers keep the wrapped module: DistributedDataParallel /
# DataParallel / accelerate / DeepSpeed (``module``), torch.compile's OptimizedModule (``_orig_mod``).
_WRAPPED_ATTRS = ("module", "_orig_mod")


def unwrap_model(model: nn.Module) -> AdaLoraModel:
    """The :class:`AdaLoraModel` inside ``model`` (itself, or through DDP, ``torch.compile``,
    ``DataParallel`` or accelerate wrappers, nested in any order). ``TypeError`` naming the wrapper
    chain if there is none."""
    seen = []
    current = model
    while True:
        if isinstance(current, AdaLoraModel):
            return current
        seen.append(type(current).__name__)
        inner = None
        for attr in _WRAPPED_ATTRS:
            candidate = getattr(current, attr, None) if isinstance(current, nn.Module) else None
            if isinstance(candidate, nn.Module) and candidate is not current:
                inner = candidate
                break
        if inner is None:
            raise TypeError(
                f"no adalora_fast.AdaLoraModel in {' -> '.join(seen)}: wrap the model with "
                "adalora_fast.get_adalora_model(model, config) before DDP / torch.compile / accelerate"
            )
        current = inner


def update_and_allocate(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> int:
    """``unwrap_model(model).update_and_allocate(step, optimizer)``: the allocator call for a model
    wrapped by DDP, ``torch.compile`` or accelerate. Under DDP every rank calls it with its all-reduced
    gradients and reaches the same scores and masks, with no communication of its own."""
    return unwrap_model(model).update_and_allocate(step, optimizer=optimizer)
