"""The fused SVD linear layer as PyTorch custom ops: forward, backward and inference.

``y = x W^T + b + s * ((drop(x) Q^T) * lambda^T) P^T`` with ``s = lora_alpha / (ranknum + 1e-5)``
(PEFT: Q = lora_A, lambda = lora_E, P = lora_B). Kernels, per call:

- training forward: ``x_at`` (S = drop(x) Q^T, kept for the backward: M x r fp32) then
  ``xw_plus_sb`` (base GEMM with the low-rank term in its accumulator);
- backward: ``x_at`` (G = dy P), ``xw_plus_sb`` (dx = dy W + drop(G diag(s lambda) Q)), ``xt_s``
  twice (dQ from x, dP from dy; each stores its result in the factor's dtype and layout when its rows
  fit one split) and one small reduction for d(lambda), which ``ADALORA_FAST_FOLD_DLAMBDA=1`` folds
  into the dQ kernel (opt-in until a GPU run shows it faster). W is frozen (no dW);
- inference (no autograd graph needed, no dropout): ``xw_plus_sb`` alone, S computed in the GEMM.

Dropout is Philox in the kernels, seeded from a device tensor drawn from PyTorch's generator (so
``torch.manual_seed`` reproduces it), regenerated in the backward; nothing of x's size is stored.
The ops are registered with ``torch.library`` (custom op + fake + autograd), so ``torch.compile``
sees them without graph breaks and CUDA graphs can capture them.
"""

from __future__ import annotations

import torch

from . import xt_s as xt_s_module
from . import xw_plus_sb_tma
from ._common import adapter_reason, check_seed, device_guard
from .constants import MAX_RANK, RANKNUM_EPS, SUPPORTED_DTYPES
from .x_at import launch_x_at
from .xt_s import launch_xt_s
from .xw_plus_sb import launch_xw_plus_sb

SEED_HIGH = 2**62


def _w_kn(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The frozen weight as a (d_in, d_out) view: nn.Linear stores (d_out, d_in), Conv1D (d_in, d_out)."""
    return weight if fan_in_fan_out else weight.t()


def _d_out(weight: torch.Tensor, fan_in_fan_out: bool) -> int:
    return weight.shape[1] if fan_in_fan_out else weight.shape[0]


# ---- forward ------------------------------------------------------------------------------------
@torch.library.custom_op("adalora_fast::svd_linear_fwd", mutates_args=())
def svd_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    ranknum: torch.Tensor,
    seed: torch.Tensor,
    dropout_p: float,
    scaling: float,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S): the layer output for 2-D x and the saved shrink ``S = drop(x) Q^T`` (fp32)."""
    return _forward_impl(
        x, weight, bias, lora_A, lora_E, lora_B, ranknum, seed, dropout_p, scaling, fan_in_fan_out
    )


def _gemm(x, w_kn, bias, s, b_rn, lora_E, ranknum, scaling, seed, dropout_p) -> torch.Tensor:
    """``x W + b + drop(S diag(lambda*s) B)``: the persistent TMA GEMM where it is switched on
    (``ADALORA_FAST_TMA_GEMM=1``) and can run, else ``xw_plus_sb``."""
    if xw_plus_sb_tma.TMA_GEMM and xw_plus_sb_tma.tma_reason(x, w_kn, s) is None:
        return xw_plus_sb_tma.launch_xw_plus_sb_tma(
            x, w_kn, bias, s, b_rn, lora_E, ranknum, scaling, seed, dropout_p
        )
    return launch_xw_plus_sb(x, w_kn, bias, s, b_rn, lora_E, ranknum, scaling, None, seed, dropout_p)


def _forward_impl(x, weight, bias, lora_A, lora_E, lora_B, ranknum, seed, dropout_p, scaling, fan_in_fan_out):
    with device_guard(x):
        s = launch_x_at(x, lora_A, seed, dropout_p)
        y = _gemm(x, _w_kn(weight, fan_in_fan_out), bias, s, lora_B.t(), lora_E, ranknum, scaling, None, 0.0)
    return y, s


@svd_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_E, lora_B, ranknum, seed, dropout_p, scaling, fan_in_fan_out):
    M = x.shape[0]
    y = x.new_empty(M, _d_out(weight, fan_in_fan_out))
    return y, x.new_empty(M, lora_A.shape[0], dtype=torch.float32)


