"""Small pieces shared by the SVD-linear kernels: jit helpers and host-side launch metadata.

Jit helpers (inlined into the kernels that call them):
- :func:`dropout_keep`: the keep mask of a tile of a dropout, from Philox with two 32-bit counters
  (col // 4, row), so an element gets the same bit in every kernel that touches it, and no offsets
  that could overflow int32 on large activations.
- :func:`adapter_lambda`: ``E * scaling / (ranknum + 1e-5)`` for a block of ranks, read on the device
  (no host sync on ``ranknum``).

Host helpers: whether Triton runs in its interpreter, rank padding for ``tl.dot`` and the dot input
precision that matches PyTorch's numerics for each dtype.
"""

from __future__ import annotations

import contextlib
import os
from functools import cache

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether kernels are interpreted: read the flag the same way.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# ADALORA_FAST_AUTOTUNE=0: one GEMM config, no autotuning (quick compiles: tests, first GPU checks).
AUTOTUNE = os.environ.get("ADALORA_FAST_AUTOTUNE", "1") not in ("", "0")

MAX_RANK = 128
MIN_DOT = 16  # tl.dot needs every dimension >= 16 on GPUs


@triton.jit
def dropout_keep(seed, rows, col_start, p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Keep mask (True = kept) of the dropout elements ``rows`` x ``col_start + arange(BLOCK_C)``.

    One Philox4x32 call per 4 consecutive columns (counters: column // 4, row) and all four of its
    outputs used, so a mask costs a quarter of a Philox per element. ``col_start`` must be a multiple
    of 4 (block offsets are); element (row, col) always gets the same bit, whatever the tile shape.
    """
    Q: tl.constexpr = BLOCK_C // 4
    quads = col_start // 4 + tl.arange(0, Q)
    c0 = (quads[None, :] + rows[:, None] * 0).to(tl.uint32, bitcast=True)
    c1 = (rows[:, None] + quads[None, :] * 0).to(tl.uint32, bitcast=True)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_R, BLOCK_C))
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def adapter_lambda(e_ptr, stride_e, ranknum_ptr, offs_r, R, scaling):
    """``lambda_j * scaling / (ranknum + 1e-5)`` for ranks ``offs_r`` (0 beyond ``R``), in fp32."""
    lam = tl.load(e_ptr + offs_r * stride_e, mask=offs_r < R, other=0.0).to(tl.float32)
    ranknum = tl.load(ranknum_ptr).to(tl.float32)
    return lam * (scaling / (ranknum + 1e-5))


def rank_pad(r: int) -> int:
    """The rank block ``tl.dot`` works on: a power of two >= 16 (r is padded with zeros)."""
    return max(MIN_DOT, triton.next_power_of_2(max(r, 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """Input precision of dots with an fp32 operand, given the activations' dtype.

    IEEE for fp32 models (as PyTorch without TF32). On half-precision bases with fp32 adapters the
    activations are exact in TF32 but the fp32 adapter factors and the fp32 low-rank intermediates
    are not: plain TF32 rounds them to 2^-11 and left fp16 results about 1e-3 off the float64
    reference on the H100 (PEFT computes this path in fp32). ``tf32x3`` splits each fp32 operand into
    two TF32 parts (three tensor-core products), near-IEEE accuracy at a small cost on these
    rank-sized dots. For dots whose operands are all fp16/bf16 the setting is unused.
    """
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32x3"


@cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """About two waves of programs on a GPU; a few on the interpreter (it runs them one by one)."""
    if device.type == "cuda":
        return 2 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' (multi-GPU models)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_seed(seed: torch.Tensor | None, device: torch.device, name: str) -> None:
    """The dropout seed: one int64 element on the kernels' device."""
    if seed is None:
        raise ValueError(f"{name}: dropout_p > 0 needs a seed tensor")
    if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != device:
        raise ValueError(
            f"{name}: seed must be one int64 element on {device}, got {seed.dtype} {list(seed.shape)} on "
            f"{seed.device}"
        )


def table_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built int64 table on ``device``: on CUDA an asynchronous copy from pinned memory (no
    host sync, also under ``set_sync_debug_mode("error")``)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
