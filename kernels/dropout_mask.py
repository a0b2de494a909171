"""``keep[m, k]``: the dropout mask the SVD-linear kernels draw for a seed, materialised.

The kernels never store their mask (they regenerate it from the seed in the backward); this kernel
writes the same mask out so that references and tests can apply it to the float64 math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, device_guard, dropout_keep


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), offs_m, tl.program_id(1) * BLOCK_K, p_drop, BLOCK_M, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


def dropout_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """Boolean (M, K) keep mask of dropout probability ``p`` for ``seed`` (an int64 tensor, 1 element)."""
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"dropout_mask: seed must be one int64 element, got {seed.dtype} {list(seed.shape)}")
    out = torch.empty(M, K, device=seed.device, dtype=torch.int8)
    if M and K:
        grid = (cdiv(M, 32), cdiv(K, 32))
        with device_guard(out):
            _dropout_mask_kernel[grid](seed, out, M, K, float(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
