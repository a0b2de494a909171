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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [40, 4099])
def test_xt_s_dlambda_with_a_strided_lambda(device, M):
    """lora_E a column of a wider tensor (row stride 3): read through its stride, d(lambda) still
    written as a fresh contiguous (R, 1), with one split and several."""
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, 24, generator=gen).to(device)
    grad, s = (torch.randn(M, 5, generator=gen).to(device) for _ in range(2))
    E = torch.randn(5, 3, generator=gen).to(device)[:, :1]
    ranknum = torch.tensor([6.0], device=device)
    dq, dlam = mod.xt_s_dlambda(x, grad, s, E, ranknum, 2.0)
    assert torch.equal(dq, mod.xt_s(x, grad, E.contiguous(), ranknum, 2.0))
    ref = (grad.double() * s.double()).sum(0, keepdim=True).T * (2.0 / (6.0 + 1e-5))
    assert dlam.shape == (5, 1) and dlam.is_contiguous() and max_rel_err(dlam, ref) <= 1e-5


def test_xt_s_dlambda_checks_s():
    x, g, E = torch.randn(8, 4), torch.randn(8, 3), torch.randn(3, 1)
    with pytest.raises(ValueError, match="xt_s_dlambda: s must be float32"):
        mod.xt_s_dlambda(x, g, torch.randn(8, 2), E, torch.ones(1), 1.0)


# ---- compiled for sm_90 (no GPU needed) ---------------------------------------------------------
AOT_SCRIPT = """
import torch
from adalora_fast.kernels import xt_s as mod
from tests.kernels.sm90 import resource_usage

ptrs = ["x_ptr", "s_ptr", "e_ptr", "ranknum_ptr", "seed_ptr", "out_ptr", "s2_ptr", "dlam_ptr"]
ints = ["M", "C", "R", "rows_per_split", "stride_xm", "stride_xc", "stride_sm", "stride_sr", "stride_e",
        "stride_osplit", "stride_or", "stride_oc", "stride_s2m", "stride_s2r", "stride_dsplit", "stride_dr"]
for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
    for r_pad in (16, 32, 64, 128):
        block_c, block_m, warps = mod._tiles(torch.empty(1, dtype=dtype), r_pad)
        for dropout in (False, True):
            for fold in (False, True):
                sig = {**dict.fromkeys(ptrs, "*fp32"), "x_ptr": f"*{name}", "seed_ptr": "*i64",
                       **dict.fromkeys(ints, "i32"), "scaling": "fp32", "p_drop": "fp32"}
                consts = {"DROPOUT": dropout, "FOLD_DLAM": fold, "PREC": mod.dot_precision(dtype),
                          "R_PAD": r_pad, "BLOCK_C": block_c, "BLOCK_M": block_m}
                usage = resource_usage(mod._xt_s_kernel, sig, consts, num_warps=warps, num_stages=3)
                print(f"{name} r_pad={r_pad} dropout={int(dropout)} fold={int(fold)} {usage}")
"""


@pytest.mark.slow
def test_xt_s_compiles_for_sm90_and_the_fold_adds_no_spills():
    """ptxas for sm_90: without dropout every variant (fp32 / bf16, r_pad 16-128, d(lambda) folded or
    not) is spill-free, and the folded d(lambda) (an extra column of programs) never spills more than
    the kernel without it by more than 64 bytes (bf16 r_pad 64 with dropout: 56 B, 2026-12-03)."""
    import re

    from tests.kernels.sm90 import run_script, skip_without_tools

    skip_without_tools()
    stack = {}
    for line in run_script(AOT_SCRIPT).splitlines():
        key, usage = line.split(" REG:")
        stack[key] = int(re.search(r"STACK:(\d+)", usage).group(1))
    assert len(stack) == 32, stack
    assert all(v == 0 for k, v in stack.items() if "dropout=0" in k), stack
    for key, spill in stack.items():
        if key.endswith("fold=1"):
            assert spill <= stack[key.replace("fold=1", "fold=0")] + 64, (key, stack)
