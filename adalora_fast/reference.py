"""The pure-PyTorch reference: readable, per layer, and the spec every fast path is checked against.

It follows the numeric contract of PEFT 0.21's AdaLoRA item by item (``docs/numeric_contract.md``
§2): the same formulas, evaluated in the same order, so that fp32 results match PEFT bit for bit
where PEFT's own op order is deterministic. Pure tensor functions: no modules, no state. The per-layer
allocator built on them is :class:`adalora_fast.allocator.ReferenceScorer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .factors import RANKNUM_EPS


def adapter_scale(scaling: float, ranknum: torch.Tensor) -> torch.Tensor:
    """``scaling / (ranknum + 1e-5)``; ranknum stays init_r for ever (also after pruning)."""
    return scaling / (ranknum + RANKNUM_EPS)


def svd_adapter(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    ranknum: torch.Tensor,
) -> torch.Tensor:
    """The adapter branch ``((x @ (A*E)^T) @ B^T) * scaling / (ranknum + 1e-5)`` in PEFT's op order.

    ``x`` is the (already dropped-out) input, cast to the adapter dtype by the caller.
    """
    return (x @ (lora_A * lora_E).T @ lora_B.T) * scaling / (ranknum + RANKNUM_EPS)


def delta_weight(
    lora_A: torch.Tensor, lora_E: torch.Tensor, lora_B: torch.Tensor, scaling: float, ranknum: torch.Tensor
) -> torch.Tensor:
    """Dense ``dW = B diag(E) A * scale`` (d_out x d_in), as PEFT's ``get_delta_weight``."""
    return lora_B @ (lora_A * lora_E) * scaling / (ranknum + RANKNUM_EPS)


def budget_schedule(
    step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int, deltaT: int
) -> tuple[int, bool]:
    """Total rank budget at ``step`` and whether this step masks (cubic schedule, float64 math)."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return budget, step % deltaT == 0


def grads_finite(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor in ``grads`` is finite, as a 0-d bool tensor on the first
    tensor's device (decided on the device: nothing is read back to the host)."""
    if not grads:
        raise ValueError("grads_finite needs at least one tensor")
    device = grads[0].device
    # One read pass per tensor and no bool temporary: aminmax propagates NaN, and +-inf shows up as
    # the max or the min; only the 2 * len(grads) extremes are tested. Unlike all()/sum(), it issues
    # the same ops whatever the size on the CPU. Empty tensors are skipped (trivially finite).
    extremes = [torch.stack(torch.aminmax(g)).to(device) for g in grads if g.numel() > 0]
    if not extremes:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.cat(extremes)).min()


def update_importance_(
    param: torch.Tensor,
    grad: torch.Tensor,
    ema_ipt: torch.Tensor,
    ema_unc: torch.Tensor,
    beta1: float,
    beta2: float,
    finite: torch.Tensor | None = None,
) -> None:
    """Sensitivity ``I = |p * g|`` smoothed into ``ema_ipt``; uncertainty ``|I - ema_ipt_new|`` into
    ``ema_unc`` (both in place; updated-mean semantics, PEFT's op order).

    ``finite`` (0-d bool tensor, see :func:`grads_finite`): when it holds False both EMAs are left
    bitwise unchanged (the step's gradients held inf/NaN); chosen with ``torch.where``, so no NaN
    reaches the EMAs and nothing syncs with the host. ``None`` updates unconditionally (PEFT).
    """
    ipt = (param * grad).abs()
    if finite is None:
        ema_ipt.copy_(beta1 * ema_ipt + (1 - beta1) * ipt)
        ema_unc.copy_(beta2 * ema_unc + (1 - beta2) * (ipt - ema_ipt).abs())
        return
    finite = finite.to(ema_ipt.device)
    new_ipt = beta1 * ema_ipt + (1 - beta1) * ipt
    new_unc = beta2 * ema_unc + (1 - beta2) * (ipt - new_ipt).abs()
    ema_ipt.copy_(torch.where(finite, new_ipt, ema_ipt))
    ema_unc.copy_(torch.where(finite, new_unc, ema_unc))


def triplet_scores(s_A: torch.Tensor, s_E: torch.Tensor, s_B: torch.Tensor) -> torch.Tensor:
    """``S_i = s_E[i] + (mean_j s_A[i, j] + mean_k s_B[k, i])`` for one layer, shape (r,)."""
    mean_A = torch.mean(s_A, dim=1, keepdim=True)
    mean_B = torch.mean(s_B, dim=0, keepdim=False).view(-1, 1)
    ipt_AB = torch.cat([mean_A, mean_B], dim=1).sum(dim=1)
    return s_E.view(-1) + ipt_AB.view(-1)


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest score (1-based) as a 0-d tensor; ``-inf`` when k == 0 (nothing to prune)."""
    if k <= 0:
        return torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    return torch.kthvalue(scores, k)[0]


def orth_regularization(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over all A and B of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` (not squared)."""
    total = None
    count = 0
    for A, B in zip(lora_As, lora_Bs, strict=True):
        for cov in (A @ A.T, B.T @ B):
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    if total is None:
        raise ValueError("orth_regularization needs at least one adapted layer")
    return total / count
