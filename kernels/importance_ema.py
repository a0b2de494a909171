"""AdaLoRA importance scores for every adapter matrix of a model in a fixed number of launches.

For each element of every A, E, B (``docs/numeric_contract.md`` §2 item 4, PEFT's op order and
updated-mean semantics):
``I = |p * g|``, ``Ibar = b1 * Ibar + (1 - b1) * I``, ``U = b2 * U + (1 - b2) * |I - Ibar|``,
``s = Ibar * U``; then per layer and rank ``S_i = s_E[i] + (mean_j s_A[i, j] + mean_k s_B[k, i])``.

The matrices are reached through device tables (data pointers of the parameters and gradients,
built by the caller and cached while the pointers do not change); the EMAs live in two flat fp32
buffers owned by the caller. Launches per call, whatever the number of layers:

1. ``_nonfinite_kernel`` (optional): sets a device flag when any gradient or weight holds inf or NaN;
2. ``_importance_ema_kernel``: updates both EMAs in place (left bitwise unchanged when the flag is
   set) and writes per-(matrix, split) partial sums of ``s`` over each rank's elements;
3. ``_triplet_kernel``: finishes the means and writes the (M, r) triplet scores.

Matrix ``i`` of the tables is ``(kind, layer) = divmod(i, M)`` with kinds A, E, B; element (rank j,
position l) of a matrix is at ``j * stride_rank + l * stride_pos`` from its base (A: r x d_in, rank =
row; B: d_out x r, rank = column; E: r x 1), the same offset in the EMA buffers from its EMA base.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, device_guard, next_pow2, rank_pad

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # jit code reads only constexpr globals
_dtype = operator.attrgetter("dtype")
LAYOUT_COLUMNS = 4  # ema_offset, length, stride_rank, stride_pos


def _launch_options() -> dict:
    # PyTorch rounds b*x and (1-b)*y separately: no fused multiply-add, so EMAs match it bitwise.
    return {} if INTERPRET else {"enable_fp_fusion": False}


@triton.jit
def _nonfinite_kernel(g_table, p_table, numel_table, flag_ptr, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    mat = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.load(g_table + mat).to(tl.pointer_type(tl.float32))
    w = tl.load(p_table + mat).to(tl.pointer_type(tl.float32))
    n = tl.load(numel_table + mat)
    per = tl.cdiv(tl.cdiv(n, BLOCK), SPLITS) * BLOCK
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(split * per, tl.minimum(split * per + per, n), BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        # |w g| is what the EMAs take in: a non-finite weight spoils it as a non-finite gradient does.
        x = tl.abs(tl.load(g + offs, mask=offs < n, other=0.0)) + tl.abs(
            tl.load(w + offs, mask=offs < n, other=0.0)
        )
        bad = tl.maximum(bad, (~(x <= FLT_MAX)).to(tl.int32))  # NaN compares false
    tl.atomic_max(flag_ptr, tl.max(bad, axis=0))


@triton.jit
def _importance_ema_kernel(
    p_table, g_table, layout_ptr, ema_ipt_ptr, ema_unc_ptr, partial_ptr, flag_ptr,
    R, beta1, one_minus_beta1, beta2, one_minus_beta2,
    CHECK_FINITE: tl.constexpr, SPLITS: tl.constexpr, R_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    mat = tl.program_id(0)
    split = tl.program_id(1)
    p = tl.load(p_table + mat).to(tl.pointer_type(tl.float32))
    g = tl.load(g_table + mat).to(tl.pointer_type(tl.float32))
    ema_off = tl.load(layout_ptr + mat * 4)
    length = tl.load(layout_ptr + mat * 4 + 1)
    stride_rank = tl.load(layout_ptr + mat * 4 + 2)
    stride_pos = tl.load(layout_ptr + mat * 4 + 3)
    ema = ema_ipt_ptr + ema_off
    unc = ema_unc_ptr + ema_off
    skip = 0
    if CHECK_FINITE:
        skip = tl.load(flag_ptr)
    offs_r = tl.arange(0, R_PAD).to(tl.int64)
    r_mask = offs_r < R
    tiles = tl.cdiv(length, BLOCK_L)
    per = tl.cdiv(tiles, SPLITS)
    rowsum = tl.zeros((R_PAD,), dtype=tl.float32)
    for t in range(split * per, tl.minimum(split * per + per, tiles)):
        offs_l = t * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
        mask = r_mask[:, None] & (offs_l[None, :] < length)
        idx = offs_r[:, None] * stride_rank + offs_l[None, :] * stride_pos
        pv = tl.load(p + idx, mask=mask, other=0.0)
        gv = tl.load(g + idx, mask=mask, other=0.0)
        e_old = tl.load(ema + idx, mask=mask, other=0.0)
        u_old = tl.load(unc + idx, mask=mask, other=0.0)
        ipt = tl.abs(pv * gv)
        e_new = beta1 * e_old + one_minus_beta1 * ipt
        u_new = beta2 * u_old + one_minus_beta2 * tl.abs(ipt - e_new)
        e_new = tl.where(skip != 0, e_old, e_new)
        u_new = tl.where(skip != 0, u_old, u_new)
        tl.store(ema + idx, e_new, mask=mask)
        tl.store(unc + idx, u_new, mask=mask)
        rowsum += tl.sum(tl.where(mask, e_new * u_new, 0.0), axis=1)
    tl.store(partial_ptr + (mat * SPLITS + split) * R_PAD + offs_r, rowsum)


@triton.jit
def _rank_mean(partial_ptr, layout_ptr, mat, SPLITS: tl.constexpr, R_PAD: tl.constexpr):
    """Mean of ``s`` over each rank's elements of matrix ``mat``, from the split partial sums."""
    offs = (mat * SPLITS + tl.arange(0, SPLITS)[:, None]) * R_PAD + tl.arange(0, R_PAD)[None, :]
    length = tl.load(layout_ptr + mat * 4 + 1).to(tl.float32)
    return tl.sum(tl.load(partial_ptr + offs), axis=0) / length


