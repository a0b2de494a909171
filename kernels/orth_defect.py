"""Orthogonality defects of every adapter factor: ``R = mean_i ||X_i X_i^T - I||_F`` in 2 + 1 launches.

The AdaLoRA regulariser (``docs/numeric_contract.md`` §2 item 8) over all ``A`` (r x d_in, Gram of the
rows ``A A^T``) and ``B`` (d_out x r, Gram of the columns ``B^T B``) of a model. Both are handled as one
kind of matrix: ``X`` (r x L) seen through strides, ``X = A`` or ``X = B^T``, with ``D = X X^T - I`` (r
x r). ``||.||_F`` is the Frobenius norm, not squared; a rank-0 factor contributes ``||0|| = 0`` and
counts in the mean; r may exceed L (then X X^T cannot be the identity).

Launches per call, whatever the number of layers:

- forward: ``_gram_defect_kernel``, one program per matrix, loops over L in tiles accumulating the
  (r x r) Gram in fp32 with ``tl.dot``, subtracts I, writes ``||D||_F`` and the unit defect
  ``D / ||D||_F`` (0 where ``||D|| = 0``: PyTorch's norm backward gives a zero gradient there, not
  NaN), r x r fp32 per matrix, saved for the backward; then ``_mean_kernel`` (one program) sums the
  norms in a fixed order and divides by the count (deterministic, no atomics);
- backward: ``_defect_grad_kernel``, one program per (matrix, tile of L, block of <= 64 ranks):
  ``dX = (2 g / n) (D / ||D||) X``, i.e. ``dA = 2c D A``, ``dB = 2c B D`` (D is symmetric), written
  into ONE flat gradient buffer per call; the autograd backward hands out per-matrix views of it.

The parameters stay ordinary tensors: the kernels reach them through a device table of data
pointers, shapes and strides (Triton's grouped-GEMM approach). Building that table needs a
host-to-device copy, so it is cached, keyed by every matrix's (data_ptr, shape, stride, dtype,
device): each call checks the key on the host and rebuilds only when a parameter's storage, shape,
dtype or device changed (e.g. after loading a checkpoint or moving the model). The gradient side
needs no pointers: its table holds offsets into the flat buffer, which are the same on every call.
The cache is derived data (an LRU of a few tables), not state the results depend on. A CUDA graph
that captured a call keeps using the table of that call: do not let more than ``TABLE_CACHE_SIZE``
other parameter sets evict it.

All matrices must share one dtype (fp32, fp16 or bf16) and device, with r <= ``MAX_RANK``. The value
comes back in that dtype (computed in fp32), the gradients too; fp32 dots are IEEE. In Triton's
interpreter bf16 factors are upcast before the dot (its bf16 dot is wrong) and its fp32 -> bf16
stores truncate, so bf16 results there may differ from a GPU's by one bf16 ulp. A parameter whose
``.grad`` is stolen from this backward (nothing else adds to it) holds a view of the flat buffer,
which lives until the last such view is dropped. Registered as ``torch.library`` custom ops with fake
implementations and autograd, so ``torch.compile`` sees no graph break.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, device_guard, dot_precision, rank_pad, table_to_device
from .constants import MAX_RANK, SUPPORTED_DTYPES

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
TABLE_COLUMNS = 8  # data_ptr, r, L, stride_r, stride_l, grad_offset, grad_stride_r, grad_stride_l
TABLE_CACHE_SIZE = 8
MEAN_BLOCK = 256

# Triton launches by kernel name (host-side counter, for launch-count tests and benchmarks) and
# table builds (each one is a host-to-device copy).
LAUNCHES: Counter[str] = Counter()
TABLE_BUILDS: Counter[str] = Counter()


# ---- kernels ------------------------------------------------------------------------------------
@triton.jit
def _gram_defect_kernel(
    table_ptr, unit_ptr, norm_ptr, R_MAX,
    DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, COLS: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0).to(tl.int64)
    row = table_ptr + m * COLS
    x_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    r = tl.load(row + 1)
    length = tl.load(row + 2)
    stride_r = tl.load(row + 3)
    stride_l = tl.load(row + 4)
    offs_r = tl.arange(0, R_PAD).to(tl.int64)
    r_mask = offs_r < r
    length = tl.where(r > 0, length, 0)  # a rank-0 factor reads nothing
    acc = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    for l0 in range(0, length, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        x = tl.load(
            x_ptr + offs_r[:, None] * stride_r + offs_l[None, :] * stride_l,
            mask=r_mask[:, None] & (offs_l[None, :] < length),
            other=0.0,
        )
        if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            x = x.to(tl.float32)
        acc = tl.dot(x, tl.trans(x), acc, input_precision=PREC)
    eye = (offs_r[:, None] == offs_r[None, :]) & r_mask[:, None]
    defect = acc - tl.where(eye, 1.0, 0.0)
    norm = tl.sqrt(tl.sum(tl.sum(defect * defect, axis=1), axis=0))
    inv = tl.where(norm > 0.0, 1.0 / tl.where(norm > 0.0, norm, 1.0), 0.0)
    tl.store(norm_ptr + m, norm)
    out = unit_ptr + m * R_MAX * R_MAX + offs_r[:, None] * R_MAX + offs_r[None, :]
    tl.store(out, defect * inv, mask=(offs_r[:, None] < R_MAX) & (offs_r[None, :] < R_MAX))


@triton.jit
def _mean_kernel(norm_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(norm_ptr + offs, mask=offs < n, other=0.0)
    total = tl.sum(acc, axis=0) / n
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


@triton.jit
def _defect_grad_kernel(
    table_ptr, work_ptr, unit_ptr, g_ptr, out_ptr, R_MAX, coef,
    DTYPE: tl.constexpr, COLS: tl.constexpr, R_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    w = tl.program_id(0).to(tl.int64)
    r0 = tl.program_id(1).to(tl.int64) * BLOCK_R  # first output row (rank) of this program
    m = tl.load(work_ptr + 2 * w)
    row = table_ptr + m * COLS
    r = tl.load(row + 1)
    if r0 < r:
        l0 = tl.load(work_ptr + 2 * w + 1)
        x_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
        length = tl.load(row + 2)
        stride_r = tl.load(row + 3)
        stride_l = tl.load(row + 4)
        out_off = tl.load(row + 5)
        out_stride_r = tl.load(row + 6)
        out_stride_l = tl.load(row + 7)
        offs_r = tl.arange(0, R_PAD).to(tl.int64)
        offs_o = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        offs_l = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        l_mask = offs_l[None, :] < length
        x = tl.load(
            x_ptr + offs_r[:, None] * stride_r + offs_l[None, :] * stride_l,
            mask=(offs_r[:, None] < r) & l_mask,
            other=0.0,
        )
        unit = tl.load(
            unit_ptr + m * R_MAX * R_MAX + offs_o[:, None] * R_MAX + offs_r[None, :],
            mask=(offs_o[:, None] < r) & (offs_r[None, :] < r),
            other=0.0,
        )
        scale = tl.load(g_ptr).to(tl.float32) * coef
        grad = tl.dot(unit, x.to(tl.float32), input_precision="ieee") * scale
        out = out_ptr + out_off + offs_o[:, None] * out_stride_r + offs_l[None, :] * out_stride_l
        tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=(offs_o[:, None] < r) & l_mask)


# ---- host side: checks, tables, launches --------------------------------------------------------
class UnsupportedInputs(ValueError):
    """Valid factors the kernels do not handle (dtype, mixed dtypes or devices, rank): use PyTorch."""


_dtype = attrgetter("dtype")
_device = attrgetter("device")
_size = torch.Tensor.size


def unsupported_reason(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> str | None:
    """Why the kernels cannot take these (well-formed) factors, or None. Looks at metadata only, with
    C-level maps (it runs on every call, over one tensor per layer); the per-tensor loop only runs to
    name the offender (and under torch.compile, which does not trace ``attrgetter``)."""
    first = lora_As[0]
    if first.dtype not in SUPPORTED_DTYPES:
        return f"dtype {first.dtype} (supported: fp32, fp16, bf16)"
    mats = (*lora_As, *lora_Bs)
    ranks = chain(map(_size, lora_As, repeat(0)), map(_size, lora_Bs, repeat(1)))
    if (
        not torch.compiler.is_compiling()
        and set(map(_dtype, mats)) == {first.dtype}
        and set(map(_device, mats)) == {first.device}
        and max(ranks) <= MAX_RANK
    ):
        return None
    for kind, group, rank_dim in (("lora_A", lora_As, 0), ("lora_B", lora_Bs, 1)):
        for i, t in enumerate(group):
            if t.dtype != first.dtype:
                return f"{kind}[{i}] is {t.dtype} but lora_A[0] is {first.dtype} (one dtype for all)"
            if t.device != first.device:
                return f"{kind}[{i}] is on {t.device} but lora_A[0] on {first.device}"
            if t.shape[rank_dim] > MAX_RANK:
                return f"{kind}[{i}] has rank {t.shape[rank_dim]} > {MAX_RANK}"
    return None


def check_inputs(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> None:
    """Host-side checks with errors that name the offending tensor.

    Malformed inputs raise ``ValueError``; inputs the kernels do not support raise
    :class:`UnsupportedInputs` (a ``ValueError``), on which callers may fall back to PyTorch.
    """
    if len(lora_As) == 0:
        raise ValueError("orth_defect: needs at least one adapted layer")
    if len(lora_As) != len(lora_Bs):
        raise ValueError(f"orth_defect: {len(lora_As)} lora_A but {len(lora_Bs)} lora_B")
    for kind, mats in (("lora_A", lora_As), ("lora_B", lora_Bs)):
        for i, t in enumerate(mats):
            if t.dim() != 2:
                raise ValueError(f"orth_defect: {kind}[{i}] must be 2-D, got shape {tuple(t.shape)}")
    reason = unsupported_reason(lora_As, lora_Bs)
    if reason is not None:
        raise UnsupportedInputs(f"orth_defect: {reason}")


def _r_max(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> int:
    return max(chain((a.shape[0] for a in lora_As), (b.shape[1] for b in lora_Bs)))


def _block_l(r_pad: int, backward: bool) -> int:
    """Tile of the long dimension: the interpreter wants few big tiles, a GPU a bounded register tile.

    The fp32 dots are IEEE (FMA units): the backward's (BLOCK_R x BLOCK_L) product stays at <= 4K
    elements, the forward's (r_pad x BLOCK_L) tile at <= 4K next to its (r_pad x r_pad) Gram. These
    compile for sm_90 without spills (checked with ptxas: at most 250 registers, no stack).
    """
    if INTERPRET:
        return 128
    if backward:  # r_pad 64 at 64 columns spilled 88 bytes with triton 3.6 (H100 run, 2026-11-28)
        return {16: 256, 32: 128, 64: 32, 128: 16}[r_pad]
    return {16: 128, 32: 128, 64: 64, 128: 32}[r_pad]


def _block_r(r_pad: int) -> int:
    """Output rows per backward program: at most 64 (a 128 x 128 fp32 dot operand spills on sm_90)."""
    return min(r_pad, 64)


def _num_warps(r_pad: int) -> int:
    return 4 if r_pad <= 32 else 8


@dataclass(frozen=True)
class Tables:
    """The cached device tables of one parameter set and what the launches need to know about it."""

    table: torch.Tensor  # (n, TABLE_COLUMNS) int64
    work: torch.Tensor  # (n_work, 2) int64: (matrix, first column of its tile), backward programs
    n: int
    r_max: int
    r_pad: int
    numel: int  # elements of all gradients together (the flat buffer)


_TABLES: OrderedDict[tuple, Tables] = OrderedDict()


def _key(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> tuple:
    # Per-tensor devices are implied by the data pointers (distinct address ranges); a table is
    # only built after check_inputs saw one device for all.
    per_tensor = tuple([(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in chain(lora_As, lora_Bs)])
    return len(lora_As), lora_As[0].device, per_tensor


def _to_device(rows: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    return table_to_device(torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width), device)


def _build_tables(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> Tables:
    r_max = _r_max(lora_As, lora_Bs)
    r_pad = rank_pad(r_max)
    block_l = _block_l(r_pad, backward=True)
    rows, work, offset = [], [], 0
    for i, t in enumerate(chain(lora_As, lora_Bs)):
        is_a = i < len(lora_As)
        r, length = (t.shape[0], t.shape[1]) if is_a else (t.shape[1], t.shape[0])
        s_r, s_l = (t.stride(0), t.stride(1)) if is_a else (t.stride(1), t.stride(0))
        # the gradient is written contiguous in the parameter's own shape
        g_r, g_l = (length, 1) if is_a else (1, r)
        rows.append([t.data_ptr(), r, length, s_r, s_l, offset, g_r, g_l])
        if r > 0:
            work.extend([i, l0] for l0 in range(0, length, block_l))
        offset += t.numel()
    device = lora_As[0].device
    TABLE_BUILDS["orth_defect"] += 1
    return Tables(
        table=_to_device(rows, TABLE_COLUMNS, device),
        work=_to_device(work, 2, device),
        n=len(rows),
        r_max=r_max,
        r_pad=r_pad,
        numel=offset,
    )


def tables(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> Tables:
    """The device tables of these matrices: cached, rebuilt only when the key (see module doc) changes."""
    if len(lora_As) == 0:
        check_inputs(lora_As, lora_Bs)  # raises
    key = _key(lora_As, lora_Bs)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    check_inputs(lora_As, lora_Bs)
    built = _build_tables(lora_As, lora_Bs)
    _TABLES[key] = built
    while len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return built


def clear_table_cache() -> None:
    _TABLES.clear()


# ---- custom ops ---------------------------------------------------------------------------------
def _forward_impl(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    tab = tables(lora_As, lora_Bs)
    device, dtype = lora_As[0].device, lora_As[0].dtype
    value = torch.empty((), device=device, dtype=dtype)
    norms = torch.empty(tab.n, device=device, dtype=torch.float32)
    unit = torch.empty(tab.n, tab.r_max, tab.r_max, device=device, dtype=torch.float32)
    upcast = INTERPRET and dtype == torch.bfloat16
    prec = dot_precision(torch.float32 if upcast else dtype, dtype)  # both operands are the factors
    with device_guard(lora_As[0]):
        _gram_defect_kernel[(tab.n,)](
            tab.table, unit, norms, tab.r_max,
            DTYPE=_TL_DTYPES[dtype], UPCAST=upcast, PREC=prec,
            COLS=TABLE_COLUMNS, R_PAD=tab.r_pad, BLOCK_L=_block_l(tab.r_pad, backward=False),
            num_warps=_num_warps(tab.r_pad), num_stages=3,
        )  # fmt: skip
        LAUNCHES["_gram_defect_kernel"] += 1
        _mean_kernel[(1,)](norms, value, tab.n, BLOCK=MEAN_BLOCK, num_warps=4)
        LAUNCHES["_mean_kernel"] += 1
    return value, unit


def _backward_impl(
    grad: torch.Tensor, lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor], unit: torch.Tensor
) -> torch.Tensor:
    tab = tables(lora_As, lora_Bs)
    device, dtype = lora_As[0].device, lora_As[0].dtype
    flat = torch.empty(tab.numel, device=device, dtype=dtype)
    if tab.work.shape[0] > 0:
        with device_guard(lora_As[0]):
            block_r = _block_r(tab.r_pad)
            _defect_grad_kernel[(tab.work.shape[0], tab.r_pad // block_r)](
                tab.table, tab.work, unit, grad, flat, tab.r_max, 2.0 / tab.n,
                DTYPE=_TL_DTYPES[dtype], COLS=TABLE_COLUMNS, R_PAD=tab.r_pad, BLOCK_R=block_r,
                BLOCK_L=_block_l(tab.r_pad, backward=True), num_warps=_num_warps(tab.r_pad), num_stages=2,
            )  # fmt: skip
        LAUNCHES["_defect_grad_kernel"] += 1
    return flat


@torch.library.custom_op("adalora_fast::orth_defect_fwd", mutates_args=())
def orth_defect_fwd(
    lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, unit defects): the regulariser (0-d, the factors' dtype) and ``D_i / ||D_i||_F`` (n, r, r) fp32."""
    return _forward_impl(lora_As, lora_Bs)


