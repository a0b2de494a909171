"""Orthogonal regulariser ``R = mean over all A, B of ||A A^T - I||_F, ||B^T B - I||_F``, vectorised.

Layers whose A (or B) have the same shape are stacked and handled by one batched matmul and one
batched norm, so the number of ATen compute ops depends on the number of distinct shapes (a handful
per architecture), not on the number of layers. Backend "triton" runs the fused kernels of
:mod:`adalora_fast.kernels.orth_defect` (2 launches forward, 1 backward, for any number of layers).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from . import dispatch


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
    if not lora_As:
        raise ValueError("orth_regularization needs at least one adapted layer")
    norms = [_frobenius_defects(g, True) for g in _group_by_shape(lora_As)]
    norms += [_frobenius_defects(g, False) for g in _group_by_shape(lora_Bs)]
    return torch.cat(norms).sum() / (len(lora_As) + len(lora_Bs))


def orth_regularization_triton(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The fused kernels (:mod:`adalora_fast.kernels.orth_defect`): 2 launches forward, 1 backward.

    Factors the kernels do not take (mixed dtypes or devices, fp64, rank > 128) run the torch path,
    with a one-time warning. In eager mode the kernels' own checks decide (they run only when the
    cached pointer table is rebuilt); under ``torch.compile`` the same checks run while tracing.
    """
    from .kernels import orth_defect

    if not lora_As:
        return orth_regularization_torch(lora_As, lora_Bs)  # raises the usual error
    if torch.compiler.is_compiling():
        reason = orth_defect.unsupported_reason(lora_As, lora_Bs)
        if reason is None:
            return orth_defect.orth_regularization(lora_As, lora_Bs)
    else:
        try:
            return orth_defect.orth_regularization(lora_As, lora_Bs)
        except orth_defect.UnsupportedInputs as err:
            reason = str(err).removeprefix("orth_defect: ")
    dispatch.warn_once(f"fused orth_reg cannot run: {reason}; using the torch path for such calls")
    return orth_regularization_torch(lora_As, lora_Bs)


def orth_regularization(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor], backend: str = "auto"
) -> torch.Tensor:
    """Dispatch point of the regulariser (differentiable scalar)."""
    return dispatch.implementation("orth_reg", backend, lora_As[0].device)(lora_As, lora_Bs)


dispatch.register("orth_reg", "torch", orth_regularization_torch)
