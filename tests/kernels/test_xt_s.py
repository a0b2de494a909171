"""kernels/xt_s.py: ``(S diag(lambda*s))^T drop(X)`` (the factor gradients) against float64."""

from __future__ import annotations

import pytest
import torch

from adalora_fast.testing import max_rel_err
from tests.helpers import kernel_devices

mod = pytest.importorskip("adalora_fast.kernels.xt_s")
from adalora_fast.kernels.dropout_mask import dropout_mask  # noqa: E402

DEVICES = kernel_devices()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("M", "C", "R", "dtype", "p"),
    [(1, 9, 1, torch.float32, 0.0), (129, 70, 12, torch.float32, 0.3), (300, 33, 64, torch.float16, 0.0),
     (33, 130, 3, torch.float16, 0.5), (70, 20, 128, torch.float32, 0.0)],
)  # fmt: skip
def test_xt_s_matches_float64(device, M, C, R, dtype, p, poison_empty):
    g = torch.Generator().manual_seed(M + C)
    x = torch.randn(C, M, generator=g).to(device=device, dtype=dtype).T  # (M, C), column-major
    s = torch.randn(M, R, generator=g).to(device)
    E = torch.randn(R, 1, generator=g).to(device)
    ranknum = torch.tensor([R + 1.0], device=device)
    seed = torch.tensor([21], device=device)
    out = mod.xt_s(x, s, E, ranknum, 4.0, seed=seed, dropout_p=p)
    xd = x.double()
    if p > 0:
        xd = torch.where(dropout_mask(seed, M, C, p), xd / (1 - p), 0.0)
    ref = (s.double() * (E.double().T * 4.0 / (R + 1.0 + 1e-5))).T @ xd
    assert out.shape == (R, C) and out.dtype == torch.float32
    assert max_rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_xt_s_splits_rows_deterministically(device):
    """Several row splits (partial sums, no atomics): the same inputs give bit-identical results."""
    x, s, E = (torch.randn(*shape, device=device) for shape in ((4099, 40), (4099, 5), (5, 1)))
    one = torch.ones(1, device=device)
    a = mod.xt_s(x, s, E, one, 1.0)
    assert torch.equal(a, mod.xt_s(x, s, E, one, 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("M", "dtype"), [(40, torch.float32), (4099, torch.float32), (300, torch.float16)])
def test_xt_s_stores_in_the_factor_dtype_and_layout(device, M, dtype):
    """``dtype`` / ``transposed`` (dB is (C, R) in the factor's dtype): equal to the fp32 (R, C) result
    cast and transposed, with one split (the kernel stores it) and several (partials, one sum)."""
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 70, generator=g).to(device)
    s = torch.randn(M, 12, generator=g).to(device)
    E = torch.randn(12, 1, generator=g).to(device)
    ranknum = torch.tensor([12.0], device=device)
    ref = mod.xt_s(x, s, E, ranknum, 2.0)
    out = mod.xt_s(x, s, E, ranknum, 2.0, dtype=dtype, transposed=True)
    assert out.shape == (70, 12) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref.t().to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("M", "C", "R", "dtype", "p"),
    [(1, 9, 1, torch.float32, 0.0), (129, 70, 12, torch.float32, 0.3), (4099, 40, 5, torch.float32, 0.0),
     (33, 130, 3, torch.float16, 0.5), (70, 200, 64, torch.float16, 0.0)],
)  # fmt: skip
def test_xt_s_dlambda_folds_the_lambda_gradient_into_the_dq_pass(device, M, C, R, dtype, p):
    """dQ as xt_s gives it, bit for bit, and d(lambda) = s * sum_m G * S against float64, in E's dtype."""
    gen = torch.Generator().manual_seed(M + R)
    x = torch.randn(M, C, generator=gen).to(device=device, dtype=dtype)
    grad, s = (torch.randn(M, R, generator=gen).to(device) for _ in range(2))
    E = torch.randn(R, 1, generator=gen).to(device=device, dtype=dtype)
    ranknum = torch.tensor([R + 1.0], device=device)
    seed = torch.tensor([5], device=device)
    dq, dlam = mod.xt_s_dlambda(x, grad, s, E, ranknum, 3.0, seed=seed, dropout_p=p)
    assert torch.equal(dq, mod.xt_s(x, grad, E, ranknum, 3.0, seed=seed, dropout_p=p))
    ref = (grad.double() * s.double()).sum(0, keepdim=True).T * (3.0 / (R + 1.0 + 1e-5))
    assert dlam.shape == (R, 1) and dlam.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # fp16's own rounding of the stored value
    assert max_rel_err(dlam, ref) <= tol


def test_xt_s_dlambda_checks_s():
    x, g, E = torch.randn(8, 4), torch.randn(8, 3), torch.randn(3, 1)
    with pytest.raises(ValueError, match="xt_s_dlambda: s must be float32"):
        mod.xt_s_dlambda(x, g, torch.randn(8, 2), E, torch.ones(1), 1.0)
