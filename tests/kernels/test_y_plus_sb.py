"""kernels/y_plus_sb.py: ``y += drop((s * lambda*scale) @ b)`` in place against float64 (odd shapes,
strided y, dropout, dtypes, rank 0), and its input checks."""

from __future__ import annotations

import pytest
import torch

from adalora_fast.testing import max_rel_err
from tests.helpers import kernel_devices

mod = pytest.importorskip("adalora_fast.kernels.y_plus_sb")
from adalora_fast.kernels.dropout_mask import dropout_mask  # noqa: E402

DEVICES = kernel_devices()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("M", "N", "R", "dtype", "p"),
    [(1, 7, 1, torch.float32, 0.0), (70, 33, 3, torch.float32, 0.4), (129, 45, 64, torch.float16, 0.0),
     (7, 130, 12, torch.float16, 0.2), (40, 65, 128, torch.float32, 0.0)],
)  # fmt: skip
def test_y_plus_sb_matches_float64(device, M, N, R, dtype, p):
    y = torch.randn(M, 2 * N, device=device).to(dtype)[:, ::2]  # strided
    y0 = y.clone()
    s = torch.randn(M, R, device=device)
    b = torch.randn(N, R, device=device).T  # (R, N) view
    e = torch.randn(R, 1, device=device)
    ranknum = torch.tensor([float(R)], device=device)
    seed = torch.tensor([3], device=device)
    mod.y_plus_sb(y, s, b, e, ranknum, 8.0, seed=seed if p else None, dropout_p=p)
    keep = dropout_mask(seed, M, N, p) if p > 0 else None
    expected = mod.y_plus_sb_reference(y0, s, b, e, ranknum, 8.0, keep, p)
    assert y.dtype == dtype and max_rel_err(y, expected) <= (1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_zero_leaves_y_alone_and_bad_inputs_raise(device):
    y = torch.randn(5, 6, device=device)
    y0 = y.clone()
    empty = torch.zeros(5, 0, device=device)
    mod.y_plus_sb(y, empty, torch.zeros(0, 6, device=device), torch.zeros(0, 1, device=device),
                  torch.tensor([4.0], device=device), 1.0)  # fmt: skip
    assert torch.equal(y, y0)
    r = torch.tensor([2.0], device=device)
    with pytest.raises(ValueError, match="s must be float32"):
        mod.y_plus_sb(y, torch.zeros(5, 2, device=device).half(), torch.zeros(2, 6, device=device),
                      torch.zeros(2, 1, device=device), r, 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        mod.y_plus_sb(y, torch.zeros(5, 2, device=device), torch.zeros(2, 7, device=device),
                      torch.zeros(2, 1, device=device), r, 1.0)  # fmt: skip
