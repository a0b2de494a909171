"""``Y = X W + b + drop(S diag(lambda*s) B)``: a GEMM whose accumulator also takes a low-rank term.

One kernel, two uses in the SVD linear layer (W, B given as views through strides):
- forward: ``y = x W^T + bias + (S diag(lambda*s)) P^T`` with ``S = drop(x) Q^T`` from ``x_at``;
- backward: ``dx = dy W + drop((G diag(lambda*s)) Q)`` with ``G = dy P``; the dropout mask of the
  input is regenerated here, so the low-rank part of dx goes through it and the base part does not.
The low-rank term of an output tile (through the dropout mask when there is one) is the initial
value of the tile's fp32 accumulator; the base GEMM then accumulates on top and the tile is stored
once: no temporaries of Y's size, no second pass over Y, no second full tile in registers.
``lambda*s`` is read on the device (E and ranknum), so no host sync. With ``SHRINK_IN_GEMM``
(inference) S is computed inside the K loop from an (R x K) factor instead of read and added after
the loop, making the whole layer one launch at an extra R_PAD/BLOCK_N of tensor-core work.
Autotuned over a few tile shapes on GPUs (configs that cannot fit shared memory or that spill are
pruned); ``ADALORA_FAST_AUTOTUNE=0`` uses the first config only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    AUTOTUNE,
    INTERPRET,
    adapter_lambda,
    cdiv,
    check_seed,
    dot_precision,
    dot_split_rhs,
    dropout_keep,
    fp32_pair_precision,
    next_pow2,
    rank_pad,
)
from .constants import MAX_RANK

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). The first is the config used without autotuning. A
# ptxas resource check for sm_90 (triton 3.9, 2026-11-28) found it spill-free for bf16/fp16 training
# variants up to r_pad 64 (r_pad 128: 136 B of stack, 424 B with dropout), while the in-GEMM shrink
# (inference) spills at every rank; of the others only the last is spill-free at every rank, and
# (128, 256), (256, 128), (128, 64) spill 400-3000 B: the autotuner measures them and keeps the fastest.
GPU_CONFIGS = [
    (128, 128, 64, 4, 8),
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]
SMEM_LIMIT = 225 * 1024  # H100/H200 allow 227 KB per block; keep a margin


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(meta, num_stages=stages, num_warps=warps)


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter cannot autotune over several configs; big tiles = fewer programs
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8})]
    if AUTOTUNE:
        return [_config(*c) for c in GPU_CONFIGS]
    # No autotuning: the first config, or the last (smallest) where the first does not fit (the
    # in-GEMM shrink at r_pad 128 needs more shared memory than the first has): _prune keeps one.
    return [_config(*GPU_CONFIGS[0]), _config(*GPU_CONFIGS[-1])]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs that cannot launch (shared memory) or are known to spill for this variant."""
    elem = named_args["x_ptr"].element_size()
    r_pad = kwargs.get("R_PAD", 16)
    shrink = kwargs.get("SHRINK_IN_GEMM", False)
    ieee = kwargs.get("MAIN_PREC") == "ieee"
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        smem = c.num_stages * (bm * bk + bk * bn) * elem
        if shrink:
            smem += c.num_stages * bk * r_pad * 4
        if smem > SMEM_LIMIT:
            continue
        if (ieee or kwargs.get("DROPOUT", False)) and bm * bn > 128 * 128:
            continue  # fp32 FMA dots and Philox temporaries spill on the largest tiles
        kept.append(c)
    if not AUTOTUNE:
        return kept[:1] or configs[-1:]
    return kept or configs[-1:]


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "SHRINK_IN_GEMM", "DROPOUT", "HAS_BIAS", "MAIN_PREC"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _xw_plus_sb_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, a_ptr, b_ptr, e_ptr, ranknum_ptr, seed_ptr, out_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sm, stride_sr, stride_ar, stride_ak,
    stride_br, stride_bn, stride_e, stride_om, stride_on,
    scaling, p_drop,
    HAS_BIAS: tl.constexpr, SHRINK_IN_GEMM: tl.constexpr, DROPOUT: tl.constexpr,
    MAIN_PREC: tl.constexpr, SHRINK_PREC: tl.constexpr, LOW_PREC: tl.constexpr, R_PAD: tl.constexpr,
    R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped launch order: GROUP_M row tiles share each column band of W while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % group_size)
    pid_n = (pid % group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/cols wrap around (valid addresses, results never stored): no M/N load masks.
    # Row offsets in int64: M x stride may exceed 2^31.
    rows = (offs_m % M).to(tl.int64)
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    if SHRINK_IN_GEMM:
        # Inference: S = x A^T accumulates from the same x tiles as the GEMM (one pass over x); the
        # low-rank term is added to the accumulator after the loop.
        offs_rp = tl.arange(0, R_PAD)
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_rp[None, :] * stride_ar
        acc_s = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k0 * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(x, w, acc, input_precision=MAIN_PREC)
            a_t = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & (offs_rp[None, :] < R), other=0.0)
            acc_s = dot_split_rhs(x.to(a_t.dtype), a_t, acc_s, SHRINK_PREC)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_ak
        lam = adapter_lambda(e_ptr, stride_e, ranknum_ptr, offs_rp, R, scaling)
        b = tl.load(
            b_ptr + offs_rp[:, None] * stride_br + cols[None, :] * stride_bn,
            mask=offs_rp[:, None] < R,
            other=0.0,
        )
        acc = tl.dot((acc_s * lam[None, :]).to(b.dtype), b, acc, input_precision=LOW_PREC)
    else:
        # The low-rank term (S diag(lambda*s)) B of this tile first, in fp32, through the dropout
        # mask: it is the initial value of the GEMM's accumulator (no second tile stays live).
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in tl.static_range(0, R_PAD, R_BLOCK):
            offs_r = r0 + tl.arange(0, R_BLOCK)
            r_mask = offs_r < R
            lam = adapter_lambda(e_ptr, stride_e, ranknum_ptr, offs_r, R, scaling)
            s = tl.load(
                s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=r_mask[None, :],
                other=0.0,
            )
            b_ptrs = b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bn
            b = tl.load(b_ptrs, mask=r_mask[:, None], other=0.0)
            acc = tl.dot((s * lam[None, :]).to(b.dtype), b, acc, input_precision=LOW_PREC)
        if DROPOUT:
            seed = tl.load(seed_ptr)
            keep = dropout_keep(seed, offs_m, pid_n * BLOCK_N, p_drop, BLOCK_M, BLOCK_N)
            acc = tl.where(keep, acc * (1.0 / (1.0 - p_drop)), 0.0)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k0 * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(x, w, acc, input_precision=MAIN_PREC)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def xw_plus_sb(
    x: torch.Tensor,
    w_kn: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor | None,
    b_rn: torch.Tensor,
    lora_E: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    *,
    a_rk: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``x @ w_kn + bias + drop((s * lambda*scale) @ b_rn)`` in x's dtype, shape (M, N).

    ``x`` (M, K) and ``w_kn`` (K, N) share a dtype; ``s`` (M, R) fp32, or None to compute
    ``x @ a_rk.T`` inside the GEMM (``a_rk`` (R, K); no dropout then); ``b_rn`` (R, N);
    ``lora_E`` (R, 1); ``ranknum`` a one-element tensor. Any strides.
    """
    M, K = x.shape
    N = w_kn.shape[1]
    R = b_rn.shape[0]
    name = "xw_plus_sb"
    if w_kn.dim() != 2 or w_kn.shape[0] != K:
        raise ValueError(f"{name}: x is (M, {K}) but w is {tuple(w_kn.shape)}, expected ({K}, N)")
    if x.dtype != w_kn.dtype:
        raise ValueError(f"{name}: x is {x.dtype} but w is {w_kn.dtype}")
    if b_rn.shape[1] != N or lora_E.shape[0] != R or R > MAX_RANK:
        raise ValueError(
            f"{name}: b {tuple(b_rn.shape)} / E {tuple(lora_E.shape)} do not fit N={N}, R<={MAX_RANK}"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({N},)")
    if s is None:
        if a_rk is None or a_rk.shape != (R, K):
            raise ValueError(f"{name}: without s, a_rk of shape ({R}, {K}) is required")
        if dropout_p > 0.0:
            raise ValueError(f"{name}: the in-GEMM shrink has no dropout (inference only)")
    elif s.shape != (M, R) or s.dtype != torch.float32:
        raise ValueError(f"{name}: s must be float32 of shape ({M}, {R}), got {s.dtype} {tuple(s.shape)}")
    if dropout_p > 0.0:
        check_seed(seed, x.device, name)
    if K == 0 and M > 0 and N > 0:
        raise ValueError(f"{name}: K = 0")
    return launch_xw_plus_sb(x, w_kn, bias, s, b_rn, lora_E, ranknum, scaling, a_rk, seed, dropout_p)


def launch_xw_plus_sb(
    x: torch.Tensor,
    w_kn: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor | None,
    b_rn: torch.Tensor,
    lora_E: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    a_rk: torch.Tensor | None,
    seed: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """:func:`xw_plus_sb` without its checks (the caller made them; K > 0)."""
    M, K = x.shape
    N = w_kn.shape[1]
    R = b_rn.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    r_pad = rank_pad(R)
    a = a_rk if s is None else b_rn  # placeholders keep pointer arguments valid
    s_arg = s if s is not None else out
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _xw_plus_sb_kernel[grid](
        x, w_kn, bias if bias is not None else out, s_arg, a, b_rn, lora_E, ranknum,
        seed if seed is not None else out, out,
        M, N, K, R, next_pow2(M),
        *x.stride(), *w_kn.stride(), *s_arg.stride(), *a.stride(), *b_rn.stride(), lora_E.stride(0),
        *out.stride(),
        float(scaling), float(dropout_p),
        HAS_BIAS=bias is not None, SHRINK_IN_GEMM=s is None, DROPOUT=dropout_p > 0.0,
        MAIN_PREC=dot_precision(x.dtype, x.dtype), SHRINK_PREC=dot_precision(x.dtype, a.dtype),
        LOW_PREC=fp32_pair_precision(x.dtype), R_PAD=r_pad,
        R_BLOCK=min(r_pad, 32),
    )  # fmt: skip
    return out
