"""Jit helpers of kernels/_common.py: the TF32 head/tail split behind the near-IEEE half-precision dots.

On the GPU a TF32 product drops the low 13 mantissa bits of each fp32 operand; ``dot_split_rhs``
therefore multiplies by a head that is exactly representable in TF32 and by the tail (``v - head``),
whose own TF32 rounding costs only ~2^-22 relative. These checks run the helper itself (in the
interpreter on the CPU, compiled on CUDA); GPU numerics of the dots are covered by the fp16 tests of
tests/kernels/test_svd_linear.py.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tests.helpers import kernel_devices

common = pytest.importorskip("adalora_fast.kernels._common")
DEVICES = kernel_devices()


@triton.jit
def _head_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, common._tf32_head(v), mask=offs < n)


@pytest.mark.parametrize("device", DEVICES)
def test_tf32_head_is_tf32_and_close(device):
    g = torch.Generator().manual_seed(7)
    v = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    v = v.to(device)
    head = torch.full_like(v, float("nan"))
    _head_kernel[(triton.cdiv(v.numel(), 1024),)](v, head, v.numel(), BLOCK=1024)
    bits = head.view(torch.int32)
    assert torch.all((bits & 0x1FFF) == 0), "head keeps more than TF32's 10 mantissa bits"
    tail = (v - head).double()
    assert torch.all(tail.abs() <= v.double().abs() * 2.0**-11), "head is not v rounded to nearest"
    # the tail is exact in fp32: head + tail gives v back bit for bit
    assert torch.equal(head + (v - head), v)


@pytest.mark.parametrize("x_dtype,other,expected", [
    (torch.float32, torch.float32, "ieee"),
    (torch.bfloat16, torch.float32, "tf32_split"),
    (torch.float16, torch.float32, "tf32_split"),
    (torch.float16, torch.float16, "tf32"),
])  # fmt: skip
def test_dot_precision(x_dtype, other, expected):
    assert common.dot_precision(x_dtype, other) == expected
    assert common.fp32_pair_precision(x_dtype) == ("ieee" if x_dtype == torch.float32 else "tf32x3")


def test_host_cdiv_and_next_pow2_match_triton():
    for a in range(1, 2100):
        assert common.next_pow2(a) == triton.next_power_of_2(a), a
        for b in (1, 3, 16, 64):
            assert common.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert common.cdiv(0, 16) == 0 and common.next_pow2(0) == 1