@triton.jit
def _triplet_kernel(partial_ptr, layout_ptr, out_ptr, M, R, SPLITS: tl.constexpr, R_PAD: tl.constexpr):
    layer = tl.program_id(0)
    offs_r = tl.arange(0, R_PAD)
    mean_a = _rank_mean(partial_ptr, layout_ptr, layer, SPLITS, R_PAD)
    s_e = _rank_mean(partial_ptr, layout_ptr, M + layer, SPLITS, R_PAD)
    mean_b = _rank_mean(partial_ptr, layout_ptr, 2 * M + layer, SPLITS, R_PAD)
    # PEFT's order: s_E + (mean_A + mean_B)
    tl.store(out_ptr + layer * R + offs_r, s_e + (mean_a + mean_b), mask=offs_r < R)


def unsupported_reason(params: Sequence[torch.Tensor]) -> str | None:
    """Why the score kernels cannot take these adapter factors (the torch scorer runs), or None."""
    dtypes = set(map(_dtype, params))
    if dtypes != {torch.float32}:
        return f"adapter dtypes {sorted(map(str, dtypes))} (the score kernels take float32 adapters)"
    return None


def _check_tables(p_table: torch.Tensor, g_table: torch.Tensor, layout: torch.Tensor, M: int) -> None:
    for name, t in (("p_table", p_table), ("g_table", g_table)):
        if t.dtype != torch.int64 or t.shape != (3 * M,):
            raise ValueError(f"importance_ema: {name} must be int64 ({3 * M},), got {t.dtype}{list(t.shape)}")
    if layout.dtype != torch.int64 or layout.shape != (3 * M, LAYOUT_COLUMNS):
        raise ValueError(
            f"importance_ema: layout must be int64 ({3 * M}, {LAYOUT_COLUMNS}), got {list(layout.shape)}"
        )


