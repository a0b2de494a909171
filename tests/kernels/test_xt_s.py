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
