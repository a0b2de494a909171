"""``dF = diag(lambda*s) S^T drop(X)``: the factor gradients of the SVD linear layer.

With ``X`` (M x C) an activation and ``S`` (M x R) a low-rank fp32 matrix, the kernel computes the
(R x C) product ``(S diag(lambda*s))^T drop(X)``, reducing over the M rows:
- ``dP^T`` (i.e. dB) from ``X = dy`` and ``S = drop(x) Q^T`` (no dropout on dy);
- ``dQ`` (i.e. dA) from ``X = x`` with the forward's dropout regenerated, and ``S = dy P``.
It reads X once. The M reduction is split across programs for parallelism; each split writes its own
fp32 partial (SPLIT x R x C) and one ``sum`` finishes it, so results are deterministic (no atomics).
With one split (short inputs) the kernel stores the result itself, in the factor's dtype and layout
(dB is (C x R): written through transposed strides), so no ATen op follows it.

``FOLD_DLAM`` (the dQ pass, :func:`xt_s_dlambda`): one extra column of programs reads G and the
forward's S and reduces ``d(lambda)_j = s * sum_m G_mj S_mj`` per row split, removing the ATen ops of
that reduction (a product, a sum, a scale, a cast); the dQ programs keep their code and registers
(an sm_90 compile shows the same resource use). Opt-in (``FOLD_DLAMBDA``) until a GPU run shows the
backward faster with it.
"""

from __future__ import annotations

import os

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
from .constants import MAX_RANK, RANKNUM_EPS

_EPS = tl.constexpr(RANKNUM_EPS)  # jit code reads only constexpr globals


