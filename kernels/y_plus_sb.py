"""``Y += drop(S diag(lambda*s) B)`` in place: a low-rank term added into an output that another kernel
computed (a quantised base's GEMM in bitsandbytes, or zeros for a gradient).

One read and one write of Y per tile, the low-rank product accumulated in fp32 (the same loop as
``xw_plus_sb``'s initial accumulator: R in blocks of at most 32, ``lambda*s`` read on the device, no
host sync) and, with dropout, the mask regenerated from the seed at each element of Y (the same bits
``x_at`` drew for the element of x: Y is then dx). Registered as the ``torch.library`` op
``adalora_fast::y_plus_sb`` (mutates ``y``; fake impl) for ``torch.compile``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import adapter_lambda, cdiv, check_seed, dropout_keep, fp32_pair_precision, rank_pad
from .constants import MAX_RANK

BLOCK_M, BLOCK_N = 64, 64


@triton.jit
def _y_plus_sb_kernel(
    y_ptr, s_ptr, b_ptr, e_ptr, ranknum_ptr, seed_ptr,
    M, N, R,
    stride_ym, stride_yn, stride_sm, stride_sr, stride_br, stride_bn, stride_e,
    scaling, p_drop,
    DROPOUT: tl.constexpr, LOW_PREC: tl.constexpr, R_PAD: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)  # wrapped: valid addresses, never stored
    cols = offs_n % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.static_range(0, R_PAD, R_BLOCK):
        offs_r = r0 + tl.arange(0, R_BLOCK)
        r_mask = offs_r < R
        lam = adapter_lambda(e_ptr, stride_e, ranknum_ptr, offs_r, R, scaling)
        s_ptrs = s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr
        s = tl.load(s_ptrs, mask=r_mask[None, :], other=0.0)
        b_ptrs = b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bn
        b = tl.load(b_ptrs, mask=r_mask[:, None], other=0.0)
        acc = tl.dot((s * lam[None, :]).to(b.dtype), b, acc, input_precision=LOW_PREC)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        keep = dropout_keep(seed, offs_m, pid_n * BLOCK_N, p_drop, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc * (1.0 / (1.0 - p_drop)), 0.0)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("adalora_fast::y_plus_sb", mutates_args=("y",))
def y_plus_sb(
    y: torch.Tensor,
    s: torch.Tensor,
    b_rn: torch.Tensor,
    lora_E: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> None:
    """``y += drop((s * lambda*scale) @ b_rn)`` in place. ``y`` (M, N) floating, any strides; ``s``
    (M, R) fp32; ``b_rn`` (R, N); ``lora_E`` (R, 1); ``ranknum`` a one-element tensor; ``seed`` a
    device int64 tensor when ``dropout_p > 0``."""
    name = "y_plus_sb"
    if y.dim() != 2 or not y.is_floating_point():
        raise ValueError(f"{name}: y must be a 2-D floating tensor, got {y.dtype} {tuple(y.shape)}")
    M, N = y.shape
    R = b_rn.shape[0]
    if s.shape != (M, R) or s.dtype != torch.float32:
        raise ValueError(f"{name}: s must be float32 of shape ({M}, {R}), got {s.dtype} {tuple(s.shape)}")
    if b_rn.shape != (R, N) or lora_E.shape[0] != R or R > MAX_RANK:
        raise ValueError(
            f"{name}: b {tuple(b_rn.shape)} / E {tuple(lora_E.shape)} do not fit ({M}, {N}), R<={MAX_RANK}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        check_seed(seed, y.device, name)
    if M == 0 or N == 0 or R == 0:
        return
    r_pad = rank_pad(R)
    grid = (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))
    _y_plus_sb_kernel[grid](
        y, s, b_rn, lora_E, ranknum, seed if seed is not None else s,
        M, N, R,
        y.stride(0), y.stride(1), s.stride(0), s.stride(1), b_rn.stride(0), b_rn.stride(1),
        lora_E.stride(0), float(scaling), float(dropout_p),
        DROPOUT=dropout_p > 0.0, LOW_PREC=fp32_pair_precision(y.dtype), R_PAD=r_pad,
        R_BLOCK=min(r_pad, 32), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip


@y_plus_sb.register_fake
def _(y, s, b_rn, lora_E, ranknum, scaling, seed=None, dropout_p=0.0) -> None:
    return None


def y_plus_sb_reference(y, s, b_rn, lora_E, ranknum, scaling, keep=None, dropout_p=0.0) -> torch.Tensor:
    """float64 ``y + drop((s * lambda*scale) @ b_rn)`` (``keep``: the dropout keep mask, if any)."""
    lam = lora_E.double().reshape(-1) * (scaling / (ranknum.double().reshape(()) + 1e-5))
    low = (s.double() * lam) @ b_rn.double()
    if keep is not None:
        low = torch.where(keep, low / (1.0 - dropout_p), torch.zeros_like(low))
    return y.double() + low
