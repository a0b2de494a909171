"""``Y = X W + b + drop(S diag(lambda*s) B)`` as a persistent GEMM fed by TMA tensor descriptors.

The same product as :mod:`.xw_plus_sb` (the training forward ``y = x W^T + b + (S diag(lambda*s)) P^T``
and the backward ``dx = dy W + drop((G diag(lambda*s)) Q)``), built the way Hopper GEMMs reach cuBLAS
speed: one program per SM walks the output tiles (grouped order, so GROUP_M row tiles share a band of
W in L2), X and W arrive through tensor descriptors (TMA on sm_90; out-of-range rows and columns read
as zeros, so no load masks), and the K loop is not flattened into the tile loop (a flattened loop fell
back to cp.async in the offline sm_90 compile). The low-rank term of a tile is the initial value of
its fp32 accumulator, in fp32 x fp32 products at ``fp32_pair_precision`` (tf32x3 on half-precision
bases), through the dropout mask when there is one, exactly as in :mod:`.xw_plus_sb`.

Half-precision inputs only (fp16 / bf16: the TMA path targets tensor cores), X with a contiguous last
dimension, W contiguous in either orientation and Y, all with 16-byte aligned rows (Y is written by
a TMA store too); :func:`tma_reason` says why a
call cannot take it. Opt-in (``ADALORA_FAST_TMA_GEMM=1``) until a GPU run shows it faster than
:mod:`.xw_plus_sb` (``benchmarks/bench_svd_linear.py``'s ``fused_tma`` provider).
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    adapter_lambda,
    cdiv,
    dropout_keep,
    fp32_pair_precision,
    rank_pad,
    sm_count,
)

# Use the persistent TMA GEMM where it can run: ADALORA_FAST_TMA_GEMM=1 (opt-in until measured).
TMA_GEMM = os.environ.get("ADALORA_FAST_TMA_GEMM", "0") not in ("", "0")

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): KERNEL_PLAN's config for sm_90 (4 stages do not fit the
# 227 KB of shared memory with 128 x 256 tiles); the interpreter runs small tiles (fewer wasted rows).
GPU_CONFIG = (128, 256, 64, 3, 8)
# The big tile fits r_pad 16 without dropout only: with dropout (the Philox mask) or r_pad >= 64 it
# spills, and at r_pad 32 its staged operands need 240 KB of shared memory (227 KB allowed).
GPU_SMALL_CONFIG = (128, 128, 64, 4, 8)
INTERPRET_CONFIG = (32, 32, 32, 1, 4)
GROUP_M = 8
TMA_MAX_RANK = 64  # r_pad 128 needs 288 KB of shared memory at 128 x 128 x 64, 4 stages
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile`` in grouped order."""
    group = GROUP * num_pid_n
    first_m = (tile // group) * GROUP
    group_size = tl.minimum(num_pid_m - first_m, GROUP)
    return first_m + ((tile % group) % group_size), (tile % group) // group_size


@triton.jit
def _xw_plus_sb_tma_kernel(
    x_desc, w_desc, out_desc, bias_ptr, s_ptr, b_ptr, e_ptr, ranknum_ptr, seed_ptr,
    M, N, K, R, num_programs,
    stride_sm, stride_sr, stride_br, stride_bn, stride_e,
    scaling, p_drop,
    OUT_DTYPE: tl.constexpr, W_NK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    LOW_PREC: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    lam = adapter_lambda(e_ptr, stride_e, ranknum_ptr, offs_r, R, scaling)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for tile in tl.range(start, num_pid_m * num_pid_n, num_programs, flatten=False):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        # The low-rank term of the tile first: the accumulator's initial value. (Rank blocks of 16,
        # as xw_plus_sb does, spilled more here: 864 B at r_pad 32 against 8 B for one product.)
        s = tl.load(
            s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :] * stride_sr,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot((s * lam[None, :]).to(b.dtype), b, input_precision=LOW_PREC)
        if DROPOUT:
            keep = dropout_keep(seed, offs_m, pid_n * BLOCK_N, p_drop, BLOCK_M, BLOCK_N)
            acc = tl.where(keep, acc * (1.0 / (1.0 - p_drop)), 0.0)
        for ki in range(k_tiles):
            x = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            if W_NK:
                w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
                acc = tl.dot(x, w.T, acc)
            else:
                w = w_desc.load([ki * BLOCK_K, pid_n * BLOCK_N])
                acc = tl.dot(x, w, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        # A TMA store: a pointer tensor of the 128 x 256 output tile made every config spill on sm_90.
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(OUT_DTYPE))


def _aligned(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can describe: last dimension contiguous, rows apart (not broadcast: stride 0)
    and 16-byte aligned, the start 16-byte aligned."""
    rows_apart = t.stride(0) >= t.shape[1] or t.shape[0] <= 1
    aligned = (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
    return t.stride(1) == 1 and rows_apart and aligned


def tma_reason(x: torch.Tensor, w_kn: torch.Tensor, s: torch.Tensor | None) -> str | None:
    """Why :func:`launch_xw_plus_sb_tma` cannot take this call (then :mod:`.xw_plus_sb` runs), or None."""
    if s is None:
        return "the in-GEMM shrink (inference) has no TMA variant"
    if s.shape[1] > TMA_MAX_RANK:
        return f"rank {s.shape[1]} > {TMA_MAX_RANK} (its staged operands would exceed shared memory)"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} activations (the TMA GEMM takes fp16 / bf16)"
    if not _triton_has_tma():
        return f"triton {triton.__version__} has no tensor descriptors (3.4 or newer has)"
    if not INTERPRET and not (x.is_cuda and _tma_gpu(x.device.index if x.device.index is not None else 0)):
        return "TMA needs an sm_90 or sm_100 GPU (Hopper, datacenter Blackwell)"
    if not _aligned(x):
        return "x is not row-major with 16-byte aligned rows"
    if not (_aligned(w_kn) or _aligned(w_kn.t())):
        return "the weight is not contiguous with 16-byte aligned rows"
    if (w_kn.shape[1] * x.element_size()) % 16:
        return "the output's rows are not 16-byte aligned (the TMA store)"
    return None


def launch_xw_plus_sb_tma(
    x: torch.Tensor,
    w_kn: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    b_rn: torch.Tensor,
    lora_E: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    seed: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """:mod:`.xw_plus_sb`'s ``launch_xw_plus_sb`` (S given) on the persistent TMA GEMM; the caller made
    the shared checks and :func:`tma_reason` returned None."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = x.shape
    N = w_kn.shape[1]
    R = b_rn.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    bm, bn, bk, stages, warps = config(dropout_p > 0.0, rank_pad(R))
    w_nk = not _aligned(w_kn)  # stored (N, K): nn.Linear's weight in the forward
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w_kn.t() if w_nk else w_kn, [bn, bk] if w_nk else [bk, bn])
    out_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    programs = min(cdiv(M, bm) * cdiv(N, bn), _programs(x.device))
    ss, bs = s.stride(), b_rn.stride()
    _xw_plus_sb_tma_kernel[(programs,)](
        x_desc, w_desc, out_desc, bias if bias is not None else s, s, b_rn, lora_E, ranknum,
        seed if seed is not None else s,
        M, N, K, R, programs,  # a runtime step: a new M does not compile a new kernel
        ss[0], ss[1], bs[0], bs[1], lora_E.stride(0),
        float(scaling), float(dropout_p),
        OUT_DTYPE=_TL_DTYPES[x.dtype], W_NK=w_nk, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0,
        LOW_PREC=fp32_pair_precision(x.dtype), R_PAD=rank_pad(R),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def config(dropout: bool, r_pad: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) of a launch."""
    if INTERPRET:
        return INTERPRET_CONFIG
    return GPU_SMALL_CONFIG if dropout or r_pad > 16 else GPU_CONFIG


def _programs(device: torch.device) -> int:
    """One program per SM on a GPU; a few in the interpreter (it runs them one by one)."""
    if device.type == "cuda":
        return sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@cache
def _tma_gpu(device_index: int) -> bool:
    """sm_90 / sm_100 (Hopper, datacenter Blackwell): TMA and the 227 KB of shared memory the configs
    need (consumer GPUs such as sm_120 have about 100 KB)."""
    return torch.cuda.get_device_capability(device_index)[0] in (9, 10)


def _triton_has_tma() -> bool:
    """Host tensor descriptors and their in-kernel load / store (Triton >= 3.4)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return hasattr(tl, "make_tensor_descriptor")
