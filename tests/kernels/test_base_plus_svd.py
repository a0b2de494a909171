"""kernels/base_plus_svd.py: the low-rank term added into a base output another op made, forward and all
gradients against float64 (dropout with the regenerated mask, fp32 and fp16 activations, a view as the
base output), and its input checks."""

from __future__ import annotations

import pytest
import torch

from adalora_fast.testing import max_rel_err
from tests.helpers import kernel_devices

mod = pytest.importorskip("adalora_fast.kernels.base_plus_svd")
from adalora_fast.kernels.dropout_mask import dropout_mask  # noqa: E402

DEVICES = kernel_devices()


def _reference(w, x, A, E, B, ranknum, scaling, keep, p):
    xd = x.double()
    xl = torch.where(keep, xd / (1 - p), torch.zeros_like(xd)) if keep is not None else xd
    low = ((xl @ A.double().T) * E.double().T) @ B.double().T * (scaling / (ranknum.double() + 1e-5))
    return xd @ w.double().T + low


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "p"), [(torch.float32, 0.0), (torch.float32, 0.3), (torch.float16, 0.2)])
def test_forward_and_gradients_match_float64(device, dtype, p):
    torch.manual_seed(0)
    M, K, N, R = 37, 40, 24, 6
    w = torch.randn(N, K, device=device).to(dtype)
    x = torch.randn(M, K, device=device).to(dtype).requires_grad_(True)
    A, E, B = (torch.randn(*s, device=device, requires_grad=True) for s in ((R, K), (R, 1), (N, R)))
    ranknum, seed = torch.tensor([float(R)], device=device), torch.tensor([9], device=device)
    base_out = (x @ w.T).view(M, N)  # a view: cloned before the in-place add
    y = mod.base_plus_svd(base_out, x, A, E, B, ranknum, 8.0, dropout_p=p, seed=seed)
    keep = dropout_mask(seed, M, K, p) if p > 0 else None
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, A, E, B)]
    y64 = _reference(w, *leaves64, ranknum, 8.0, keep, p)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16 output / dy rounding
    assert y.dtype == dtype and max_rel_err(y, y64) <= tol
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    for name, got, leaf in zip("xAEB", (x, A, E, B), leaves64, strict=True):
        assert max_rel_err(got.grad, leaf.grad) <= tol, name


@pytest.mark.parametrize("device", DEVICES)
def test_shapes_are_checked(device):
    x, out = torch.randn(3, 8, device=device), torch.randn(3, 5, device=device)
    A, E, B = (
        torch.randn(2, 8, device=device),
        torch.randn(2, 1, device=device),
        torch.randn(4, 2, device=device),
    )
    r = torch.tensor([2.0], device=device)
    with pytest.raises(ValueError, match="do not fit a 8->5 layer"):
        mod.base_plus_svd(out, x, A, E, B, r, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        mod.base_plus_svd(torch.randn(3, 4, device=device), x, A, E, B, r, 1.0, dropout_p=1.0)