def importance_scores_(
    p_table: torch.Tensor,
    g_table: torch.Tensor,
    layout: torch.Tensor,
    ema_ipt: torch.Tensor,
    ema_unc: torch.Tensor,
    r: int,
    beta1: float,
    beta2: float,
    *,
    numel_table: torch.Tensor | None = None,
    nonfinite_flag: torch.Tensor | None = None,
    splits: int = 4,
    update: bool = True,
) -> torch.Tensor:
    """Update the EMAs of all ``3 * M`` fp32 matrices in place; return the (M, r) triplet scores.

    With ``nonfinite_flag`` (an int32 device scalar set to 0 by the caller) and ``numel_table``, a
    first launch sets the flag if any gradient or weight is not finite and the EMA update is then skipped
    (the scores are those of the unchanged EMAs). ``update=False`` only computes the scores of the
    current EMAs (gradients are not read; ``g_table`` may be ``p_table``).
    """
    M = p_table.shape[0] // 3
    _check_tables(p_table, g_table, layout, M)
    if ema_ipt.dtype != torch.float32 or ema_unc.dtype != torch.float32:
        raise ValueError("importance_ema: EMA buffers must be float32")
    splits = next_pow2(max(1, splits))
    r_pad = rank_pad(r)
    partial = torch.empty(3 * M, splits, r_pad, device=ema_ipt.device, dtype=torch.float32)
    out = torch.empty(M, r, device=ema_ipt.device, dtype=torch.float32)
    if not update:  # a set flag makes the EMA kernel leave the buffers as they are
        nonfinite_flag, numel_table = torch.ones((), dtype=torch.int32, device=ema_ipt.device), None
    check = nonfinite_flag is not None
    if check and update and (numel_table is None or nonfinite_flag.dtype != torch.int32):
        raise ValueError("importance_ema: the non-finite check needs numel_table and an int32 flag")
    with device_guard(ema_ipt):
        _launch(p_table, g_table, layout, ema_ipt, ema_unc, partial, out, numel_table, nonfinite_flag,
                r, beta1, beta2, M, splits, r_pad, check and update)  # fmt: skip
    return out


def _launch(p_table, g_table, layout, ema_ipt, ema_unc, partial, out, numel_table, flag,
            r, beta1, beta2, M, splits, r_pad, check_grads) -> None:  # fmt: skip
    check = flag is not None
    if check_grads:  # the gradients and the weights: either makes I = |w g| non-finite
        _nonfinite_kernel[(3 * M, splits)](g_table, p_table, numel_table, flag, SPLITS=splits, BLOCK=1024)
    block_l = max(16, min(256, 4096 // r_pad))
    _importance_ema_kernel[(3 * M, splits)](
        p_table, g_table, layout, ema_ipt, ema_unc, partial, flag if check else partial,
        r, beta1, 1 - beta1, beta2, 1 - beta2,
        CHECK_FINITE=check, SPLITS=splits, R_PAD=r_pad, BLOCK_L=block_l, **_launch_options(),
    )  # fmt: skip
    _triplet_kernel[(M,)](partial, layout, out, M, r, SPLITS=splits, R_PAD=r_pad)


def layout_table(params: list[torch.Tensor], r: int) -> torch.Tensor:
    """The (3M, 4) layout rows for matrices ordered [A_0..A_M-1, E_0.., B_0..], EMAs packed densely.

    Parameters must be contiguous: A (r, d_in), E (r, 1), B (d_out, r). Built on the host (CPU tensor).
    """
    M = len(params) // 3
    rows, offset = [], 0
    for i, t in enumerate(params):
        kind = i // M
        expected = {0: (r, t.shape[-1]), 1: (r, 1), 2: (t.shape[0], r)}[kind]
        if tuple(t.shape) != expected or not t.is_contiguous():
            raise ValueError(
                f"importance_ema: matrix {i} has shape {tuple(t.shape)}, expected contiguous {expected}"
            )
        if kind == 0:
            rows.append([offset, t.shape[1], t.shape[1], 1])  # A: rank = row
        elif kind == 1:
            rows.append([offset, 1, 1, 0])  # E: one element per rank
        else:
            rows.append([offset, t.shape[0], 1, r])  # B: rank = column
        offset += t.numel()
    return torch.tensor(rows, dtype=torch.int64)


def pointer_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 data pointers (host tensor; the caller moves it to the device once and caches it)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