@triton.jit
def _dlam_partial(
    g_ptr, s2_ptr, ranknum_ptr, dlam_ptr, m_start, m_end, R,
    stride_gm, stride_gr, stride_s2m, stride_s2r, stride_d, scaling,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``scale * sum_m G_mr S_mr`` over rows ``m_start:m_end``, stored at ``dlam_ptr`` (R values)."""
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    acc = tl.zeros((R_PAD,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = r_mask[:, None] & (rows < m_end)[None, :]
        g = tl.load(g_ptr + offs_r[:, None] * stride_gr + rows[None, :] * stride_gm, mask=mask, other=0.0)
        s = tl.load(s2_ptr + offs_r[:, None] * stride_s2r + rows[None, :] * stride_s2m, mask=mask, other=0.0)
        acc += tl.sum(g * s, axis=1)
    ranknum = tl.load(ranknum_ptr).to(tl.float32)
    acc = acc * (scaling / (ranknum + _EPS))
    tl.store(dlam_ptr + offs_r * stride_d, acc.to(dlam_ptr.dtype.element_ty), mask=r_mask)


@triton.jit
def _xt_s_kernel(
    x_ptr, s_ptr, e_ptr, ranknum_ptr, seed_ptr, out_ptr, s2_ptr, dlam_ptr,
    M, C, R, rows_per_split,
    stride_xm, stride_xc, stride_sm, stride_sr, stride_e, stride_osplit, stride_or, stride_oc,
    stride_s2m, stride_s2r, stride_dsplit, stride_dr,
    scaling, p_drop,
    DROPOUT: tl.constexpr, FOLD_DLAM: tl.constexpr, PREC: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    if FOLD_DLAM and pid_c == tl.cdiv(C, BLOCK_C):
        # One extra column of programs reduces d(lambda) per split: the dQ tiles keep their registers.
        _dlam_partial(
            s_ptr, s2_ptr, ranknum_ptr, dlam_ptr + split * stride_dsplit, m_start, m_end, R,
            stride_sm, stride_sr, stride_s2m, stride_s2r, stride_dr, scaling, R_PAD, BLOCK_M,
        )  # fmt: skip
    else:
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, R_PAD)
        c_mask = offs_c < C
        r_mask = offs_r < R
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
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & c_mask[None, :])


# Fold d(lambda) into the dQ pass (xt_s_dlambda) in svd_linear's backward: ADALORA_FAST_FOLD_DLAMBDA=1.
FOLD_DLAMBDA = os.environ.get("ADALORA_FAST_FOLD_DLAMBDA", "0") not in ("", "0")


def _tiles(x: torch.Tensor, r_pad: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_M, warps) for activations like ``x`` at rank block ``r_pad``."""
    if INTERPRET:
        return 64, 32, 4
    if dot_precision(x.dtype) == "ieee":
        return 64, 32, 8  # IEEE fp32 dots run on FMA units: small tiles, no spills
    # (BLOCK_C, BLOCK_M, warps) for the split fp32 operand (two TF32 products). ptxas for sm_90
    # (triton 3.9, 2026-12-03; tests/kernels/test_xt_s.py): spill-free without dropout at every r_pad;
    # with dropout bf16 r_pad 16 spills 24 B, and the IEEE fp32 tiles above 24 B (r_pad 64) and 632 B
    # (r_pad 128).
    return {16: (128, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 8)}[r_pad]


def launch_xt_s(
    x: torch.Tensor,
    s: torch.Tensor,
    lora_E: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    seed: torch.Tensor | None,
    dropout_p: float,
    dtype: torch.dtype,
    transposed: bool,
    s_fwd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`xt_s` without its checks (the caller made them): ``(dF, d(lambda) or None)``, dF (R, C),
    or (C, R) when ``transposed``, in ``dtype``; with ``s_fwd`` (M, R) fp32 also ``d(lambda)`` (R, 1)
    in ``lora_E``'s dtype."""
    M, C = x.shape
    R = s.shape[1]
    if M == 0 or R == 0 or C == 0:
        out = torch.zeros((C, R) if transposed else (R, C), device=x.device, dtype=dtype)
        return out, (None if s_fwd is None else torch.zeros(R, 1, device=x.device, dtype=lora_E.dtype))
    r_pad = rank_pad(R)
    block_c, block_m, warps = _tiles(x, r_pad)
    c_blocks = cdiv(C, block_c)
    m_blocks = cdiv(M, block_m)
    splits = max(1, min(m_blocks, cdiv(target_programs(x.device), c_blocks)))
    rows_per_split = cdiv(m_blocks, splits) * block_m
    splits = cdiv(M, rows_per_split)
    # One split: the kernel writes the result in place, in its dtype; several: fp32 partials, one sum.
    shape = (C, R) if transposed else (R, C)
    if splits == 1:
        out = torch.empty(shape, device=x.device, dtype=dtype)
        so = (0, *out.stride())
    else:
        out = torch.empty((splits, *shape), device=x.device, dtype=torch.float32)
        so = out.stride()
    stride_split, stride_or, stride_oc = (so[0], so[2], so[1]) if transposed else so
    fold = s_fwd is not None
    if fold:
        dlam = torch.empty((R, 1) if splits == 1 else (splits, R, 1), device=x.device,
                           dtype=lora_E.dtype if splits == 1 else torch.float32)  # fmt: skip
        stride_dsplit = 0 if splits == 1 else dlam.stride(0)
        stride_dr = dlam.stride(-2)  # the output's own rows (not lora_E's, which may be strided)
        s2_strides = s_fwd.stride()
    else:
        dlam, stride_dsplit, stride_dr, s2_strides = out, 0, 0, (0, 0)
    xs, ss = x.stride(), s.stride()
    _xt_s_kernel[(c_blocks + fold, splits)](
        x, s, lora_E, ranknum, seed if seed is not None else out, out, s_fwd if fold else s, dlam,
        M, C, R, rows_per_split,
        xs[0], xs[1], ss[0], ss[1], lora_E.stride(0), stride_split, stride_or, stride_oc,
        s2_strides[0], s2_strides[1], stride_dsplit, stride_dr,
        float(scaling), float(dropout_p),
        DROPOUT=dropout_p > 0.0, FOLD_DLAM=fold, PREC=dot_precision(x.dtype), R_PAD=r_pad,
        BLOCK_C=block_c, BLOCK_M=block_m,
        num_warps=warps, num_stages=3,
    )  # fmt: skip
    if splits > 1:
        out = out.sum(0).to(dtype)
        if fold:
            dlam = dlam.sum(0).to(lora_E.dtype)
    return out, (dlam if fold else None)


def _check(name: str, x: torch.Tensor, s: torch.Tensor, lora_E: torch.Tensor, seed, dropout_p: float) -> None:
    M = x.shape[0]
    R = s.shape[1]
    if s.shape[0] != M or s.dtype != torch.float32:
        raise ValueError(f"{name}: s must be float32 ({M}, R), got {s.dtype} {tuple(s.shape)}")
    if lora_E.shape[0] != R or R > MAX_RANK:
        raise ValueError(f"{name}: lora_E {tuple(lora_E.shape)} does not fit R={R} (<= {MAX_RANK})")
    if dropout_p > 0.0:
        check_seed(seed, x.device, name)


def xt_s(
    x: torch.Tensor,
    s: torch.Tensor,
    lora_E: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    *,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dtype: torch.dtype = torch.float32,
    transposed: bool = False,
) -> torch.Tensor:
    """``(s * lambda*scale).T @ drop(x)``, shape (R, C) (its transpose (C, R) when ``transposed``) in
    ``dtype`` (fp32 accumulation). ``x`` (M, C), ``s`` (M, R) fp32."""
    _check("xt_s", x, s, lora_E, seed, dropout_p)
    return launch_xt_s(x, s, lora_E, ranknum, scaling, seed, dropout_p, dtype, transposed)[0]


def xt_s_dlambda(
    x: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    lora_E: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    *,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dQ pass with d(lambda) folded in: ``(xt_s(x, g, ...), scale * sum_m g * s)``, the second
    (R, 1) in ``lora_E``'s dtype (``scale = scaling / (ranknum + 1e-5)``). ``g``, ``s`` (M, R) fp32."""
    _check("xt_s_dlambda", x, g, lora_E, seed, dropout_p)
    if s.shape != g.shape or s.dtype != torch.float32:
        raise ValueError(f"xt_s_dlambda: s must be float32 {tuple(g.shape)}, got {s.dtype} {tuple(s.shape)}")
    dF, dlam = launch_xt_s(x, g, lora_E, ranknum, scaling, seed, dropout_p, dtype, False, s_fwd=s)
    assert dlam is not None
    return dF, dlam
