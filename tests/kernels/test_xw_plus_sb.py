"""kernels/xw_plus_sb.py: the GEMM with a low-rank term in its accumulator, against float64."""

from __future__ import annotations

import pytest
import torch

from adalora_fast.testing import max_rel_err
from tests.helpers import kernel_devices

mod = pytest.importorskip("adalora_fast.kernels.xw_plus_sb")
from adalora_fast.kernels.dropout_mask import dropout_mask  # noqa: E402

DEVICES = kernel_devices()
SCALING = 6.0


def _ref(x, w_kn, bias, s, b_rn, E, ranknum, keep=None, p=0.0):
    low = (s.double() * (E.double().T * SCALING / (ranknum.double() + 1e-5))) @ b_rn.double()
    if keep is not None:
        low = torch.where(keep, low / (1 - p), 0.0)
    y = x.double() @ w_kn.double() + low
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("M", "K", "N", "R", "dtype", "bias", "p", "in_gemm"),
    [(1, 17, 9, 1, torch.float32, True, 0.0, False), (33, 70, 96, 12, torch.float32, False, 0.3, False),
     (129, 45, 29, 64, torch.float16, True, 0.0, False), (7, 100, 33, 3, torch.float16, True, 0.0, True),
     (65, 40, 70, 128, torch.float32, False, 0.0, True), (20, 24, 40, 0, torch.float32, True, 0.0, False)],
)  # fmt: skip
def test_xw_plus_sb_matches_float64(device, M, K, N, R, dtype, bias, p, in_gemm, poison_empty):
    g = torch.Generator().manual_seed(M * 1000 + N)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    x = rand(M, K).to(dtype)
    w_kn = (rand(N, K) / K**0.5).to(dtype).T  # (K, N) view of an nn.Linear-style weight
    b = rand(N).to(dtype) if bias else None
    a_rk, b_rn, E = rand(R, K), rand(R, N), rand(R, 1)
    ranknum = torch.tensor([R + 2.0], device=device)
    seed = torch.tensor([3], device=device)
    if in_gemm:
        s_ref = x.double() @ a_rk.double().T
        y = mod.xw_plus_sb(x, w_kn, b, None, b_rn, E, ranknum, SCALING, a_rk=a_rk)
    else:
        s_ref = rand(M, R)
        y = mod.xw_plus_sb(x, w_kn, b, s_ref, b_rn, E, ranknum, SCALING, seed=seed, dropout_p=p)
    keep = dropout_mask(seed, M, N, p) if p > 0 else None
    assert y.dtype == dtype and y.shape == (M, N)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert max_rel_err(y, _ref(x, w_kn, b, s_ref, b_rn, E, ranknum, keep, p)) <= tol


def test_xw_plus_sb_errors():
    x, w = torch.randn(4, 8), torch.randn(8, 6)
    s, b, E, rn = torch.randn(4, 2), torch.randn(2, 6), torch.randn(2, 1), torch.ones(1)
    with pytest.raises(ValueError, match="expected \\(8, N\\)"):
        mod.xw_plus_sb(x, w[:5], None, s, b, E, rn, 1.0)
    with pytest.raises(ValueError, match="float32 of shape"):
        mod.xw_plus_sb(x, w, None, s.double(), b, E, rn, 1.0)
    with pytest.raises(ValueError, match="inference only"):
        mod.xw_plus_sb(x, w, None, None, b, E, rn, 1.0, a_rk=torch.randn(2, 8), dropout_p=0.1)
