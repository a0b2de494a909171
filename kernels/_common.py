"""Small pieces shared by the SVD-linear kernels: jit helpers and host-side launch metadata.

Jit helpers (inlined into the kernels that call them):
- :func:`dropout_keep`: the keep mask of a tile of a dropout, from Philox with two 32-bit counters
  (col // 4, row), so an element gets the same bit in every kernel that touches it, and no offsets
  that could overflow int32 on large activations.
- :func:`adapter_lambda`: ``E * scaling / (ranknum + 1e-5)`` for a block of ranks, read on the device
  (no host sync on ``ranknum``).

- :func:`dot_split_rhs` / :func:`dot_split_lhs`: near-IEEE dots of fp16/bf16 activations with an
  fp32 operand in two TF32 tensor-core products (see :func:`dot_precision`).

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

from .constants import MAX_RANK, RANKNUM_EPS, SUPPORTED_DTYPES

# Triton decides at decoration time whether kernels are interpreted: read the flag the same way.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# ADALORA_FAST_AUTOTUNE=0: one GEMM config, no autotuning (quick compiles: tests, first GPU checks).
AUTOTUNE = os.environ.get("ADALORA_FAST_AUTOTUNE", "1") not in ("", "0")

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


_EPS = tl.constexpr(RANKNUM_EPS)  # jit code reads only constexpr globals


@triton.jit
def adapter_lambda(e_ptr, stride_e, ranknum_ptr, offs_r, R, scaling):
    """``lambda_j * scaling / (ranknum + 1e-5)`` for ranks ``offs_r`` (0 beyond ``R``), in fp32."""
    lam = tl.load(e_ptr + offs_r * stride_e, mask=offs_r < R, other=0.0).to(tl.float32)
    ranknum = tl.load(ranknum_ptr).to(tl.float32)
    return lam * (scaling / (ranknum + _EPS))


def adapter_reason(lora_A: torch.Tensor, device: torch.device, other: str) -> str | None:
    """Why the kernels cannot take these adapter factors (dtype, rank, device), or None; ``other`` names
    what ``device`` belongs to (for the message)."""
    if lora_A.dtype not in SUPPORTED_DTYPES:
        return f"adapter dtype {lora_A.dtype} (supported: fp32, fp16, bf16)"
    if lora_A.shape[0] > MAX_RANK:
        return f"rank {lora_A.shape[0]} > {MAX_RANK}"
    if lora_A.device != device:
        return f"adapter on {lora_A.device} but {other} on {device}"
    return None


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). Plain Python: ``triton.cdiv`` is a constexpr function whose wrapper
    costs 4.4 us a call on this CPU with triton 3.9 (0.1 us here), and the launches of one fused
    layer's forward + backward call it about 20 times."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Host-side smallest power of two >= n (1 for n <= 1), without triton's constexpr wrapper."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def rank_pad(r: int) -> int:
    """The rank block ``tl.dot`` works on: a power of two >= 16 (r is padded with zeros)."""
    return max(MIN_DOT, next_pow2(r))


def dot_precision(x_dtype: torch.dtype, other_dtype: torch.dtype = torch.float32) -> str:
    """Input precision of a dot of activations (``x_dtype``) with an operand of ``other_dtype``.

    - fp32 activations: "ieee" (as PyTorch without TF32).
    - fp16/bf16 activations with an fp32 operand (adapter factors, fp32 low-rank intermediates):
      "tf32_split", this package's scheme for :func:`dot_split_rhs` / :func:`dot_split_lhs`. The
      activations are exact in TF32; the fp32 operand is split into a TF32 head and tail, two TF32
      products: near-IEEE accuracy (PEFT computes this path in fp32). Plain TF32 left fp16 results
      about 1e-3 off float64 on the H100; Triton's "tf32x3" also splits the exact operand, and the
      extra tile made the rank-16 x_at / xt_s tiles spill (sm_90 compile check).
    - both operands fp16/bf16: "tf32" (unused by tl.dot for half operands, but a valid value).
    """
    if x_dtype in (torch.float32, torch.float64):
        return "ieee"
    return "tf32_split" if other_dtype == torch.float32 else "tf32"


def fp32_pair_precision(x_dtype: torch.dtype) -> str:
    """Input precision of a dot of two fp32 intermediates on a model of ``x_dtype`` activations:
    "ieee" for fp32 models, "tf32x3" (three TF32 products, near-IEEE) on half-precision bases."""
    return "ieee" if x_dtype in (torch.float32, torch.float64) else "tf32x3"


@triton.jit
def _tf32_head(v):
    """``v`` (fp32) rounded to TF32's 10 mantissa bits (to nearest, ties away from zero); ``v`` minus
    it is exact in fp32 and at most 2^-11 |v|."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def dot_split_rhs(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` for fp32 ``b``; with PREC "tf32_split" ``a`` must be exact in TF32 (fp16/bf16
    values): ``b = head + tail``, two TF32 products, error ~2^-22 relative instead of TF32's 2^-11."""
    if PREC == "tf32_split":
        head = _tf32_head(b)
        acc = tl.dot(a, head, acc, input_precision="tf32")
        acc = tl.dot(a, b - head, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def dot_split_lhs(a, b, acc, PREC: tl.constexpr):
    """:func:`dot_split_rhs` with the roles swapped: fp32 ``a`` is split, ``b`` must be exact in TF32."""
    if PREC == "tf32_split":
        head = _tf32_head(a)
        acc = tl.dot(head, b, acc, input_precision="tf32")
        acc = tl.dot(a - head, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """About two waves of programs on a GPU; a few on the interpreter (it runs them one by one)."""
    if device.type == "cuda":
        return 2 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' (multi-GPU models). No device
    switch (two driver calls) when it is the current one already, as in one process per GPU."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_GUARD


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