@torch.library.custom_op("adalora_fast::svd_linear_infer", mutates_args=())
def svd_linear_infer(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """Forward only, one kernel, nothing saved (no dropout: inference)."""
    return _infer_impl(x, weight, bias, lora_A, lora_E, lora_B, ranknum, scaling, fan_in_fan_out)


def _infer_impl(x, weight, bias, lora_A, lora_E, lora_B, ranknum, scaling, fan_in_fan_out):
    with device_guard(x):
        w_kn = _w_kn(weight, fan_in_fan_out)
        return launch_xw_plus_sb(x, w_kn, bias, None, lora_B.t(), lora_E, ranknum, scaling, lora_A, None, 0.0)


@svd_linear_infer.register_fake
def _(x, weight, bias, lora_A, lora_E, lora_B, ranknum, scaling, fan_in_fan_out):
    return x.new_empty(x.shape[0], _d_out(weight, fan_in_fan_out))


# ---- backward -----------------------------------------------------------------------------------
@torch.library.custom_op("adalora_fast::svd_linear_bwd", mutates_args=())
def svd_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    ranknum: torch.Tensor,
    s: torch.Tensor,
    seed: torch.Tensor,
    dropout_p: float,
    scaling: float,
    fan_in_fan_out: bool,
    need_x: bool,
    need_A: bool,
    need_E: bool,
    need_B: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dE, dB); gradients that are not needed come back as empty tensors."""
    return _op_backward(
        dy, x, weight, lora_A, lora_E, lora_B, ranknum, s, seed, dropout_p, scaling, fan_in_fan_out,
        need_x, need_A, need_E, need_B,
    )  # fmt: skip


def _backward_impl(
    dy, x, weight, lora_A, lora_E, lora_B, ranknum, s, seed, dropout_p, scaling, fan_in_fan_out,
    need_x, need_A, need_E, need_B,
):  # fmt: skip
    """(dx, dA, dE, dB), None where not needed. The factor gradients come out of their kernels in the
    factors' dtype and layout (dB through transposed strides)."""
    if dy.dtype != weight.dtype:
        dy = dy.to(weight.dtype)
    g = launch_x_at(dy, lora_B.t(), None, 0.0) if (need_x or need_A or need_E) else None  # G = dy P
    dx = dA = dE = dB = None
    if need_x:
        w_nk = _w_kn(weight, fan_in_fan_out).t()
        dx = _gemm(dy, w_nk, None, g, lora_A, lora_E, ranknum, scaling, seed, dropout_p)
    fold = need_A and need_E and xt_s_module.FOLD_DLAMBDA
    if need_A:
        dA, dE = launch_xt_s(
            x, g, lora_E, ranknum, scaling, seed, dropout_p, lora_A.dtype, False, s_fwd=s if fold else None
        )
    if need_B:
        dB = launch_xt_s(dy, s, lora_E, ranknum, scaling, None, 0.0, lora_B.dtype, True)[0]
    if need_E and not fold:
        scale = scaling / (ranknum.float() + RANKNUM_EPS)
        dE = ((g * s).sum(0) * scale).unsqueeze(1).to(lora_E.dtype)
    return dx, dA, dE, dB


def _op_backward(*args):
    """The custom op's body: its outputs must be tensors (empty where not needed) and not alias."""
    grads = _backward_guarded(*args)
    x = args[1]
    return tuple(x.new_empty(0) if t is None else t for t in grads)


@svd_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_E, lora_B, ranknum, s, seed, dropout_p, scaling, fan_in_fan_out, *needs):
    need_x, need_A, need_E, need_B = needs
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        torch.empty_like(lora_A) if need_A else x.new_empty(0),
        torch.empty_like(lora_E) if need_E else x.new_empty(0),
        torch.empty_like(lora_B) if need_B else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_E, lora_B, ranknum, seed, dropout_p, scaling, fan_in_fan_out = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_E, lora_B, ranknum, output[1], seed)
    ctx.mark_non_differentiable(output[1])  # S is saved for the backward, not a result
    ctx.dropout_p, ctx.scaling, ctx.fan_in_fan_out = dropout_p, scaling, fan_in_fan_out
    ctx.has_bias = bias is not None


def _backward(ctx, dy: torch.Tensor, _ds: torch.Tensor | None):
    return _input_grads(ctx, dy, svd_linear_bwd)