@orth_defect_fwd.register_fake
def _(lora_As, lora_Bs):
    n, r_max = len(lora_As) + len(lora_Bs), _r_max(lora_As, lora_Bs)
    first = lora_As[0]
    return first.new_empty(()), first.new_empty(n, r_max, r_max, dtype=torch.float32)


@torch.library.custom_op("adalora_fast::orth_defect_bwd", mutates_args=())
def orth_defect_bwd(
    grad: torch.Tensor, lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], unit: torch.Tensor
) -> torch.Tensor:
    """Every factor's gradient, flat and contiguous in the order ``lora_As + lora_Bs`` (one buffer)."""
    return _backward_impl(grad, lora_As, lora_Bs, unit)


@orth_defect_bwd.register_fake
def _(grad, lora_As, lora_Bs, unit):
    numel = sum(t.numel() for t in chain(lora_As, lora_Bs))
    return lora_As[0].new_empty(numel)


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like`` (contiguous, back to back): no copies."""
    if type(flat) is torch.Tensor and not torch.compiler.is_compiling():  # eager: one C++ call
        return list(torch._utils._unflatten_dense_tensors(flat, list(like)))
    # traced (fake / functional tensors, possibly symbolic sizes): plain views
    views, offset = [], 0
    for t in like:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


def _setup_context(ctx, inputs, output) -> None:
    lora_As, lora_Bs = inputs
    ctx.n_a = len(lora_As)
    ctx.set_materialize_grads(False)  # the unit defects are not differentiable outputs: no zeros
    ctx.save_for_backward(*lora_As, *lora_Bs, output[1])


def _backward(ctx, grad: torch.Tensor, _grad_unit: torch.Tensor | None):
    if grad is None:
        return None, None
    *mats, unit = ctx.saved_tensors
    lora_As, lora_Bs = mats[: ctx.n_a], mats[ctx.n_a :]
    flat = orth_defect_bwd(grad, lora_As, lora_Bs, unit)
    views = unflatten(flat, mats)
    need_A, need_B = ctx.needs_input_grad
    dA = views[: ctx.n_a] if need_A else None
    dB = views[ctx.n_a :] if need_B else None
    return dA, dB


orth_defect_fwd.register_autograd(_backward, setup_context=_setup_context)


class _OrthDefect(torch.autograd.Function):
    """The eager path: the same kernels and gradients as the custom ops, without the custom-op
    dispatcher's per-tensor Python work on two lists of one tensor per layer (pytree flattening,
    schema checks: about a fifth of the host time of a call at 224 layers, measured on the CPU)."""

    @staticmethod
    def forward(ctx, n_a: int, *mats: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        value, unit = _forward_impl(mats[:n_a], mats[n_a:])
        ctx.n_a = n_a
        ctx.save_for_backward(*mats, unit)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        *mats, unit = ctx.saved_tensors
        flat = _backward_impl(grad, mats[: ctx.n_a], mats[ctx.n_a :], unit)
        views = unflatten(flat, mats)
        return (None, *(v if need else None for v, need in zip(views, ctx.needs_input_grad[1:], strict=True)))


# ---- public entry point -------------------------------------------------------------------------
def orth_regularization(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``R = (sum_i ||A_i A_i^T - I||_F + sum_i ||B_i^T B_i - I||_F) / (n_A + n_B)``, differentiable.

    The checks run when the tables are (re)built, i.e. whenever a parameter's storage, shape, dtype
    or device changes; here only what the cache key does not cover.
    """
    if len(lora_As) == 0 or len(lora_As) != len(lora_Bs):
        check_inputs(lora_As, lora_Bs)  # raises the clear error
    if torch.compiler.is_compiling():  # traced: the custom ops (fake implementations, no graph break)
        return orth_defect_fwd(list(lora_As), list(lora_Bs))[0]
    return _OrthDefect.apply(len(lora_As), *lora_As, *lora_Bs)
