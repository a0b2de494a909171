"""Compaction: drop the masked ranks of every adapted layer physically, in place.

Soft masking (PEFT's) keeps A, E, B at init_r ranks and zeroes the masked singular values. Once the
rank pattern is fixed, :func:`compact_layers_` shrinks each layer to its kept ranks (rank 0 allowed):
the same ``nn.Parameter`` objects with sliced ``.data`` and ``.grad``, and the optimizer's
per-parameter state sliced to match, so training goes on at the target rank.

Optimizer state: every state tensor with the parameter's shape (AdamW's ``exp_avg`` and
``exp_avg_sq``, SGD's ``momentum_buffer``, Adagrad's ``sum``, RMSprop's ``square_avg``, ...) is sliced
along the rank dimension; scalars (``step``; tensors with one element) are left alone. Any other
state (e.g. factored second moments) cannot be sliced generically: it raises ``ValueError`` naming
the parameter before anything is changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..factors import RANK_DIMS, AdapterLayer


def _state_keys_to_slice(optimizer: torch.optim.Optimizer, p: torch.Tensor, label: str) -> list[str]:
    """The keys of ``optimizer.state[p]`` that hold per-element state of ``p``."""
    state = optimizer.state.get(p)
    if not state:
        return []
    keys = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or (value.numel() == 1 and value.shape != p.shape):
            continue  # scalars such as `step`
        if value.shape != p.shape:
            raise ValueError(
                f"cannot compact {label}: its optimizer state {key!r} has shape {tuple(value.shape)}, "
                f"neither the parameter's {tuple(p.shape)} nor a scalar, so it cannot be sliced to the "
                f"kept ranks ({type(optimizer).__name__})"
            )
        keys.append(key)
    return keys


def compact_layers_(
    layers: Sequence[tuple[str, AdapterLayer]],
    keep: Mapping[str, Sequence[bool]],
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Shrink every layer to the ranks ``keep[name]`` marks True (a host list per layer, one entry per
    rank the layer holds now), in place (:meth:`SVDLinear.select_ranks_`, which also records the held
    pattern); slice ``optimizer``'s state to match. Returns the number of ranks removed. Everything is
    checked before anything changes."""
    plan = []
    for name, layer in layers:
        kept = [bool(k) for k in keep[name]]
        if len(kept) != layer.r:
            raise ValueError(f"keep pattern of {name!r}: {len(kept)} entries, layer rank {layer.r}")
        if not all(kept):
            plan.append((name, layer, kept))
    state_keys: dict[int, list[str]] = {}
    if optimizer is not None:
        for name, layer, _ in plan:
            for kind, _ in RANK_DIMS:
                p = getattr(layer, kind)
                state_keys[id(p)] = _state_keys_to_slice(optimizer, p, f"{name}.{kind}")
    removed = 0
    for _name, layer, kept in plan:
        positions = [i for i, k in enumerate(kept) if k]
        index = torch.tensor(positions, dtype=torch.long, device=layer.lora_A.device)
        with torch.no_grad():
            for kind, dim in RANK_DIMS:
                p = getattr(layer, kind)
                if optimizer is None:
                    continue
                state = optimizer.state.get(p, {})
                for key in state_keys[id(p)]:
                    state[key] = state[key].index_select(dim, index.to(state[key].device))
        layer.select_ranks_(kept)
        removed += len(kept) - len(positions)
    return removed
