"""``y = base(x) + s * ((drop(x) Q^T) * lambda^T) P^T`` for a base whose product another library computes
(bitsandbytes' 4-bit / 8-bit GEMMs): the low-rank term through our kernels, added into the base output.

Forward: ``x_at`` (S = drop(x) Q^T, M x r fp32, kept for the backward), then ``y_plus_sb`` adds
``S diag(lambda s) P^T`` into the base output in place (one read and one write of y). Backward: the
base's own autograd gives its part of dx; here ``x_at`` (G = dy P), ``y_plus_sb`` onto zeros (the
low-rank part of dx, through the regenerated dropout mask), ``xt_s`` twice (dQ, dP) and one
reduction for d(lambda), as in ``svd_linear``'s backward. Opt-in (``backend="triton"``) until a GPU
run shows it faster than the PyTorch path on such bases; on floating-point bases with
``ADALORA_FAST_CUBLAS_GEMM=1`` (cuBLAS GEMMs plus one read-modify-write of y and of dx).
"""

from __future__ import annotations

import os

import torch

from ._common import adapter_reason, check_seed, device_guard
from .constants import RANKNUM_EPS, SUPPORTED_DTYPES
from .x_at import x_at
from .xt_s import xt_s
from .y_plus_sb import y_plus_sb

SEED_HIGH = 2**62
# ADALORA_FAST_CUBLAS_GEMM=1: floating-point bases take this path too (the base product by cuBLAS,
# the low-rank term added into it), opt-in until a GPU run shows it faster than svd_linear's GEMM.
FLOAT_BASES = os.environ.get("ADALORA_FAST_CUBLAS_GEMM", "0") not in ("", "0")


class _LowRankInto(torch.autograd.Function):
    """The low-rank term added into ``y`` (the base output, modified in place)."""

    @staticmethod
    def forward(ctx, y, x, lora_A, lora_E, lora_B, ranknum, seed, dropout_p, scaling):  # type: ignore

        with device_guard(x):
            s = x_at(x, lora_A, seed=seed, dropout_p=dropout_p)
            y_plus_sb(y, s, lora_B.t(), lora_E, ranknum, scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, lora_A, lora_E, lora_B, ranknum, s, seed)
        ctx.dropout_p, ctx.scaling = dropout_p, scaling
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, lora_A, lora_E, lora_B, ranknum, s, seed = ctx.saved_tensors
        p, scaling = ctx.dropout_p, ctx.scaling
        need_x, need_A, need_E, need_B = (ctx.needs_input_grad[i] for i in (1, 2, 3, 4))
        dx = dA = dE = dB = None
        with device_guard(x), torch.autocast(x.device.type, enabled=False):
            dy = dy.to(x.dtype)
            g = x_at(dy, lora_B.t()) if (need_x or need_A or need_E) else None  # G = dy P
            if need_x:
                dx = torch.zeros_like(x)
                y_plus_sb(dx, g, lora_A, lora_E, ranknum, scaling, seed=seed, dropout_p=p)
            if need_A:
                dA = xt_s(x, g, lora_E, ranknum, scaling, seed=seed, dropout_p=p, dtype=lora_A.dtype)
            if need_B:
                dB = xt_s(dy, s, lora_E, ranknum, scaling, dtype=lora_B.dtype, transposed=True)
            if need_E:
                scale = scaling / (ranknum.float() + RANKNUM_EPS)
                dE = ((g * s).sum(0) * scale).unsqueeze(1).to(lora_E.dtype)
        return dy, dx, dA, dE, dB, None, None, None, None


def unsupported_reason(x: torch.Tensor, lora_A: torch.Tensor) -> str | None:
    """Why this call cannot run here, or None (the PyTorch path runs it then)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} (supported: fp32, fp16, bf16)"
    return adapter_reason(lora_A, x.device, "input")


def base_plus_svd(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_out + s * drop(x) Q^T diag(lambda) P^T`` for x of any leading shape (``base_out``: the base
    layer's output for x, same leading shape). ``seed`` defaults to a fresh draw."""
    d_in, d_out, r = x.shape[-1], base_out.shape[-1], lora_A.shape[0]
    if lora_A.shape != (r, d_in) or lora_E.shape != (r, 1) or lora_B.shape != (d_out, r):
        raise ValueError(
            f"base_plus_svd: lora_A {tuple(lora_A.shape)}, lora_E {tuple(lora_E.shape)}, lora_B "
            f"{tuple(lora_B.shape)} do not fit a {d_in}->{d_out} layer"
        )
    if base_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"base_plus_svd: base output {tuple(base_out.shape)} does not fit x {tuple(x.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"base_plus_svd: dropout_p must be in [0, 1), got {dropout_p}")
    if seed is None:
        seed = (
            torch.randint(0, SEED_HIGH, (1,), device=x.device)
            if dropout_p > 0.0
            else torch.empty(1, dtype=torch.int64, device=x.device)
        )
    elif dropout_p > 0.0:
        check_seed(seed, x.device, "base_plus_svd")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    if base_out._is_view():
        # bitsandbytes' 8-bit Function returns a view that autograd forbids modifying in place.
        base_out = base_out.clone()
    y2 = base_out.reshape(-1, d_out)
    y2 = _LowRankInto.apply(y2, x2, lora_A, lora_E, lora_B, ranknum, seed, dropout_p, float(scaling))
    return y2.reshape(*lead, d_out)
