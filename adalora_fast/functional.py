"""The adapter operations as functions: tensors in, tensors out, the path chosen by :mod:`.backend`.

- :func:`svd_linear`: ``y = x W^T + b + drop(x) A^T diag(E) B^T * scaling / (ranknum + eps)``, the
  adapted linear layer (``kernels/svd_linear.py`` fused, or PyTorch in PEFT's op order);
- :func:`orth_regularization`: ``R = mean over all A, B of ||A A^T - I||_F, ||B^T B - I||_F``
  (``kernels/orth_defect.py`` fused, or PyTorch batched over same-shape layers).

Each asks :func:`adalora_fast.backend.choose` which path runs; when the kernels were asked for but
cannot take a call, the kernel module's ``unsupported_reason`` says why, the warning says it once,
and PyTorch runs. Kernel modules are imported on the first call that runs them, so CPU users never
import Triton and ``TRITON_INTERPRET`` may be set any time before that. (The allocator's scorer, the
third operation, keeps state across steps: :mod:`adalora_fast.allocator.scorers` chooses it the
same way.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .backend import Choice, choose, fall_back, requested_backend
from .reference import svd_adapter


# ---- the adapted linear layer -------------------------------------------------------------------
def svd_linear_choice(
    x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, requested: str = "auto"
) -> Choice:
    """Which path :func:`svd_linear` takes for these tensors under ``requested`` (and why not the
    kernels, when they were asked for)."""

    def unsupported() -> str | None:
        from .kernels import svd_linear as kernel

        return kernel.unsupported_reason(x, weight, lora_A)

    return choose("svd_linear", requested, x.device, unsupported)


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool):
    """``x W^T + b`` as ``nn.Linear`` (``fan_in_fan_out=False``) or transformers' ``Conv1D`` computes it."""
    if not fan_in_fan_out:
        return F.linear(x, weight, bias)
    out = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, out, weight) if bias is not None else out @ weight
    return out.view(*x.shape[:-1], weight.shape[1])


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
    backend: str = "auto",
    base_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The adapted linear layer: ``x W^T + b + drop(x) A^T diag(E) B^T * scaling / (ranknum + 1e-5)``.

    ``dropout_p`` is the dropout applied now (0 in eval mode). ``fan_in_fan_out``: W is stored
    (d_in, d_out) (GPT-2's ``Conv1D``). ``base_forward``: how the PyTorch path computes ``x W^T + b``
    (the layer passes its base module, so its hooks and non-plain bases behave as the module does);
    by default :func:`base_linear`.

    PyTorch path, PEFT's op order: the base output, then the adapter branch in the adapter's dtype
    added in place. Rank-0 adapters still run (and draw the dropout mask), as in PEFT.
    """
    if not weight.is_floating_point() and base_forward is not None:
        return _quantized_base_svd_linear(
            x, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p, backend, base_forward
        )
    choice = svd_linear_choice(x, weight, lora_A, backend)
    if choice.backend == "triton":
        from .kernels import base_plus_svd
        from .kernels import svd_linear as kernel

        if base_plus_svd.FLOAT_BASES:  # opt-in: cuBLAS GEMMs, the low-rank term added into their output
            x2 = x.reshape(-1, x.shape[-1])  # 2-D: the GEMM's output is no view (a view would be copied)
            y = base_linear(x2, weight, bias, fan_in_fan_out)
            xa = x2.to(y.dtype) if kernel.autocast_dtype(x.device.type) is not None else x2
            y = base_plus_svd.base_plus_svd(
                y, xa, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p=dropout_p
            )
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return kernel.svd_linear(
            x, weight, bias, lora_A, lora_E, lora_B, ranknum, scaling,
            dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out,
        )  # fmt: skip
    if choice.reason is not None:
        fall_back("svd_linear", choice.reason)
    result = base_forward(x) if base_forward is not None else base_linear(x, weight, bias, fan_in_fan_out)
    result += _adapter_term(x, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p)
    return result


def _quantized_base_svd_linear(x, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p, backend, base_forward):
    """A quantised base (bitsandbytes): its module computes the base product. The low-rank term runs
    through the kernels (``kernels/base_plus_svd.py``) only when ``backend="triton"`` asks for them (opt-in
    until a GPU run shows them faster here); else through PyTorch, added out of place as PEFT's
    quantised layers add it (bitsandbytes' 8-bit output is a view its Function made)."""
    if requested_backend(backend) == "triton":

        def unsupported() -> str | None:
            from .kernels import base_plus_svd

            return base_plus_svd.unsupported_reason(x, lora_A)

        choice = choose("svd_linear", "triton", x.device, unsupported)
        if choice.backend == "triton":
            from .kernels import base_plus_svd

            return base_plus_svd.base_plus_svd(
                base_forward(x), x, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p=dropout_p
            )
        fall_back("svd_linear", choice.reason)
    result = base_forward(x)
    return result + _adapter_term(x, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p).to(result.dtype)


def _adapter_term(x, lora_A, lora_E, lora_B, ranknum, scaling, dropout_p) -> torch.Tensor:
    """The PyTorch path's adapter branch: x in the adapter dtype, F.dropout, PEFT's op order."""
    xa = x.to(lora_A.dtype)
    if dropout_p > 0.0:
        xa = F.dropout(xa, dropout_p, training=True)
    return svd_adapter(xa, lora_A, lora_E, lora_B, scaling, ranknum)


# ---- the orthogonal regulariser -----------------------------------------------------------------
def _group_by_shape(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[tuple(t.shape)].append(t)
    return list(groups.values())


def _frobenius_defects(group: list[torch.Tensor], gram_of_rows: bool) -> torch.Tensor:
    """``||X X^T - I||_F`` (rows, for A) or ``||X^T X - I||_F`` (columns, for B) for each X."""
    n, (rows, cols) = len(group), group[0].shape
    stacked = torch.cat(group, dim=0).view(n, rows, cols)
    if gram_of_rows:
        cov = torch.bmm(stacked, stacked.transpose(1, 2))
    else:
        cov = torch.bmm(stacked.transpose(1, 2), stacked)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return torch.linalg.vector_norm(cov - eye, dim=(1, 2))


def orth_regularization_torch(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The PyTorch path of :func:`orth_regularization`: layers whose A (or B) have the same shape are
    stacked into one batched matmul and one batched norm, so the number of ATen ops depends on the
    number of distinct shapes (a handful per architecture), not on the number of layers."""
    if not lora_As:
        raise ValueError("orth_regularization needs at least one adapted layer")
    norms = [_frobenius_defects(g, True) for g in _group_by_shape(lora_As)]
    norms += [_frobenius_defects(g, False) for g in _group_by_shape(lora_Bs)]
    return torch.cat(norms).sum() / (len(lora_As) + len(lora_Bs))


def orth_regularization_choice(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor], requested: str = "auto"
) -> Choice:
    """Which path :func:`orth_regularization` takes for these factors under ``requested``."""

    def unsupported() -> str | None:
        from .kernels import orth_defect

        return orth_defect.unsupported_reason(lora_As, lora_Bs)

    return choose("orth_reg", requested, lora_As[0].device, unsupported)


def orth_regularization(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor], backend: str = "auto"
) -> torch.Tensor:
    """``R``, the mean over all A and B of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` (Frobenius
    norm, not squared), as a differentiable scalar. Fused: 2 launches forward, 1 backward, for any
    number of layers (mixed dtypes or devices, fp64 or rank > 128 take the PyTorch path)."""
    if not lora_As:
        return orth_regularization_torch(lora_As, lora_Bs)  # raises the usual error
    choice = orth_regularization_choice(lora_As, lora_Bs, backend)
    if choice.backend == "triton":
        from .kernels import orth_defect

        return orth_defect.orth_regularization(lora_As, lora_Bs)
    if choice.reason is not None:
        fall_back("orth_reg", choice.reason)
    return orth_regularization_torch(lora_As, lora_Bs)