def _backward_guarded(dy, x, weight, *rest):
    # A backward run inside an autocast region (the CPU runs it on the caller's thread) must not
    # re-cast the glue ops: the forward's casts were already made.
    if torch.is_autocast_enabled(x.device.type):
        with device_guard(x), torch.autocast(x.device.type, enabled=False):
            return _backward_impl(dy, x, weight, *rest)
    with device_guard(x):
        return _backward_impl(dy, x, weight, *rest)


def _input_grads(ctx, dy: torch.Tensor, backward_fn) -> tuple:
    """The gradients of the forward's 11 inputs from ``backward_fn`` (the custom op or its body)."""
    x, weight, lora_A, lora_E, lora_B, ranknum, s, seed = ctx.saved_tensors
    need_x, _, need_bias, need_A, need_E, need_B = ctx.needs_input_grad[:6]
    dx, dA, dE, dB = backward_fn(
        dy, x, weight, lora_A, lora_E, lora_B, ranknum, s, seed,
        ctx.dropout_p, ctx.scaling, ctx.fan_in_fan_out, need_x, need_A, need_E, need_B,
    )  # fmt: skip
    dbias = dy.sum(0) if (ctx.has_bias and need_bias) else None
    return (
        dx if need_x else None,
        None,
        dbias,
        dA if need_A else None,
        dE if need_E else None,
        dB if need_B else None,
        None, None, None, None, None,
    )  # fmt: skip


svd_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- autocast -----------------------------------------------------------------------------------
_AUTOCAST_LIB = torch.library.Library("adalora_fast", "FRAGMENT")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _register_autocast(op, n_cast: int) -> None:
    """``nn.Linear``'s autocast rule for a custom op called under ``torch.autocast``: its first
    ``n_cast`` inputs (x, W, b) cast to the autocast dtype of the moment, the adapters left as they
    are (``torch.library.register_autocast`` would cast every floating input to one fixed dtype)."""
    for device_type, key in _AUTOCAST_KEYS.items():

        def kernel(_keyset, *args, _device_type=device_type):
            cast = autocast_inputs(torch.get_autocast_dtype(_device_type), *args[:n_cast])
            with torch.autocast(_device_type, enabled=False):
                return op(*cast, *args[n_cast:])

        _AUTOCAST_LIB.impl(op._name, kernel, key, with_keyset=True)


_register_autocast(svd_linear_fwd, 3)
_register_autocast(svd_linear_infer, 3)


class _SVDLinearFn(torch.autograd.Function):
    """The eager path: the custom ops' kernels and gradients without the custom-op dispatcher
    (default filling, redispatch, dynamo-disable wrappers), which cost more host time per call than
    our own launch code (profiled on the CPU with the kernels stubbed). ``torch.compile`` traces the
    custom ops instead (see :func:`svd_linear`). Inputs as ``svd_linear_fwd``'s."""

    @staticmethod
    def forward(ctx, *inputs):  # type: ignore[override]
        y, s = _forward_impl(*inputs)
        _setup_context(ctx, inputs, (y, s))
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        return _input_grads(ctx, dy, _backward_guarded)


# ---- public entry points ------------------------------------------------------------------------
def unsupported_reason(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
) -> str | None:
    """Why the fused op cannot run this (well-formed) call, or None: the cases where the PyTorch path
    must run instead (a trainable or non-float base weight, mixed dtypes or devices, rank). Under
    ``torch.autocast`` the dtypes are those after :func:`autocast_inputs`' casts."""
    if weight.requires_grad:
        return "the base weight requires grad (the fused op computes no weight gradient)"
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) and weight.is_floating_point():
        return (
            f"the base weight is a {type(weight).__name__} (a tensor subclass): the fused op reads plain "
            "tensors; the base layer's own forward runs it"
        )
    if not weight.is_floating_point():
        return (
            f"the base weight is quantised ({type(weight).__name__}, {weight.dtype}): the fused op needs a "
            "floating-point base; the base layer's own kernels run it"
        )
    amp = autocast_dtype(x.device.type)
    if amp is not None and x.is_floating_point() and weight.is_floating_point():
        if amp not in SUPPORTED_DTYPES:
            return f"autocast dtype {amp} (supported: fp32, fp16, bf16)"
    elif x.dtype != weight.dtype:
        return f"input dtype {x.dtype} differs from the base weight's {weight.dtype}"
    elif weight.dtype not in SUPPORTED_DTYPES:
        return f"base dtype {weight.dtype} (supported: fp32, fp16, bf16)"
    return adapter_reason(lora_A, weight.device, "base weight")


