"""kernels/xw_plus_sb_tma.py: the persistent TMA GEMM with a low-rank term in its accumulator, against
float64 and against kernels/xw_plus_sb.py on the same inputs (fp16 in the interpreter; bf16 on a GPU)."""

from __future__ import annotations

import pytest
import torch

from adalora_fast.testing import max_rel_err
from tests.helpers import kernel_devices

mod = pytest.importorskip("adalora_fast.kernels.xw_plus_sb_tma")
from adalora_fast.kernels import xw_plus_sb as plain  # noqa: E402
from adalora_fast.kernels.dropout_mask import dropout_mask  # noqa: E402

from tests.kernels.test_xw_plus_sb import SCALING, _ref  # noqa: E402  (the float64 reference)

DEVICES = kernel_devices()
TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(M, K, N, R, dtype, device, w_nk, bias, seed=0):
    g = torch.Generator().manual_seed(seed + M * 1000 + N)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    x = rand(M, K).to(dtype)
    # the forward's W is nn.Linear's (N, K) weight seen as (K, N); the backward's is (K, N) itself
    w_kn = (rand(N, K) / K**0.5).to(dtype).T if w_nk else (rand(K, N) / K**0.5).to(dtype)
    b = rand(N).to(dtype) if bias else None
    s, b_rn, E = rand(M, R), rand(R, N), rand(R, 1)
    return x, w_kn, b, s, b_rn, E, torch.tensor([R + 2.0], device=device)


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("M", "K", "N", "R", "w_nk", "bias", "p"),
    [(1, 16, 8, 1, True, True, 0.0), (33, 72, 96, 12, True, False, 0.3),
     (129, 48, 40, 64, False, True, 0.0), (70, 104, 72, 3, False, False, 0.5),
     (65, 40, 64, 60, True, True, 0.0), (20, 24, 40, 0, False, True, 0.0)],
)  # fmt: skip
def test_tma_gemm_matches_float64_and_the_plain_kernel(device, M, K, N, R, w_nk, bias, p, poison_empty):
    for dtype in _dtypes(device):
        x, w_kn, b, s, b_rn, E, ranknum = _inputs(M, K, N, R, dtype, device, w_nk, bias)
        assert mod.tma_reason(x, w_kn, s) is None
        seed = torch.tensor([3], device=device)
        y = mod.launch_xw_plus_sb_tma(x, w_kn, b, s, b_rn, E, ranknum, SCALING, seed, p)
        keep = dropout_mask(seed, M, N, p) if p > 0 else None
        assert y.dtype == dtype and y.shape == (M, N)
        assert max_rel_err(y, _ref(x, w_kn, b, s, b_rn, E, ranknum, keep, p)) <= TOL[dtype]
        # the same mask and the same low-rank term as the plain kernel: the two differ by rounding only
        other = plain.xw_plus_sb(x, w_kn, b, s, b_rn, E, ranknum, SCALING, seed=seed, dropout_p=p)
        assert max_rel_err(y, other.double()) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_calls_the_tma_gemm_cannot_take_are_named(device):
    x, w_kn, _, s, *_ = _inputs(8, 16, 24, 4, torch.float16, device, True, False)
    assert mod.tma_reason(x, w_kn, None) == "the in-GEMM shrink (inference) has no TMA variant"
    assert "float32" in mod.tma_reason(x.float(), w_kn.float(), s)
    assert "x is not row-major" in mod.tma_reason(x.T.contiguous().T, w_kn, s)
    assert "16-byte aligned" in mod.tma_reason(torch.randn(8, 18, device=device).half()[:, :16], w_kn, s)
    assert "weight" in mod.tma_reason(x, torch.randn(16, 48, device=device).half()[:, ::2], s)
    assert "rank 65 > 64" in mod.tma_reason(x, w_kn, torch.randn(8, 65, device=device))
    broadcast = torch.randn(1, 16, device=device).half().expand(8, 16)  # rows of stride 0 (a sum's grad)
    assert "x is not row-major" in mod.tma_reason(broadcast, w_kn, s)


# ---- compiled for sm_90 (no GPU needed) ---------------------------------------------------------
AOT_SCRIPT = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adalora_fast.kernels import xw_plus_sb_tma as mod
from tests.kernels.sm90 import resource_usage

ints = ["M", "N", "K", "R", "num_programs", "stride_sm", "stride_sr", "stride_br", "stride_bn", "stride_e"]
ptrs = {"bias_ptr": "*bf16", "s_ptr": "*fp32", "b_ptr": "*fp32", "e_ptr": "*fp32", "ranknum_ptr": "*fp32",
        "seed_ptr": "*i64"}
for w_nk in (True, False):
    for dropout in (False, True):
        for r_pad in (16, 32, 64):
            bm, bn, bk, stages, warps = mod.config(dropout, r_pad)
            w_block = [bn, bk] if w_nk else [bk, bn]
            sig = {"x_desc": f"tensordesc<bf16[{bm}, {bk}]>", "w_desc": f"tensordesc<bf16{w_block}>",
                   "out_desc": f"tensordesc<bf16[{bm}, {bn}]>", **ptrs, **dict.fromkeys(ints, "i32"),
                   "scaling": "fp32", "p_drop": "fp32"}
            consts = {"OUT_DTYPE": mod._TL_DTYPES[torch.bfloat16], "W_NK": w_nk, "HAS_BIAS": True,
                      "DROPOUT": dropout, "LOW_PREC": "tf32x3", "R_PAD": r_pad,
                      "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": mod.GROUP_M}
            options = {"num_warps": warps, "num_stages": stages}
            src = ASTSource(fn=mod._xw_plus_sb_tma_kernel, constexprs=consts,
                            signature={**sig, **dict.fromkeys(consts, "constexpr")})
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            ptx = kernel.asm["ptx"]
            usage = resource_usage(mod._xw_plus_sb_tma_kernel, sig, consts, **options)
            tma, wgmma = ptx.count("cp.async.bulk.tensor"), ptx.count("wgmma.mma_async")
            cp_async = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
            print(f"w_nk={int(w_nk)} dropout={int(dropout)} r_pad={r_pad} tile={bm}x{bn} tma={tma} "
                  f"wgmma={wgmma} cp_async={cp_async} smem={kernel.metadata.shared} {usage}", flush=True)
"""


@pytest.mark.slow
def test_tma_gemm_compiles_for_sm90_with_tma_and_wgmma():
    """ptxas for sm_90, the launch configs (128 x 256 x 64 / 3 stages / 8 warps at r_pad 16 without
    dropout, else 128 x 128 x 64 / 4 / 8), bf16, both weight layouts, dropout or not, r_pad 16-64:
    X, W and Y go by TMA (no cp.async), the products run on wgmma, every config fits sm_90's 227 KB of
    shared memory, and r_pad 16 and 32 spill nothing. (r_pad 64 spills up to 152 B with dropout, triton
    3.9, 2026-12-03: printed, not asserted. Ranks above 64 are left to xw_plus_sb.)"""
    import re

    from tests.kernels.sm90 import run_script, skip_without_tools

    skip_without_tools()
    lines = run_script(AOT_SCRIPT).splitlines()
    assert len(lines) == 12, lines
    for line in lines:
        fields = dict(re.findall(r"(\w+)[=:](\d+)", line))
        assert int(fields["tma"]) > 0 and int(fields["wgmma"]) > 0 and int(fields["cp_async"]) == 0, line
        assert int(fields["smem"]) <= 227 * 1024, line  # what an sm_90 block may use
        if int(fields["r_pad"]) <= 32:
            assert int(fields["STACK"]) == 0, line
        print(line)
