"""kernels/x_at.py: ``drop(x) @ a^T`` in fp32 against float64 (odd shapes, strides, dropout, dtypes)."""

from __future__ import annotations

import pytest
import torch

from adalora_fast.testing import max_rel_err
from tests.helpers import kernel_devices

x_at_mod = pytest.importorskip("adalora_fast.kernels.x_at")
from adalora_fast.kernels.dropout_mask import dropout_mask  # noqa: E402

DEVICES = kernel_devices()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("M", "K", "R", "dtype", "p"),
    [(1, 7, 1, torch.float32, 0.0), (33, 70, 3, torch.float32, 0.4), (129, 45, 64, torch.float16, 0.0),
     (7, 130, 12, torch.float16, 0.2), (40, 33, 128, torch.float32, 0.0)],
)  # fmt: skip
def test_x_at_matches_float64(device, M, K, R, dtype, p, poison_empty):
    x = torch.randn(M, 2 * K, device=device).to(dtype)[:, ::2]  # strided rows
    a = torch.randn(K, R, device=device).T  # (R, K) view, column-major
    seed = torch.tensor([11], device=device)
    out = x_at_mod.x_at(x, a, seed=seed, dropout_p=p)
    keep = dropout_mask(seed, M, K, p) if p > 0 else None
    assert out.dtype == torch.float32 and out.shape == (M, R)
    assert max_rel_err(out, x_at_mod.x_at_reference(x, a, keep, p)) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_x_at_dy_times_b(device):
    """The backward's use: G = dy @ P, with P (N, R) passed as P^T through strides."""
    dy, P = torch.randn(9, 50, device=device), torch.randn(50, 5, device=device)
    assert max_rel_err(x_at_mod.x_at(dy, P.t()), dy.double() @ P.double()) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiles", [(16, 64, 4), (32, 128, 4), (128, 64, 8)])
def test_x_at_tile_override(device, tiles, poison_empty):
    """The tile sweep of benchmarks/profile_gpu.py computes the same thing (dropout included)."""
    x = torch.randn(150, 100, device=device).to(torch.float16)
    a = torch.randn(12, 100, device=device)
    seed = torch.tensor([5], device=device)
    out = x_at_mod.x_at(x, a, seed=seed, dropout_p=0.3, tiles=tiles)
    keep = dropout_mask(seed, 150, 100, 0.3)
    assert max_rel_err(out, x_at_mod.x_at_reference(x, a, keep, 0.3)) <= 1e-5


def test_x_at_errors():
    with pytest.raises(ValueError, match="features"):
        x_at_mod.x_at(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="needs a seed"):
        x_at_mod.x_at(torch.randn(3, 4), torch.randn(2, 4), dropout_p=0.1)