def check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    fan_in_fan_out: bool,
) -> None:
    """Host-side checks with errors that name the offending tensor."""
    d_in = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    d_out = _d_out(weight, fan_in_fan_out)
    r = lora_A.shape[0]
    if weight.dim() != 2:
        raise ValueError(f"svd_linear: weight must be 2-D, got {tuple(weight.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"svd_linear: x has {x.shape[-1]} features, the layer expects {d_in}")
    if x.dtype != weight.dtype or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"svd_linear: x is {x.dtype}, weight is {weight.dtype}; need one of {SUPPORTED_DTYPES}"
        )
    if lora_A.shape != (r, d_in) or lora_E.shape != (r, 1) or lora_B.shape != (d_out, r):
        raise ValueError(
            f"svd_linear: lora_A {tuple(lora_A.shape)}, lora_E {tuple(lora_E.shape)}, lora_B "
            f"{tuple(lora_B.shape)} do not fit a {d_in}->{d_out} layer"
        )
    if r > MAX_RANK:
        raise ValueError(f"svd_linear: rank {r} > {MAX_RANK} is not supported by the fused kernels")
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"svd_linear: bias has shape {tuple(bias.shape)}, expected ({d_out},)")
    if weight.requires_grad:
        raise ValueError("svd_linear: the fused op has no weight gradient; freeze the base weight")
    devices = {t.device for t in (x, weight, lora_A, lora_E, lora_B)}
    if len(devices) != 1:
        raise ValueError(f"svd_linear: tensors on several devices {sorted(map(str, devices))}")


def svd_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused adapted linear for x of any leading shape. ``seed`` defaults to a fresh draw.

    Under ``torch.autocast`` for x's device, ``nn.Linear``'s autocast semantics: x, the base weight
    and bias are cast to the autocast dtype (the output has it; the GEMM accumulates in fp32), the
    low-rank factors keep their own dtype (fp32 adapters stay fp32 in the kernels). The kernels and
    the backward run with autocast off, so no op inside is re-cast."""
    amp = autocast_dtype(x.device.type)
    if amp is None:
        return _svd_linear(
            x, weight, bias, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p, fan_in_fan_out, seed
        )
    x, weight, bias = autocast_inputs(amp, x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return _svd_linear(
            x, weight, bias, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p, fan_in_fan_out, seed
        )


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes linears in on ``device_type`` now, or None when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_inputs(
    amp: torch.dtype, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, W and b in ``amp``, as autocast casts ``F.linear``'s floating inputs (no copy when they
    already have it). Differentiable: x's gradient comes back in its own dtype."""
    cast = [t if t is None or not t.is_floating_point() else t.to(amp) for t in (x, weight, bias)]
    return cast[0], cast[1], cast[2]


_UNUSED_SEEDS: dict[torch.device, torch.Tensor] = {}


def unused_seed(device: torch.device) -> torch.Tensor:
    """The seed argument of a call without dropout: never read, one int64 per device, made once."""
    seed = _UNUSED_SEEDS.get(device)
    if seed is None:
        seed = _UNUSED_SEEDS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return seed


def _svd_linear(x, weight, bias, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p, fan_in_fan_out, seed):
    check_inputs(x, weight, bias, lora_A, lora_E, lora_B, fan_in_fan_out)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"svd_linear: dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None:
        check_seed(seed, x.device, "svd_linear")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    params = (x, lora_A, lora_E, lora_B) + ((bias,) if bias is not None else ())
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    traced = torch.compiler.is_compiling()  # the custom ops for torch.compile; the same kernels eagerly
    if not needs_graph and dropout_p == 0.0:
        infer = svd_linear_infer if traced else _infer_impl
        y = infer(x2, weight, bias, lora_A, lora_E, lora_B, ranknum, scaling, fan_in_fan_out)
    else:
        if seed is None:
            # Without dropout the seed is never read: an uninitialised placeholder, no launch.
            seed = (
                torch.randint(0, SEED_HIGH, (1,), device=x.device)
                if dropout_p > 0.0
                else (torch.empty(1, dtype=torch.int64, device=x.device) if traced else unused_seed(x.device))
            )
        args = (x2, weight, bias, lora_A, lora_E, lora_B, ranknum, seed, dropout_p, scaling, fan_in_fan_out)
        y = svd_linear_fwd(*args)[0] if traced else _SVDLinearFn.apply(*args)
    return y.reshape(*lead, y.shape[-1])
