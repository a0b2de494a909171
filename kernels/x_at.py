"""``S = drop(X) @ A^T``: the low-rank "shrink" of an (M x K) activation through an (R x K) factor.

The forward uses it for ``S = drop(x) Q^T`` (kept, unscaled, for the backward) and the backward for
``G = dy P`` (A given as ``P^T`` through strides). It is memory bound: one pass over X, S is M x R
in fp32. Dropout is regenerated from the seed (Philox on (col, row)), never stored. X is cast to A's
dtype before the product, as PEFT casts the input to the adapter dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    cdiv,
    check_seed,
    dot_precision,
    dot_split_rhs,
    dropout_keep,
    rank_pad,
)
from .constants import MAX_RANK


@triton.jit
def _x_at_kernel(
    x_ptr, a_ptr, seed_ptr, out_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    p_drop,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # row offsets in int64: M x stride may exceed 2^31
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        a_t = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=k_mask[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        x = x.to(a_t.dtype)
        if DROPOUT:
            keep = dropout_keep(seed, offs_m, k0 * BLOCK_K, p_drop, BLOCK_M, BLOCK_K)
            # the 1/(1-p) scale goes on the result: scaled fp16/bf16 values are no longer exact in
            # TF32, which the split dot relies on (the H100 showed 4e-4 errors with p = 0.2)
            x = tl.where(keep, x, 0.0).to(a_t.dtype)
        acc = dot_split_rhs(x, a_t, acc, PREC)
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - p_drop))
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=m_mask[:, None] & (offs_r[None, :] < R))


def _check(x: torch.Tensor, a: torch.Tensor) -> None:
    if x.dim() != 2 or a.dim() != 2:
        raise ValueError(f"x_at: x and a must be 2-D, got {tuple(x.shape)} and {tuple(a.shape)}")
    if x.shape[1] != a.shape[1]:
        raise ValueError(f"x_at: x has {x.shape[1]} features but a has {a.shape[1]} columns")
    if a.shape[0] > MAX_RANK:
        raise ValueError(f"x_at: rank {a.shape[0]} > {MAX_RANK} is not supported by the kernel")
    if x.device != a.device:
        raise ValueError(f"x_at: x on {x.device} but a on {a.device}")
    if not (x.dtype.is_floating_point and a.dtype.is_floating_point):
        raise ValueError(f"x_at: floating-point inputs expected, got {x.dtype} and {a.dtype}")


def x_at(
    x: torch.Tensor,
    a: torch.Tensor,
    *,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``drop(x) @ a.T`` in fp32, shape (M, R); ``seed`` (int64 device scalar) is needed when p > 0.

    ``tiles`` = (BLOCK_M, BLOCK_K, warps) overrides the tile choice (benchmarks/profile_gpu.py's sweep).
    """
    _check(x, a)
    if dropout_p > 0.0:
        check_seed(seed, x.device, "x_at")
    return launch_x_at(x, a, seed, dropout_p, tiles)


def launch_x_at(
    x: torch.Tensor,
    a: torch.Tensor,
    seed: torch.Tensor | None,
    dropout_p: float,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """:func:`x_at` without its checks (the caller made them)."""
    M, K = x.shape
    R = a.shape[0]
    out = torch.empty(M, R, device=x.device, dtype=torch.float32)
    if M == 0 or R == 0:
        return out.zero_()
    dropout = dropout_p > 0.0
    r_pad = rank_pad(R)
    if tiles is not None:
        block_m, block_k, warps = tiles
    elif INTERPRET:
        block_m, block_k, warps = 64, 64, 4
    elif dot_precision(x.dtype) == "ieee":
        block_m, block_k, warps = 32, 32, 8  # IEEE fp32 dots run on FMA units: small tiles, no spills
    elif r_pad == 16 and not dropout:
        # The H100 tile sweep (benchmarks/results/gpu_profile.csv, 98e65de, 4096 wide, 8,192 rows,
        # r 12, bf16): 32 x 128 / 4 warps took 47 / 50 us for S = x A^T / G = dy B against 66 /
        # 108 us with 64 x 64 / 8 warps, the fastest of the 7 tiles tried.
        block_m, block_k, warps = 32, 128, 4
    else:  # not swept on a GPU yet; 64 x 128 / 4 warps spilled on sm_90 with the split fp32 operand
        block_m, block_k, warps = 64, 64, 8
    xs, as_, os_ = x.stride(), a.stride(), out.stride()
    _x_at_kernel[(cdiv(M, block_m),)](
        x, a, seed if dropout else out, out,
        M, K, R,
        xs[0], xs[1], as_[0], as_[1], os_[0], os_[1],
        float(dropout_p),
        DROPOUT=dropout, PREC=dot_precision(x.dtype, a.dtype), R_PAD=r_pad, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out


def x_at_reference(x: torch.Tensor, a: torch.Tensor, keep: torch.Tensor | None = None, p: float = 0.0):
    """float64 ``drop(x) @ a.T`` given the kept elements (the kernel's mask, see ``dropout_mask``)."""
    x64 = x.to(a.dtype).double()
    if keep is not None:
        x64 = torch.where(keep, x64 / (1.0 - p), 0.0)
    return x64 @ a.double().T
