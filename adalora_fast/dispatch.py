"""One dispatch point per adapter operation.

Each operation has a "torch" implementation here (vectorised PyTorch, runs everywhere) and may have
a "triton" one registered by :mod:`adalora_fast.kernels`. Backend "auto" picks triton for CUDA
tensors when a kernel is registered, torch otherwise; "triton" asks for the kernel explicitly (on the
CPU it runs in Triton's interpreter) and falls back to torch with a one-time warning while the kernel
for that operation has not landed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .reference import svd_adapter

if TYPE_CHECKING:
    from .layer import SVDLinear

OPS = ("svd_linear", "orth_reg", "allocator")
_IMPLS: dict[str, dict[str, Callable[..., Any]]] = {op: {} for op in OPS}
_WARNED: set[tuple[str, str]] = set()


def register(op: str, backend: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")
    _IMPLS[op][backend] = fn


def resolve(op: str, requested: str, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device`` under the requested backend."""
    if requested == "torch":
        return "torch"
    has_triton = "triton" in _IMPLS[op]
    if requested == "auto":
        return "triton" if has_triton and device.type == "cuda" else "torch"
    if requested == "triton":
        if has_triton:
            return "triton"
        if (op, requested) not in _WARNED:
            _WARNED.add((op, requested))
            warnings.warn(
                f"backend='triton': no Triton kernel for {op!r} yet; using the torch implementation",
                stacklevel=3,
            )
        return "torch"
    raise ValueError(f"unknown backend {requested!r}")


def implementation(op: str, requested: str, device: torch.device) -> Callable[..., Any]:
    return _IMPLS[op][resolve(op, requested, device)]


# ---- svd_linear ---------------------------------------------------------------------------------
def svd_linear_torch(layer: SVDLinear, x: torch.Tensor) -> torch.Tensor:
    """Base forward plus the adapter branch, PEFT's op order (the adapter runs in the adapter dtype)."""
    result = layer.base_layer(x)
    # Rank-0 layers still run (and draw the dropout mask), as PEFT does, to keep RNG streams aligned.
    xa = layer.lora_dropout(x.to(layer.lora_A.dtype))
    result += svd_adapter(xa, layer.lora_A, layer.lora_E, layer.lora_B, layer.scaling, layer.ranknum)
    return result


def svd_linear(layer: SVDLinear, x: torch.Tensor) -> torch.Tensor:
    """Dispatch point of the adapted linear layer's forward."""
    return implementation("svd_linear", layer.backend, x.device)(layer, x)


register("svd_linear", "torch", svd_linear_torch)
