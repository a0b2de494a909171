"""``dF = diag(lambda*s) S^T drop(X)``: the factor gradients of the SVD linear layer.

With ``X`` (M x C) an activation and ``S`` (M x R) a low-rank fp32 matrix, the kernel computes the
(R x C) product ``(S diag(lambda*s))^T drop(X)``, reducing over the M rows:
- ``dP^T`` (i.e. dB) from ``X = dy`` and ``S = drop(x) Q^T`` (no dropout on dy);
- ``dQ`` (i.e. dA) from ``X = x`` with the forward's dropout regenerated, and ``S = dy P``.
It reads X once. The M reduction is split across programs for parallelism; each split writes its own
fp32 partial (SPLIT x R x C) and one ``sum`` finishes it, so results are deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    adapter_lambda,
    cdiv,
    check_seed,
    dot_precision,
    dot_split_lhs,
    dropout_keep,
    rank_pad,
    target_programs,
)
from .constants import MAX_RANK


@triton.jit
def _xt_s_kernel(
    x_ptr, s_ptr, e_ptr, ranknum_ptr, seed_ptr, out_ptr,
    M, C, R, rows_per_split,
    stride_xm, stride_xc, stride_sm, stride_sr, stride_e, stride_osplit, stride_or, stride_oc,
    scaling, p_drop,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, R_PAD)
    c_mask = offs_c < C
    r_mask = offs_r < R
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        s_t = tl.load(
            s_ptr + offs_r[:, None] * stride_sr + offs_m.to(tl.int64)[None, :] * stride_sm,
            mask=r_mask[:, None] & m_mask[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_c[None, :] * stride_xc,
            mask=m_mask[:, None] & c_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if DROPOUT:
            keep = dropout_keep(seed, offs_m, pid_c * BLOCK_C, p_drop, BLOCK_M, BLOCK_C)
            x = tl.where(keep, x, 0.0)  # 1/(1-p) on the result: x stays exact in TF32 (see x_at)
        acc = dot_split_lhs(s_t, x, acc, PREC)
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - p_drop))
    lam = adapter_lambda(e_ptr, stride_e, ranknum_ptr, offs_r, R, scaling)
    acc = acc * lam[:, None]
    out_ptrs = out_ptr + split * stride_osplit + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(out_ptrs, acc, mask=r_mask[:, None] & c_mask[None, :])


def xt_s(
    x: torch.Tensor,
    s: torch.Tensor,
    lora_E: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    *,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``(s * lambda*scale).T @ drop(x)`` in fp32, shape (R, C). ``x`` (M, C), ``s`` (M, R) fp32."""
    M, C = x.shape
    R = s.shape[1]
    if s.shape[0] != M or s.dtype != torch.float32:
        raise ValueError(f"xt_s: s must be float32 ({M}, R), got {s.dtype} {tuple(s.shape)}")
    if lora_E.shape[0] != R or R > MAX_RANK:
        raise ValueError(f"xt_s: lora_E {tuple(lora_E.shape)} does not fit R={R} (<= {MAX_RANK})")
    if dropout_p > 0.0:
        check_seed(seed, x.device, "xt_s")
    if M == 0 or R == 0 or C == 0:
        return torch.zeros(R, C, device=x.device, dtype=torch.float32)
    r_pad = rank_pad(R)
    if INTERPRET:
        block_c, block_m, warps = 64, 32, 4
    elif dot_precision(x.dtype) == "ieee":
        block_c, block_m, warps = 64, 32, 8  # IEEE fp32 dots run on FMA units: small tiles, no spills
    else:
        # (BLOCK_C, BLOCK_M, warps) without spills on sm_90 with the split fp32 operand (two TF32
        # products), dropout or not (ptxas resource check)
        tiles = {16: (128, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 8)}
        block_c, block_m, warps = tiles[r_pad]
    c_blocks = cdiv(C, block_c)
    m_blocks = cdiv(M, block_m)
    splits = max(1, min(m_blocks, cdiv(target_programs(x.device), c_blocks)))
    rows_per_split = cdiv(m_blocks, splits) * block_m
    splits = cdiv(M, rows_per_split)
    partial = torch.empty(splits, R, C, device=x.device, dtype=torch.float32)
    _xt_s_kernel[(c_blocks, splits)](
        x, s, lora_E, ranknum, seed if seed is not None else partial, partial,
        M, C, R, rows_per_split,
        x.stride(0), x.stride(1), s.stride(0), s.stride(1), lora_E.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        float(scaling), float(dropout_p),
        DROPOUT=dropout_p > 0.0, PREC=dot_precision(x.dtype), R_PAD=r_pad, BLOCK_C=block_c, BLOCK_M=block_m,
        num_warps=warps, num_stages=3,
    )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)
