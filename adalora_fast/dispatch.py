"""One dispatch point per adapter operation.

Each operation has a "torch" implementation (vectorised PyTorch, runs everywhere) and may have a
"triton" one backed by :mod:`adalora_fast.kernels`. Kernel modules are imported lazily, the first
time a Triton backend is asked for, so CPU users never import Triton and ``TRITON_INTERPRET`` may be
set any time before that. Backend "auto" picks triton for CUDA tensors when the kernel exists,
torch otherwise; "triton" asks for the kernel explicitly (on the CPU it runs in Triton's interpreter
when ``TRITON_INTERPRET=1``) and falls back to torch with a one-time warning saying why when it
cannot run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .reference import svd_adapter

if TYPE_CHECKING:
    from .layer import SVDLinear

OPS = ("svd_linear", "orth_reg", "allocator")
_IMPLS: dict[str, dict[str, Callable[..., Any]]] = {op: {} for op in OPS}
_WARNED: set[str] = set()
_LOAD_ERRORS: dict[str, str] = {}


def warn_once(message: str, stacklevel: int = 3) -> None:
    # Inside torch.compile tracing a warnings.warn call is a graph break (an error under
    # fullgraph=True); the eager warm-up or first eager call already warned.
    if torch.compiler.is_compiling():
        return
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=stacklevel)


def register(op: str, backend: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")
    _IMPLS[op][backend] = fn


def _has_triton(op: str) -> bool:
    """Whether ``op`` has a Triton implementation, importing its kernels on first use."""
    if "triton" in _IMPLS[op]:
        return True
    loader = _LOADERS.get(op)
    if loader is None or op in _LOAD_ERRORS:
        return False
    try:
        loader()
    except ImportError as err:  # no triton on this platform
        _LOAD_ERRORS[op] = f"{type(err).__name__}: {err}"
        return False
    return "triton" in _IMPLS[op]


def _interpreting() -> bool:
    from .kernels._common import INTERPRET

    return INTERPRET


def resolve(op: str, requested: str, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device`` under the requested backend."""
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device.type == "cuda" and _has_triton(op) else "torch"
    if requested != "triton":
        raise ValueError(f"unknown backend {requested!r}")
    if not _has_triton(op):
        why = _LOAD_ERRORS.get(op, "no Triton kernel for it yet")
        warn_once(f"backend='triton' for {op!r}: {why}; using the torch implementation")
        return "torch"
    if device.type != "cuda" and not _interpreting():
        warn_once(
            f"backend='triton' for {op!r} on {device.type}: Triton kernels need a CUDA device, or "
            "TRITON_INTERPRET=1 set before the kernels are imported; using the torch implementation"
        )
        return "torch"
    return "triton"


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


def _fused_unsupported(layer: SVDLinear, x: torch.Tensor) -> str | None:
    """Why the fused kernels cannot run this call (the torch path runs instead), or None."""
    from .kernels.svd_linear import MAX_RANK, SUPPORTED_DTYPES

    weight = layer.base_layer.weight
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is enabled (the fused op computes in the weight's dtype)"
    if weight.requires_grad:
        return "the base weight requires grad (the fused op computes no weight gradient)"
    if x.dtype != weight.dtype:
        return f"input dtype {x.dtype} differs from the base weight's {weight.dtype} (e.g. under autocast)"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"base dtype {weight.dtype} (supported: fp32, fp16, bf16)"
    if layer.lora_A.dtype not in SUPPORTED_DTYPES:
        return f"adapter dtype {layer.lora_A.dtype} (supported: fp32, fp16, bf16)"
    if layer.r > MAX_RANK:
        return f"rank {layer.r} > {MAX_RANK}"
    if layer.lora_A.device != weight.device:
        return f"adapter on {layer.lora_A.device} but base weight on {weight.device}"
    return None


def svd_linear_triton(layer: SVDLinear, x: torch.Tensor) -> torch.Tensor:
    """The fused kernels (:mod:`adalora_fast.kernels.svd_linear`); dropout only in training mode."""
    from .kernels.svd_linear import svd_linear as fused

    reason = _fused_unsupported(layer, x)
    if reason is not None:
        warn_once(f"fused svd_linear cannot run: {reason}; using the torch path for such calls")
        return svd_linear_torch(layer, x)
    drop = layer.lora_dropout
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    base = layer.base_layer
    return fused(
        x, base.weight, base.bias, layer.lora_A, layer.lora_E, layer.lora_B, layer.ranknum, layer.scaling,
        dropout_p=p, fan_in_fan_out=layer.fan_in_fan_out,
    )  # fmt: skip


def svd_linear(layer: SVDLinear, x: torch.Tensor) -> torch.Tensor:
    """Dispatch point of the adapted linear layer's forward."""
    return implementation("svd_linear", layer.backend, x.device)(layer, x)


def _load_svd_linear() -> None:
    import adalora_fast.kernels.svd_linear  # noqa: F401  (registers the custom ops)

    register("svd_linear", "triton", svd_linear_triton)


def _load_orth_reg() -> None:
    import adalora_fast.kernels.orth_defect  # noqa: F401  (registers the custom ops)

    from .regularizer import orth_regularization_triton

    register("orth_reg", "triton", orth_regularization_triton)


register("svd_linear", "torch", svd_linear_torch)


def _load_allocator() -> None:
    from .allocator_triton import make_triton_scorer

    register("allocator", "triton", make_triton_scorer)


_LOADERS: dict[str, Callable[[], None]] = {
    "svd_linear": _load_svd_linear,
    "orth_reg": _load_orth_reg,
    "allocator": _load_allocator,
}
